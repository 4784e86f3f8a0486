"""Which implementation of a block's full-size work runs: the ``backend`` argument.

==========  =================================================================================
backend     what runs
==========  =================================================================================
"plain"     the seeds' operations one for one (what ``torch.compile`` traces and fuses itself;
            supports double backward)
"torch"     fused autograd functions in plain torch (:mod:`.torch_fused`): fewer full-size
            passes and one buffer for the input gradient; fastest measured on CPU
"triton"    Triton kernels registered as ``torch.library`` custom ops (:mod:`.triton_ops`):
            CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (for tests)
"auto"      per device and input, the path measured fastest there (:func:`auto_backend`)
==========  =================================================================================
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "BACKENDS",
    "CUDA_RULES",
    "AutoRule",
    "Backend",
    "auto_backend",
    "backend_from_fused",
    "check_triton_input",
    "resolve_backend",
    "rules_from_measurement",
    "triton_importable",
    "use_measured_rules",
]

Backend = Literal["auto", "triton", "torch", "plain"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "plain")

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64"}


@dataclass(frozen=True)
class AutoRule:
    """Where a GPU measurement found one backend fastest: ``"auto"`` picks ``backend`` for
    ``block`` on inputs with ``H*W`` in ``hw`` and ``C`` in ``channels`` (inclusive ranges)
    of a dtype in ``dtypes`` (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp64"``; of ``x``)."""

    block: str
    backend: str
    hw: tuple[int, int]
    channels: tuple[int, int]
    dtypes: tuple[str, ...]
    #: what measured it (GPU, versions, numbers)
    source: str

    def matches(self, block: str, hw: int, channels: int, dtype: str) -> bool:
        return (block == self.block and dtype in self.dtypes
                and self.hw[0] <= hw <= self.hw[1]
                and self.channels[0] <= channels <= self.channels[1])

    def distance(self, hw: int, channels: int) -> float:
        """How far ``(hw, channels)`` lies from the middle of the rule's ranges (log scale):
        among matching rules, the nearest decides."""
        mid_hw = math.sqrt(self.hw[0] * self.hw[1])
        mid_c = math.sqrt(self.channels[0] * self.channels[1])
        return abs(math.log(hw / mid_hw)) + abs(math.log(channels / mid_c))


_ANY = (1, 2**62)
_FLOATS = ("fp32", "bf16", "fp16", "fp64")

#: What ``"auto"`` picks on CUDA, from GPU measurements; an input no rule matches runs
#: ``"plain"``. No GPU has measured the Triton path yet, so no rule names it: add the rules
#: that ``make gpu-check`` prints (``rules_from_measurement`` of its ``gpu-check.json``), or
#: load them at run time with :func:`use_measured_rules`.
CUDA_RULES: tuple[AutoRule, ...] = (
    AutoRule(
        "coord", "torch", hw=(32 * 32, _ANY[1]), channels=_ANY, dtypes=_FLOATS,
        source="H100, torch 2.11, an earlier release's measurement: the torch fused path "
               "1.23x the seed code at (64,256,56,56), 0.86x at (128,1024,14,14)",
    ),
)


def use_measured_rules(rules: tuple[AutoRule, ...] | list[AutoRule]) -> None:
    """Replace :data:`CUDA_RULES` (e.g. with :func:`rules_from_measurement` of a
    ``gpu-check.json`` from your own GPU). Blocks resolve ``"auto"`` at each forward;
    ``torch.compile`` bakes the choice into a graph when it traces."""
    global CUDA_RULES
    for rule in rules:
        if not isinstance(rule, AutoRule) or rule.backend not in ("plain", "torch", "triton"):
            raise ValueError(f"rules must be AutoRule objects naming plain, torch or triton, "
                             f"got {rule!r}")
    CUDA_RULES = tuple(rules)


def rules_from_measurement(rows: list[dict], margin: float = 1.05) -> tuple[AutoRule, ...]:
    """Rules from benchmark rows (``benchmarks/blocks.py --device cuda --json``, also in
    ``gpu-check.json``): for each measured (block, shape, dtype), forward+backward, the
    fastest of ``plain``, ``torch`` and ``triton`` if it beats ``plain`` by ``margin``;
    each rule covers ``H*W`` within a factor 2 and ``C`` within a factor 4 of the shape."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("mode") != "fwd+bwd" or r.get("variant") not in ("plain", "torch", "triton"):
            continue
        key = (r["block"], tuple(r["shape"]), r["dtype"].split()[0])
        times.setdefault(key, {})[r["variant"]] = float(r["ms"])
    rules = []
    for (block, shape, dtype), ms in sorted(times.items()):
        if "plain" not in ms:
            continue
        best = min(ms, key=ms.get)
        if best == "plain" or ms["plain"] / ms[best] < margin:
            continue
        _, c, h, w = shape
        rules.append(AutoRule(
            block, best, hw=(max(1, h * w // 2), h * w * 2 - 1),
            channels=(max(1, c // 4), c * 4 - 1), dtypes=(dtype,),
            source=f"measured {shape} {dtype}: {best} {ms[best]:.3f} ms, plain "
                   f"{ms['plain']:.3f} ms",
        ))
    return tuple(rules)


def auto_backend(
    block: str, device: str, hw: int, channels: int, dtype: str, compiling: bool
) -> str:
    """What ``"auto"`` runs for ``block`` on a ``(B, channels, H, W)`` input with
    ``H*W = hw`` of ``dtype`` on ``device`` (a device type), traced by torch.compile or not.

    - CPU: ``"torch"`` (1.3-2.6x the seed code on 2 cores, ``benchmarks/blocks.py``);
      under ``torch.compile``, ``"plain"``, which the compiler fuses itself.
    - CUDA: the nearest matching rule of :data:`CUDA_RULES`, ``"plain"`` where none
      matches; a ``"torch"`` rule gives ``"plain"`` under ``torch.compile``.
    - anything else: ``"plain"``.
    """
    if device == "cuda":
        found = [r for r in CUDA_RULES if r.matches(block, hw, channels, dtype)]
        if not found:
            return "plain"
        backend = min(found, key=lambda r: r.distance(hw, channels)).backend
        return "plain" if backend == "torch" and compiling else backend
    if device == "cpu" and not compiling:
        return "torch"
    return "plain"


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def backend_from_fused(fused: bool | None, backend: str, owner: str) -> str:
    """Map the deprecated ``fused=`` argument onto ``backend``."""
    if fused is None:
        return backend
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {fused!r} ({type(fused).__name__})")
    mapped = "torch" if fused else "plain"
    if backend not in ("auto", mapped):
        raise ValueError(
            f"{owner}: fused={fused} contradicts backend={backend!r}; pass only backend="
        )
    warnings.warn(
        f"{owner}(fused={fused}) is deprecated and will be removed in 0.3: use "
        f"backend={mapped!r}",
        FutureWarning,
        stacklevel=3,
    )
    return mapped


def resolve_backend(requested: str, block: str, x: torch.Tensor) -> str:
    """The backend that runs a forward of ``block`` (``"dsa"`` or ``"coord"``) on ``x``:
    ``requested``, or for ``"auto"`` :func:`auto_backend` of ``x``'s device, size and dtype.

    An explicit ``"torch"`` traces the plain operations under ``torch.compile`` (its custom
    autograd functions hand gradients over through Python state that a graph cannot hold).
    """
    compiling = torch.compiler.is_compiling()
    if requested != "auto":
        if requested == "torch" and compiling:
            return "plain"
        return requested
    _, c, h, w = x.shape
    return auto_backend(block, x.device.type, h * w, c, _DTYPE_NAMES.get(x.dtype, "fp32"),
                        compiling)


def check_triton_input(x: torch.Tensor, owner: str) -> None:
    """A clear error when ``backend="triton"`` cannot run on ``x``."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(
        f"{owner}: the Triton path (backend='triton') runs on CUDA tensors (or on CPU "
        f"tensors with TRITON_INTERPRET=1, Triton's interpreter, set before triton is "
        f"imported; for testing); got a {x.device.type} tensor. Use backend='auto' to pick "
        "the fastest path for each device."
    )
