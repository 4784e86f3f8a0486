"""What the Triton kernels of both blocks share: reductions, launch parameters, tuning.

Host path. Every op computes its launch parameters (grid, tiles, flags) from the shapes,
strides, dtypes and device of its tensors with integer arithmetic only (no
``triton.cdiv``/``next_power_of_2``, ~10 µs each) and memoises them in a :class:`LaunchCache`
keyed on exactly those, so that a repeated shape costs one dictionary look-up. Every launch
runs under :func:`launch_guard`, ``torch.cuda.device(x.device)`` on CUDA: Triton launches on
the *current* device, which is not ``x``'s when ``x`` is on ``cuda:1`` without
``torch.cuda.set_device``.

Configurations. A kernel that loops over ``x`` (``tl.range``) runs with warps, software
pipelining stages and a divisor of the host's tile along the looped dimension
(:class:`LaunchConfig`). By default one fixed configuration per shape class, chosen by
:func:`launch_config` from the launch's own tile size and loop length (integers the host
already has): the same inputs give bitwise the same outputs from call to call, process to
process and rank to rank. ``LIGHTNING_ATTN_TRITON_AUTOTUNE=1`` opts into ``triton.autotune``
over every configuration of :data:`LAUNCH_CONFIGS` on CUDA (:func:`autotune_enabled`): the
first call at a new key times each, and as the configurations sum in different orders
(another tile step, another reduction layout) a tuned result can differ in its last bits
from run to run and rank to rank. Under Triton's interpreter the configuration changes
nothing but the tile divisor, which the rule keeps at 1.

Loads. ``tl.multiple_of`` hints, checked on the host by :func:`vector_width`, tell the
compiler that row (or plane) starts are aligned, so that rows whose width in elements is
not a multiple of 16 (W = 56, 28, 14 in NCHW) still load 16 (or 8) bytes per instruction.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "ACC_ADD",
    "ACC_MAX",
    "ACC_MIN",
    "AUTOTUNE_ENV",
    "DOUBLE_BACKWARD",
    "GPU_TILES",
    "INTERPRETER_TILES",
    "LAUNCH_CONFIGS",
    "LONG_LOOP",
    "Launch",
    "LaunchCache",
    "LaunchConfig",
    "TileSizes",
    "acc_dtype",
    "acc_torch",
    "autotune_enabled",
    "cdiv",
    "check_span",
    "clear_caches",
    "launch",
    "launch_config",
    "launch_guard",
    "min_programs",
    "next_pow2",
    "plan_for_gpu",
    "pow2_divisor",
    "record_launches",
    "select_kernel",
    "shape_class",
    "tensor_key",
    "tile_sizes",
    "vector_width",
    "zero_stride",
]

#: In-sample offsets are 32-bit (checked by :func:`check_span`); sample, plane and
#: split offsets are 64-bit.
MAX_SAMPLE_SPAN = 2**31 - 1

DOUBLE_BACKWARD = (
    "the Triton path of lightning-attn blocks supports first derivatives only; build the "
    "block with backend='plain' for double backward (create_graph=True)"
)


# ------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------


@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


# tl.sum, tl.max and tl.min are jit functions around tl.reduce with these combine functions
# of triton.language.standard. Reducing with them directly compiles to the same code, and
# Triton's interpreter runs it as one numpy call instead of re-patching the language for
# each nested jit call (~4 ms each: most of the tests' time). Our own combine functions
# stand in (correct, only slower in the interpreter) if a Triton release renames them.
ACC_ADD = getattr(tl.standard, "_sum_combine", _add_combine)
ACC_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
ACC_MIN = getattr(tl.standard, "_elementwise_min", _min_combine)


# ------------------------------------------------------------------------------------------
# Integer helpers (the host path's arithmetic)
# ------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, in integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pow2_divisor(*values: int, cap: int) -> int:
    """The largest power of two ``<= cap`` dividing every value (0 is divisible by all)."""
    width = cap
    for v in values:
        while width > 1 and v % width:
            width //= 2
    return width


def vector_width(tensors, outer_dims: tuple[int, ...], unit_dim: int, extent: int) -> int:
    """Elements per vector load that the kernels may declare along ``unit_dim``.

    The compiler loads ``n`` elements at once where it can prove them contiguous, their
    offset a multiple of ``n`` and all of them inside or all outside the mask. The kernels
    declare their row (or plane) offsets ``pb * s_b + pc * s_c [+ h * s_h]`` multiples of
    this width (``tl.multiple_of``), and write the masked extent as ``extent_v * VEC``. Both
    hold when every stride of ``outer_dims`` and ``extent`` (``W`` or ``H*W``) are multiples
    of it, and ``unit_dim`` has stride 1 (or 0: a broadcast). At most 16 bytes of the widest
    dtype involved. (Whether the pointer itself is 16-byte aligned, Triton checks at each
    launch: it specialises pointer arguments on it.)
    """
    widest = max(t.element_size() for t in tensors)
    width = max(1, 16 // widest)
    for t in tensors:
        if t.stride(unit_dim) not in (0, 1):
            return 1
        width = pow2_divisor(*(t.stride(d) for d in outer_dims), extent, cap=width)
    return width


def zero_stride(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor of ``shape`` backed by one element (all strides 0): an autograd carrier."""
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=like.device)


