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
"auto"      per device, the path measured fastest there (see :func:`resolve_backend`)
==========  =================================================================================
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Literal

import torch

__all__ = [
    "BACKENDS",
    "Backend",
    "backend_from_fused",
    "check_triton_input",
    "resolve_backend",
    "triton_importable",
]

Backend = Literal["auto", "triton", "torch", "plain"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "plain")

#: Whether a GPU benchmark has shown the Triton path faster than the others on CUDA. Until
#: one has (``benchmarks/blocks.py --device cuda``), ``"auto"`` never picks it.
TRITON_MEASURED_FASTER_ON_CUDA = False


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
    """The backend that runs a forward of ``block`` (``"dsa"`` or ``"coord"``) on ``x``.

    ``"auto"`` picks, per device, the path measured fastest there:

    - CPU: ``"torch"`` (1.3-2.6x the seed code on 2 cores, ``benchmarks/blocks.py``);
      under ``torch.compile``, ``"plain"``, which the compiler fuses itself.
    - CUDA: ``"plain"``, except CoordinateAttention on maps of at least 32x32, where the
      torch fused path measured 1.23x the seed code at (64,256,56,56) on an H100 but 0.86x at
      (128,1024,14,14) (torch 2.11, issue 9). ``"triton"`` once
      :data:`TRITON_MEASURED_FASTER_ON_CUDA` is set by a GPU benchmark.
    - anything else: ``"plain"``.

    An explicit ``"torch"`` traces the plain operations under ``torch.compile`` (its custom
    autograd functions hand gradients over through Python state that a graph cannot hold).
    """
    if requested != "auto":
        if requested == "torch" and torch.compiler.is_compiling():
            return "plain"
        return requested
    device = x.device.type
    if device == "cuda":
        if TRITON_MEASURED_FASTER_ON_CUDA:
            return "triton"
        if torch.compiler.is_compiling():
            return "plain"
        if block == "coord" and x.shape[-1] * x.shape[-2] >= 32 * 32:
            return "torch"
        return "plain"
    if device == "cpu" and not torch.compiler.is_compiling():
        return "torch"
    return "plain"


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