# ------------------------------------------------------------------------------------------
# Launch parameters
# ------------------------------------------------------------------------------------------


def acc_dtype(*tensors: Tensor | None):
    """float64 accumulation when an input is float64, float32 otherwise."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def acc_torch(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if acc_dtype(*tensors) is tl.float64 else torch.float32


def check_span(t: Tensor, name: str) -> None:
    """A clear error when in-sample offsets would not fit the kernels' 32-bit indexing."""
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:], strict=True))
    if span > MAX_SAMPLE_SPAN:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} spans {span} elements per sample; the Triton "
            "kernels index a sample with 32-bit offsets (at most 2**31 - 1): use "
            "backend='torch'"
        )


def launch_guard(t: Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (launch on ``t``'s GPU, not the
    current one), a no-op context otherwise."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def min_programs(t: Tensor) -> int:
    """Programs a launch should have to fill the device: 4 per SM on CUDA; under the
    interpreter a small number, so that the tests' tiny shapes take the split paths."""
    if _PLAN_SMS is not None:
        return 4 * _PLAN_SMS
    if t.device.type == "cuda":
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return INTERPRETER_TILES.min_programs


@dataclass(frozen=True)
class TileSizes:
    """How much of ``x`` one program step loads (powers of two)."""

    #: elements per tile load
    elements: int
    #: DSA, NCHW: contiguous pixels per step
    dsa_pixels: int
    #: DSA, channels_last: contiguous channels per step
    dsa_channels: int
    #: CoordinateAttention, channels_last: channels per program
    coord_channels: int
    #: DSA splits ``C`` across programs below this many programs (CUDA: 4 per SM, see
    #: :func:`min_programs`; this field is the interpreter's)
    min_programs: int


#: CUDA: 2048 elements (8 KB of float32, 16 per thread with 4 warps); runs of 256 pixels
#: (1 KB) or 64 channels (256 B) along the contiguous dimension; 32 channel planes per
#: CoordinateAttention program in channels_last, so that (64, 256, 56, 56) still makes 512
#: programs for 132 SMs.
GPU_TILES = TileSizes(
    elements=2048, dsa_pixels=256, dsa_channels=64, coord_channels=32, min_programs=528
)
#: Triton's interpreter costs per program and per op, hardly per element: on CPU tensors
#: (the tests) eight times larger tiles mean up to eight times fewer programs. The tests that
#: check the kernels' loops over several tiles switch to :data:`GPU_TILES`.
INTERPRETER_TILES = TileSizes(
    elements=16384, dsa_pixels=2048, dsa_channels=512, coord_channels=256, min_programs=4
)


def tile_sizes(x: Tensor) -> TileSizes:
    if x.device.type == "cuda" or _PLAN_SMS is not None:
        return GPU_TILES
    return INTERPRETER_TILES


#: The SM count that launch parameters are planned for as if on CUDA, whatever the tensors'
#: device (set by :func:`plan_for_gpu`; ``None``: plan for the tensors' own device).
_PLAN_SMS: int | None = None
_CACHES: list[LaunchCache] = []


@contextlib.contextmanager
def plan_for_gpu(sm_count: int = 132):
    """Compute launch parameters as on a CUDA device with ``sm_count`` SMs (an H100 SXM has
    132) for tensors of any device: what the sm_90 compile test and the grid-size test use
    to see the kernels a GPU would run, without a GPU."""
    global _PLAN_SMS
    old, _PLAN_SMS = _PLAN_SMS, sm_count
    clear_caches()
    try:
        yield
    finally:
        _PLAN_SMS = old
        clear_caches()


def clear_caches() -> None:
    """Forget every memoised launch parameter (after changing tile sizes or the plan)."""
    for cache in _CACHES:
        cache.clear()


class LaunchCache:
    """Launch parameters memoised per key (shapes, strides, dtypes, device, options).

    Bounded: a model sees a handful of shapes; a pathological caller (a new shape every call)
    cannot grow it without limit.
    """

    def __init__(self, limit: int = 512) -> None:
        self.limit = limit
        self.entries: dict = {}
        _CACHES.append(self)

    def get(self, key, compute):
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.limit:
                self.entries.clear()
            entry = self.entries[key] = compute()
        return entry

    def clear(self) -> None:
        self.entries.clear()


def tensor_key(t: Tensor) -> tuple:
    """What launch parameters may depend on: shape, strides, dtype, device, alignment."""
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.storage_offset() % 16)


# ------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel that loops over ``x`` runs: ``num_warps``, the pipelining stages of its
    ``tl.range`` loop (``NUM_STAGES``) and a divisor of the host's tile along the looped
    dimension (``TILE_DIV``: fewer registers per step, twice the steps)."""

    num_warps: int
    num_stages: int
    tile_div: int

    @property
    def constexprs(self) -> dict[str, int]:
        return {"NUM_STAGES": self.num_stages, "TILE_DIV": self.tile_div}


#: Every configuration a looped kernel can run with: :func:`launch_config` picks one of the
#: first three per shape class; opt-in autotuning times all four at each new key.
LAUNCH_CONFIGS: dict[str, LaunchConfig] = {
    # a loop of one or two steps: a second stage prefetches the next step, a third idles
    "short": LaunchConfig(num_warps=4, num_stages=2, tile_div=1),
    # a longer loop: a third stage keeps two steps of loads in flight
    "long": LaunchConfig(num_warps=4, num_stages=3, tile_div=1),
    # a step larger than the GPU tile (one CoordinateAttention row wider than 2048): twice
    # the warps keep 16 elements per thread and tensor, two stages keep the shared memory of
    # up to three 8192-wide rows in bounds
    "wide": LaunchConfig(num_warps=8, num_stages=2, tile_div=1),
    # autotuning only: half steps, fewer registers per thread
    "halved": LaunchConfig(num_warps=4, num_stages=3, tile_div=2),
}
#: Loop steps from which a launch is "long".
LONG_LOOP = 3
#: The environment variable that opts into autotuning (``1``; ``0`` or unset: the rule).
AUTOTUNE_ENV = "LIGHTNING_ATTN_TRITON_AUTOTUNE"


def shape_class(tile_elements: int, loop_steps: int) -> str:
    """The shape class of a launch whose loop steps over ``tile_elements`` elements of ``x``
    ``loop_steps`` times per program: ``"wide"`` above the GPU tile (:data:`GPU_TILES`),
    else ``"long"`` from :data:`LONG_LOOP` steps, else ``"short"``."""
    if tile_elements < 1 or loop_steps < 0:
        raise ValueError(f"shape_class needs tile_elements >= 1 and loop_steps >= 0, got "
                         f"tile_elements={tile_elements}, loop_steps={loop_steps}")
    if tile_elements > GPU_TILES.elements:
        return "wide"
    return "long" if loop_steps >= LONG_LOOP else "short"


def launch_config(tile_elements: int, loop_steps: int) -> LaunchConfig:
    """The one configuration that runs by default for such a launch (see :func:`shape_class`)."""
    return LAUNCH_CONFIGS[shape_class(tile_elements, loop_steps)]


def gpu_configs() -> list[triton.Config]:
    """What ``triton.autotune`` tries on CUDA when opted in: :data:`LAUNCH_CONFIGS`."""
    return [triton.Config(c.constexprs, num_warps=c.num_warps) for c in LAUNCH_CONFIGS.values()]


_TUNED: dict = {}


def autotune_enabled() -> bool:
    """Whether ``LIGHTNING_ATTN_TRITON_AUTOTUNE=1`` opts into autotuning on CUDA (read at
    each launch; off by default: one fixed configuration per shape class)."""
    value = os.environ.get(AUTOTUNE_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{AUTOTUNE_ENV} must be 1 (autotune) or 0 (the fixed "
                         f"configuration per shape class), got {value!r}")
    return value == "1"


def select_kernel(kernel, key: list[str], device: torch.device, config: LaunchConfig):
    """``(kernel to launch, extra launch kwargs)``: ``config`` (the rule's) by default, the
    autotuned wrapper over :data:`LAUNCH_CONFIGS` on CUDA when opted in."""
    if device.type == "cuda" and autotune_enabled():
        tuned = _TUNED.get(kernel)
        if tuned is None:
            tuned = _TUNED[kernel] = triton.autotune(configs=gpu_configs(), key=key)(kernel)
        return tuned, {}
    return kernel, {**config.constexprs, "num_warps": config.num_warps}


# ------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One kernel launch as planned: what :func:`record_launches` collects."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    #: the rule's configuration (looped kernels; ``None``: Triton's defaults)
    config: LaunchConfig | None
    tuned_key: list[str] | None


_RECORDING: list[Launch] | None = None


@contextlib.contextmanager
def record_launches():
    """Collect the launches the ops plan instead of running them (with ``meta`` tensors the
    ops then run without data): the sm_90 compile test compiles exactly these."""
    global _RECORDING
    old, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = old


def launch(
    kernel,
    grid: tuple[int, ...],
    device: torch.device,
    args: tuple,
    constexprs: dict,
    tuned_key: list[str] | None = None,
    config: LaunchConfig | None = None,
) -> None:
    """Launch ``kernel`` on ``grid``: the one place every kernel of both blocks starts.

    A looped kernel passes its autotune ``tuned_key`` and the rule's ``config``
    (:func:`select_kernel`); the others run with Triton's defaults.
    """
    if (tuned_key is None) != (config is None):
        raise ValueError(f"launch of {kernel}: tuned_key and config go together")
    if _RECORDING is not None:
        _RECORDING.append(Launch(kernel, grid, args, dict(constexprs), config, tuned_key))
        return
    fn, extra = kernel, {}
    if config is not None:
        fn, extra = select_kernel(kernel, tuned_key, device, config)
    fn[grid](*args, **constexprs, **extra)
