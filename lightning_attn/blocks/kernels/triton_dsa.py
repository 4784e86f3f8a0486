"""DynamicSpatialAttention's full-size work as Triton kernels and ``torch.library`` custom ops.

==========================  ================================================================
function                    computes
==========================  ================================================================
:func:`dsa_summary`         ``x (B,C,H,W) -> s (B,2,H,W) = [mean_C x, max_C x]``; saves the
                            first maximal channel (the index ``torch.max(x, 1)`` returns) as
                            int32 ``(B,1,H,W)``
:func:`dsa_summary_linked`  the same, and a :class:`DsaLink` for :func:`dsa_apply`
:func:`dsa_apply`           ``y = x * mask``, ``mask (B,1,H,W)``
==========================  ================================================================

One gradient buffer, four backward passes. ``x`` enters two ops, the summary and the apply;
left to autograd, each would write its own full-size part of ``grad_x`` and autograd would
add them (read both, write one). Linked (what the block does), the apply's backward reads
``grad_y`` and ``x`` once for ``grad_mask = sum_C(grad_y * x)`` and writes no ``grad_x``;
it hands ``grad_y`` and the mask to the summary's backward as the gradients of two extra
outputs of the summary op (the link's *carriers*: ``(B,C,H,W)`` and ``(B*H*W,)`` tensors
with all strides 0, one element each). Autograd runs the summary's backward last (everything
else depends on ``s``), and it writes ``grad_x = grad_y * mask + grad_mean / C + [c ==
argmax] * grad_max`` in one pass. Everything travels as autograd gradients of custom-op
outputs: ``torch.compile`` traces it (no Python-side state between the two backwards).

==================  ========  ========  ================================================
op                  forward   backward  detail (passes over full-size memory)
==================  ========  ========  ================================================
``dsa_summary``     1         2         reads ``grad_y``, writes ``grad_x`` (linked);
                                        unlinked: writes its part of ``grad_x`` (1)
``dsa_apply``       2         2         reads ``grad_y`` and ``x`` for ``grad_mask``;
                                        unlinked: also writes its part of ``grad_x`` (3)
==================  ========  ========  ================================================

Linked: 3 passes forward, 4 backward (the floor: the map gradients need ``grad_y`` and
``x`` before ``grad_x`` can be written). Unlinked (the public ops used on their own): 3 + 6,
plus autograd's addition.

Small maps. The reductions over ``C`` (sum, max, first argmax; ``grad_mask``'s sum) split
``C`` across programs when ``B * ceil(H*W / BLOCK_S)`` programs would leave the GPU idle
(fewer than 4 per SM): each program reduces a range of channels into partial maps, and a
second kernel combines the ranges in channel order (deterministic; the first maximal
channel across ranges is the first overall). (128,1024,14,14) runs 640 programs instead
of 128 and (8,2048,7,7) 512 instead of 8 on a 132-SM GPU.

Tiles: ``[BLOCK_C, BLOCK_S]`` over ``C`` and the flattened ``H*W``; NCHW takes 256
contiguous pixels and 8 channels per step (16-byte loads, declared aligned by
``tl.multiple_of`` when ``H*W`` allows: 196 = 4 * 49 gives 16-byte float32 loads at 14x14),
channels_last 64 contiguous channels and 32 pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import check_triton_input
from .triton_common import (
    ACC_ADD,
    ACC_MAX,
    ACC_MIN,
    DOUBLE_BACKWARD,
    LaunchCache,
    LaunchConfig,
    acc_dtype,
    acc_torch,
    cdiv,
    check_span,
    launch,
    launch_config,
    launch_guard,
    min_programs,
    next_pow2,
    tensor_key,
    tile_sizes,
    vector_width,
    zero_stride,
)

__all__ = ["DsaLink", "dsa_apply", "dsa_summary", "dsa_summary_linked"]

#: What autotune keys the DSA kernels on (besides the tensors' dtypes).
_KEY = ["C", "HW_V", "VEC", "BLOCK_C", "BLOCK_S"]


class DsaLink(NamedTuple):
    """The carriers through which :func:`dsa_apply`'s backward hands ``grad_y`` and the
    mask to :func:`dsa_summary_linked`'s backward (outputs of the summary op, all strides 0).
    """

    grad_y: Tensor
    mask: Tensor


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _pixels(pid, HW, W, n_sblk, n_split, BLOCK_S: tl.constexpr):
    """Program ``pid``'s sample ``b`` (int64), channel range ``split``, and ``BLOCK_S``
    flattened ``H*W`` offsets with their in-range mask and ``(h, w)`` (unused, and removed
    by the compiler, when a tensor's pixels fold into one stride)."""
    split = pid % n_split
    rest = pid // n_split
    b = (rest // n_sblk).to(tl.int64)
    offs_s = (rest % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S)
    return b, split, offs_s, offs_s < HW, offs_s // W, offs_s % W


@triton.jit
def _pix(offs_s, h, w, sh, sw, FLAT: tl.constexpr):
    return offs_s * sw if FLAT else h * sh + w * sw


@triton.jit
def _planes(b, offs_c, sb, sc, VEC: tl.constexpr):
    """Channel-plane offsets ``b * sb + c * sc`` (int64), declared multiples of ``VEC``
    (checked on the host) so that runs of pixels load ``VEC`` elements at a time."""
    planes = b * sb + offs_c * sc
    if VEC > 1:  # only then: the hint replaces what the compiler knows (contiguity in C too)
        planes = tl.multiple_of(planes, VEC)
    return planes


@triton.jit
def _dsa_summary_kernel(
    x_ptr, s_ptr, arg_ptr, psum_ptr, pmax_ptr, parg_ptr,
    B, C, HW_V, W, n_sblk, n_split, c_per_split,
    sxb, sxc, sxh, sxw,
    FLAT: tl.constexpr, VEC: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    HW = HW_V * VEC
    b, split, offs_s, s_in, h, w = _pixels(tl.program_id(0), HW, W, n_sblk, n_split, BLOCK_S)
    pix = _pix(offs_s, h, w, sxh, sxw, FLAT)
    c_lo = split * c_per_split
    c_hi = tl.minimum(C, c_lo + c_per_split)
    STEP: tl.constexpr = (BLOCK_C + TILE_DIV - 1) // TILE_DIV
    # Per-lane accumulators, reduced across lanes once at the end. ``C`` marks "none yet".
    acc_sum = tl.zeros((STEP, BLOCK_S), ACC)
    acc_max = tl.full((STEP, BLOCK_S), float("-inf"), ACC)
    acc_arg = tl.zeros((STEP, BLOCK_S), tl.int32) + C
    acc_nan = tl.zeros((STEP, BLOCK_S), tl.int32) + C  # first NaN channel
    for c0 in tl.range(c_lo, c_hi, STEP, num_stages=NUM_STAGES):
        offs_c = c0 + tl.arange(0, STEP)
        inside = (offs_c < c_hi)[:, None] & s_in[None, :]
        planes = _planes(b, offs_c, sxb, sxc, VEC)
        v = tl.load(x_ptr + planes[:, None] + pix[None, :], mask=inside, other=0.0).to(ACC)
        channel = tl.broadcast_to(offs_c[:, None], (STEP, BLOCK_S))
        acc_sum += v
        is_nan = v != v
        acc_nan = tl.minimum(acc_nan, tl.where(inside & is_nan, channel, C))
        # Strictly greater keeps the earliest channel of each lane; the first valid value
        # seeds the lane, so an all -inf pixel still names its first channel like torch.max.
        take = inside & (v == v) & ((v > acc_max) | (acc_arg == C))
        acc_max = tl.where(take, v, acc_max)
        acc_arg = tl.where(take, channel, acc_arg)

    total = tl.reduce(acc_sum, 0, ACC_ADD)
    best = tl.reduce(acc_max, 0, ACC_MAX)
    arg = tl.reduce(tl.where((acc_max == best[None, :]) & (acc_arg < C), acc_arg, C), 0,
                    ACC_MIN)
    first_nan = tl.reduce(acc_nan, 0, ACC_MIN)
    has_nan = first_nan < C
    best = tl.where(has_nan, float("nan"), best)
    arg = tl.where(has_nan, first_nan, arg)
    if SPLIT:  # partial maps of this channel range, combined by _dsa_summary_combine_kernel
        at = (split.to(tl.int64) * B + b) * HW + offs_s
        tl.store(psum_ptr + at, total, mask=s_in)
        tl.store(pmax_ptr + at, best, mask=s_in)
        tl.store(parg_ptr + at, arg, mask=s_in)
    else:
        out = s_ptr + b * 2 * HW + offs_s
        tl.store(out, (total / C).to(s_ptr.dtype.element_ty), mask=s_in)
        tl.store(out + HW, best.to(s_ptr.dtype.element_ty), mask=s_in)
        tl.store(arg_ptr + b * HW + offs_s, arg, mask=s_in)


@triton.jit
def _dsa_summary_combine_kernel(
    psum_ptr, pmax_ptr, parg_ptr, s_ptr, arg_ptr,
    C, HW, N, n_split,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """The channel ranges' partial sums, maxima and argmaxima, combined in channel order:
    the same result as one program looping over all of ``C``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    total = tl.zeros((BLOCK,), ACC)
    best = tl.full((BLOCK,), float("-inf"), ACC)
    arg = tl.zeros((BLOCK,), tl.int32) + C
    nan_arg = tl.zeros((BLOCK,), tl.int32) + C
    at = offs  # int64: n_split * N may pass 2**31
    for _ in range(0, n_split):
        total += tl.load(psum_ptr + at, mask=ok, other=0.0)
        v = tl.load(pmax_ptr + at, mask=ok, other=0.0)
        a = tl.load(parg_ptr + at, mask=ok, other=0)
        nan_arg = tl.where((nan_arg == C) & (v != v), a, nan_arg)
        take = (v == v) & ((v > best) | (arg == C))
        best = tl.where(take, v, best)
        arg = tl.where(take, a, arg)
        at += N
    has_nan = nan_arg < C
    best = tl.where(has_nan, float("nan"), best)
    arg = tl.where(has_nan, nan_arg, arg)
    out = s_ptr + (offs // HW) * 2 * HW + offs % HW
    tl.store(out, (total / C).to(s_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HW, best.to(s_ptr.dtype.element_ty), mask=ok)
    tl.store(arg_ptr + offs, arg, mask=ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, n_split, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum_i part[i]`` over the channel ranges, in order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    total = tl.zeros((BLOCK,), ACC)
    at = offs  # int64: n_split * N may pass 2**31
    for _ in range(0, n_split):
        total += tl.load(part_ptr + at, mask=ok, other=0.0)
        at += N
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dsa_summary_backward_kernel(
    gs_ptr, arg_ptr, gy_ptr, m_ptr, gx_ptr,
    C, HW_V, W, n_sblk, n_split, c_per_split,
    sgyb, sgyc, sgyh, sgyw,
    sgxb, sgxc, sgxh, sgxw,
    FLAT_GY: tl.constexpr, FLAT_GX: tl.constexpr, LINKED: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    """``grad_x = grad_mean / C + [c == argmax] * grad_max`` (``+ grad_y * mask`` linked)."""
    HW = HW_V * VEC
    b, split, offs_s, s_in, h, w = _pixels(tl.program_id(0), HW, W, n_sblk, n_split, BLOCK_S)
    gs = gs_ptr + b * 2 * HW + offs_s
    g_mean = tl.load(gs, mask=s_in, other=0.0).to(ACC) / C
    g_max = tl.load(gs + HW, mask=s_in, other=0.0).to(ACC)
    arg = tl.load(arg_ptr + b * HW + offs_s, mask=s_in, other=-1)
    if LINKED:
        mask = tl.load(m_ptr + b * HW + offs_s, mask=s_in, other=0.0).to(ACC)
        gy_pix = _pix(offs_s, h, w, sgyh, sgyw, FLAT_GY)
    gx_pix = _pix(offs_s, h, w, sgxh, sgxw, FLAT_GX)
    c_lo = split * c_per_split
    c_hi = tl.minimum(C, c_lo + c_per_split)
    STEP: tl.constexpr = (BLOCK_C + TILE_DIV - 1) // TILE_DIV
    for c0 in tl.range(c_lo, c_hi, STEP, num_stages=NUM_STAGES):
        offs_c = c0 + tl.arange(0, STEP)
        inside = (offs_c < c_hi)[:, None] & s_in[None, :]
        # where, not a product: a NaN max gradient reaches only the argmax channel.
        g = g_mean[None, :] + tl.where(offs_c[:, None] == arg[None, :], g_max[None, :], 0.0)
        if LINKED:
            gy_at = _planes(b, offs_c, sgyb, sgyc, VEC)[:, None] + gy_pix[None, :]
            g += tl.load(gy_ptr + gy_at, mask=inside, other=0.0).to(ACC) * mask[None, :]
        gx_at = _planes(b, offs_c, sgxb, sgxc, VEC)[:, None] + gx_pix[None, :]
        tl.store(gx_ptr + gx_at, g.to(gx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dsa_apply_kernel(
    x_ptr, m_ptr, y_ptr,
    C, HW_V, W, n_sblk, n_split, c_per_split,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    FLAT_X: tl.constexpr, FLAT_Y: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    HW = HW_V * VEC
    b, split, offs_s, s_in, h, w = _pixels(tl.program_id(0), HW, W, n_sblk, n_split, BLOCK_S)
    mask = tl.load(m_ptr + b * HW + offs_s, mask=s_in, other=0.0).to(ACC)
    x_pix = _pix(offs_s, h, w, sxh, sxw, FLAT_X)
    y_pix = _pix(offs_s, h, w, syh, syw, FLAT_Y)
    c_lo = split * c_per_split
    c_hi = tl.minimum(C, c_lo + c_per_split)
    STEP: tl.constexpr = (BLOCK_C + TILE_DIV - 1) // TILE_DIV
    for c0 in tl.range(c_lo, c_hi, STEP, num_stages=NUM_STAGES):
        offs_c = c0 + tl.arange(0, STEP)
        inside = (offs_c < c_hi)[:, None] & s_in[None, :]
        x_at = _planes(b, offs_c, sxb, sxc, VEC)[:, None] + x_pix[None, :]
        v = tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
        y_at = _planes(b, offs_c, syb, syc, VEC)[:, None] + y_pix[None, :]
        tl.store(y_ptr + y_at, (v * mask[None, :]).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dsa_apply_backward_kernel(
    gy_ptr, x_ptr, m_ptr, gx_ptr, gm_ptr, pgm_ptr, mcopy_ptr,
    B, C, HW_V, W, n_sblk, n_split, c_per_split,
    sgyb, sgyc, sgyh, sgyw,
    sxb, sxc, sxh, sxw,
    sgxb, sgxc, sgxh, sgxw,
    FLAT_GY: tl.constexpr, FLAT_X: tl.constexpr, FLAT_GX: tl.constexpr,
    WRITE_GX: tl.constexpr, WRITE_GM: tl.constexpr, COPY_MASK: tl.constexpr,
    SPLIT: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    """``grad_mask = sum_C(grad_y * x)`` (partial per channel range when ``SPLIT``);
    unlinked also ``grad_x = grad_y * mask``; linked, the mask in the accumulation dtype
    for the summary's backward (``COPY_MASK``)."""
    HW = HW_V * VEC
    b, split, offs_s, s_in, h, w = _pixels(tl.program_id(0), HW, W, n_sblk, n_split, BLOCK_S)
    mask = tl.load(m_ptr + b * HW + offs_s, mask=s_in, other=0.0).to(ACC)
    if COPY_MASK:
        # by the first channel range only (a tensor condition: the interpreter wants one)
        tl.store(mcopy_ptr + b * HW + offs_s, mask, mask=s_in & (offs_s * 0 + split == 0))
    gy_pix = _pix(offs_s, h, w, sgyh, sgyw, FLAT_GY)
    x_pix = _pix(offs_s, h, w, sxh, sxw, FLAT_X)
    gx_pix = _pix(offs_s, h, w, sgxh, sgxw, FLAT_GX)
    c_lo = split * c_per_split
    c_hi = tl.minimum(C, c_lo + c_per_split)
    STEP: tl.constexpr = (BLOCK_C + TILE_DIV - 1) // TILE_DIV
    acc = tl.zeros((STEP, BLOCK_S), ACC)
    for c0 in tl.range(c_lo, c_hi, STEP, num_stages=NUM_STAGES):
        offs_c = c0 + tl.arange(0, STEP)
        inside = (offs_c < c_hi)[:, None] & s_in[None, :]
        gy_at = _planes(b, offs_c, sgyb, sgyc, VEC)[:, None] + gy_pix[None, :]
        gy = tl.load(gy_ptr + gy_at, mask=inside, other=0.0).to(ACC)
        if WRITE_GX:
            gx_at = _planes(b, offs_c, sgxb, sgxc, VEC)[:, None] + gx_pix[None, :]
            tl.store(gx_ptr + gx_at, (gy * mask[None, :]).to(gx_ptr.dtype.element_ty),
                     mask=inside)
        if WRITE_GM:
            x_at = _planes(b, offs_c, sxb, sxc, VEC)[:, None] + x_pix[None, :]
            acc += gy * tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
    if WRITE_GM:
        total = tl.reduce(acc, 0, ACC_ADD)
        if SPLIT:
            tl.store(pgm_ptr + (split.to(tl.int64) * B + b) * HW + offs_s, total, mask=s_in)
        else:
            tl.store(gm_ptr + b * HW + offs_s, total.to(gm_ptr.dtype.element_ty), mask=s_in)


# ------------------------------------------------------------------------------------------
# Launch parameters
# ------------------------------------------------------------------------------------------

_CACHE = LaunchCache()
#: Pixels per program of the split-combining kernels.
_COMBINE_BLOCK = 1024


def _pixel_strides(t: Tensor) -> tuple[tuple[int, int, int, int], bool]:
    """``(stride_b, stride_c, stride_h, stride_w)`` and whether ``H, W`` fold into one index
    (then the last entry is the folded stride)."""
    sb, sc, sh, sw = t.stride()
    _, _, h, w = t.shape
    if w == 1:
        return (sb, sc, sh, sh), True
    if h == 1 or sh == w * sw:
        return (sb, sc, sh, sw), True
    return (sb, sc, sh, sw), False


def _channels_fast(x: Tensor) -> bool:
    """Whether ``C`` is the contiguous dimension (channels_last) rather than ``W``."""
    return x.stride(1) == 1 and x.shape[1] > 1 and x.stride(3) != 1


def dsa_tiles(x: Tensor) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)``: long contiguous runs along whichever of C and H*W is
    contiguous, about ``elements`` per step."""
    sizes = tile_sizes(x)
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    if _channels_fast(x):
        block_c = min(next_pow2(c), sizes.dsa_channels)
        block_s = min(next_pow2(hw), max(1, sizes.elements // block_c))
    else:
        block_s = min(next_pow2(hw), sizes.dsa_pixels)
        block_c = min(next_pow2(c), max(1, sizes.elements // block_s))
    return block_c, block_s


def _vec(tensors: tuple[Tensor, ...], flats: tuple[bool, ...]) -> int:
    """Vector width of the pixel runs: only when every tensor's pixels are one unit-stride
    run (NCHW) and ``W > 1`` (a folded ``W == 1`` stride is ``H``'s)."""
    x = tensors[0]
    if x.shape[3] == 1 or not all(flats) or _channels_fast(x):
        return 1
    return vector_width(tensors, (0, 1), 3, x.shape[2] * x.shape[3])


class _Grid(NamedTuple):
    grid: tuple[int]
    block_c: int
    block_s: int
    n_sblk: int
    n_split: int
    c_per_split: int
    #: the looped kernels' configuration: a ``BLOCK_C * BLOCK_S`` step, ``c_per_split /
    #: BLOCK_C`` steps per program
    config: LaunchConfig


def _grid(x: Tensor) -> _Grid:
    """Programs over (sample, pixel block, channel range): ``C`` is split into ranges of
    whole ``BLOCK_C`` steps when the pixel blocks alone would make too few programs; the
    launch configuration follows from the step and the steps per range."""
    b, c, h, w = x.shape
    block_c, block_s = dsa_tiles(x)
    n_sblk = cdiv(h * w, block_s)
    programs = b * n_sblk
    n_split, per_split = 1, c
    target = min_programs(x)
    steps = cdiv(c, block_c)
    if programs < target and steps > 1:
        per_split = cdiv(steps, min(steps, cdiv(target, programs))) * block_c
        n_split = cdiv(c, per_split)
    config = launch_config(block_c * block_s, cdiv(per_split, block_c))
    return _Grid((programs * n_split,), block_c, block_s, n_sblk, n_split, per_split, config)


def _params(kind: str, tensors: tuple[Tensor, ...], extra: tuple = ()):
    """Memoised ``(grid, strides, flats, vec)`` of a launch over ``tensors`` (full-size;
    the first is the one whose layout sets the tiles)."""

    def compute():
        grid = _grid(tensors[0])
        strides, flats = zip(*(_pixel_strides(t) for t in tensors), strict=True)
        return grid, tuple(s for st in strides for s in st), flats, _vec(tensors, flats)

    return _CACHE.get((kind, extra, *(tensor_key(t) for t in tensors)), compute)


def _combine_grid(n: int) -> tuple[int]:
    return (cdiv(n, _COMBINE_BLOCK),)


# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------


def _summary_outputs(x: Tensor):
    b, c, h, w = x.shape
    return (
        x.new_empty((b, 2, h, w)),
        x.new_empty((b, 1, h, w), dtype=torch.int32),
        # The carriers: what the apply's backward hands over arrives as their gradients.
        zero_stride((b, c, h, w), x, x.dtype),
        zero_stride((b * h * w,), x, acc_torch(x)),
    )


def _dsa_summary_impl(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s, arg, carry_gy, carry_mask = _summary_outputs(x)
    if x.numel() == 0:
        return s, arg, carry_gy, carry_mask
    check_triton_input(x, "lightning_attn::dsa_summary")
    check_span(x, "x")
    b, c, h, w = x.shape
    g, strides, (flat,), vec = _params("summary", (x,))
    split = g.n_split > 1
    acc = acc_torch(x)
    parts = [x.new_empty((g.n_split, b, h * w), dtype=t) if split else s
             for t in (acc, acc, torch.int32)]
    with launch_guard(x):
        launch(
            _dsa_summary_kernel, g.grid, x.device,
            (x, s, arg, *parts, b, c, h * w // vec, w, g.n_sblk, g.n_split, g.c_per_split,
             *strides),
            dict(FLAT=flat, VEC=vec, SPLIT=split, ACC=acc_dtype(x), BLOCK_C=g.block_c,
                 BLOCK_S=g.block_s),
            _KEY, g.config,
        )
        if split:
            n = b * h * w
            launch(
                _dsa_summary_combine_kernel, _combine_grid(n), x.device,
                (*parts, s, arg, c, h * w, n, g.n_split),
                dict(ACC=acc_dtype(x), BLOCK=_COMBINE_BLOCK),
            )
    return s, arg, carry_gy, carry_mask


_dsa_summary = torch.library.custom_op(
    "lightning_attn::dsa_summary", mutates_args=()
)(_dsa_summary_impl)


@_dsa_summary.register_fake
def _(x: Tensor):
    return _summary_outputs(x)


def _dsa_summary_backward_impl(
    grad_s: Tensor, arg: Tensor, x: Tensor, grad_y: Tensor | None, mask: Tensor | None
) -> Tensor:
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    b, c, h, w = x.shape
    linked = grad_y is not None
    gy = grad_y if linked else grad_x  # an unused pointer when not linked
    if linked:
        check_span(grad_y, "grad_y")
    g, strides, (_, flat_gy, flat_gx), vec = _params("summary_bwd", (x, gy, grad_x))
    with launch_guard(x):
        launch(
            _dsa_summary_backward_kernel, g.grid, x.device,
            (grad_s.contiguous(), arg, gy, mask if linked else grad_s, grad_x,
             c, h * w // vec, w, g.n_sblk, g.n_split, g.c_per_split, *strides[4:]),
            dict(FLAT_GY=flat_gy, FLAT_GX=flat_gx, LINKED=linked, VEC=vec,
                 ACC=acc_dtype(grad_s, gy), BLOCK_C=g.block_c, BLOCK_S=g.block_s),
            _KEY, g.config,
        )
    return grad_x


_dsa_summary_backward = torch.library.custom_op(
    "lightning_attn::dsa_summary_backward", mutates_args=()
)(_dsa_summary_backward_impl)


@_dsa_summary_backward.register_fake
def _(grad_s, arg, x, grad_y, mask):
    return torch.empty_like(x)


def _dsa_summary_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs
    (x,) = inputs
    ctx.save_for_backward(x, output[1])


def _dsa_summary_grad(ctx, grad_s: Tensor, _grad_arg, grad_y: Tensor | None, mask):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)
    x, arg = ctx.saved_tensors
    if grad_s is None:  # s took no part in the loss: only y's gradient reaches x
        grad_s = x.new_zeros((x.shape[0], 2, *x.shape[2:]))
    if grad_y is None or mask is None:
        grad_y = mask = None
    return torch.ops.lightning_attn.dsa_summary_backward(grad_s, arg, x, grad_y, mask)


_dsa_summary.register_autograd(_dsa_summary_grad, setup_context=_dsa_summary_setup)


def _dsa_apply_impl(
    x: Tensor, mask: Tensor, carry_gy: Tensor | None, carry_mask: Tensor | None
) -> Tensor:
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, mask.dtype))
    if x.numel() == 0:
        return y
    check_triton_input(x, "lightning_attn::dsa_apply")
    check_span(x, "x")
    b, c, h, w = x.shape
    g, strides, (flat_x, flat_y), vec = _params("apply", (x, y))
    with launch_guard(x):
        launch(
            _dsa_apply_kernel, g.grid, x.device,
            (x, mask.contiguous(), y, c, h * w // vec, w, g.n_sblk, g.n_split, g.c_per_split,
             *strides),
            dict(FLAT_X=flat_x, FLAT_Y=flat_y, VEC=vec, ACC=acc_dtype(x, mask),
                 BLOCK_C=g.block_c, BLOCK_S=g.block_s),
            _KEY, g.config,
        )
    return y


_dsa_apply = torch.library.custom_op(
    "lightning_attn::dsa_apply", mutates_args=()
)(_dsa_apply_impl)


@_dsa_apply.register_fake
def _(x, mask, carry_gy, carry_mask):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, mask.dtype))


def _apply_backward_outputs(x, mask, need_x, need_mask, linked):
    grad_x = torch.empty_like(x) if need_x and not linked else x.new_empty(0)
    grad_mask = (torch.empty_like(mask, memory_format=torch.contiguous_format) if need_mask
                 else mask.new_empty(0))
    b, _, h, w = x.shape
    mask_copy = (x.new_empty((b * h * w,), dtype=acc_torch(x)) if need_x and linked
                 else x.new_empty(0))
    return grad_x, grad_mask, mask_copy


def _dsa_apply_backward_impl(
    grad_y: Tensor, x: Tensor, mask: Tensor, need_x: bool, need_mask: bool, linked: bool
) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_mask, mask_copy = _apply_backward_outputs(x, mask, need_x, need_mask, linked)
    write_gx = need_x and not linked
    copy_mask = need_x and linked
    if x.numel() == 0 or not (need_x or need_mask):
        return grad_x, grad_mask.zero_(), mask_copy
    check_span(grad_y, "grad_y")
    b, c, h, w = x.shape
    gx = grad_x if write_gx else x  # an unused pointer
    g, strides, (flat_x, flat_gy, flat_gx), vec = _params(
        "apply_bwd", (x, grad_y, gx), (write_gx,)
    )
    split = need_mask and g.n_split > 1
    partial = (x.new_empty((g.n_split, b, h * w), dtype=acc_torch(grad_y, x)) if split
               else grad_mask)
    with launch_guard(x):
        launch(
            _dsa_apply_backward_kernel, g.grid, x.device,
            (grad_y, x, mask.contiguous(), gx, grad_mask if need_mask else x, partial,
             mask_copy if copy_mask else x,
             b, c, h * w // vec, w, g.n_sblk, g.n_split, g.c_per_split,
             *strides[4:8], *strides[0:4], *strides[8:]),
            dict(FLAT_GY=flat_gy, FLAT_X=flat_x, FLAT_GX=flat_gx, WRITE_GX=write_gx,
                 WRITE_GM=need_mask, COPY_MASK=copy_mask, SPLIT=split, VEC=vec,
                 ACC=acc_dtype(grad_y, x, mask), BLOCK_C=g.block_c, BLOCK_S=g.block_s),
            _KEY, g.config,
        )
        if split:
            n = b * h * w
            launch(
                _sum_splits_kernel, _combine_grid(n), x.device,
                (partial, grad_mask, n, g.n_split),
                dict(ACC=acc_dtype(grad_y, x, mask), BLOCK=_COMBINE_BLOCK),
            )
    return grad_x, grad_mask, mask_copy


_dsa_apply_backward = torch.library.custom_op(
    "lightning_attn::dsa_apply_backward", mutates_args=()
)(_dsa_apply_backward_impl)


@_dsa_apply_backward.register_fake
def _(grad_y, x, mask, need_x, need_mask, linked):
    return _apply_backward_outputs(x, mask, need_x, need_mask, linked)


def _dsa_apply_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs
    x, mask, carry_gy, _ = inputs
    ctx.linked = carry_gy is not None
    ctx.save_for_backward(x, mask)


def _dsa_apply_grad(ctx, grad_y: Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)
    if grad_y is None:  # y took no part in what is differentiated
        return None, None, None, None
    x, mask = ctx.saved_tensors
    need_x, need_mask, need_link, _ = ctx.needs_input_grad
    linked = ctx.linked and need_link
    grad_x, grad_mask, mask_copy = torch.ops.lightning_attn.dsa_apply_backward(
        grad_y, x, mask, need_x or linked, need_mask, linked
    )
    if linked:  # grad_x is written by the summary's backward, from grad_y and the mask
        return None, (grad_mask if need_mask else None), grad_y, mask_copy
    return (grad_x if need_x else None), (grad_mask if need_mask else None), None, None


_dsa_apply.register_autograd(_dsa_apply_grad, setup_context=_dsa_apply_setup)


# ------------------------------------------------------------------------------------------
# Public functions (what the block calls)
# ------------------------------------------------------------------------------------------


def check_x(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point (B, C, H, W) tensor, got shape {tuple(x.shape)} "
            f"and dtype {x.dtype}"
        )


def check_map(name: str, t: Tensor, shape: tuple[int, ...], x: Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def dsa_summary(x: Tensor) -> Tensor:
    """``x (B,C,H,W) -> s (B,2,H,W)``: ``[mean_C x, max_C x]`` in ``x.dtype`` (contiguous).

    One read of ``x``. The gradient of the max goes to the first maximal channel (the index
    ``torch.max(x, 1)`` returns, kept as int32 ``(B,1,H,W)``), so ReLU zeros tied at the max
    send it to one channel as in the seed.
    """
    check_x(x)
    return torch.ops.lightning_attn.dsa_summary(x)[0]


def dsa_summary_linked(x: Tensor) -> tuple[Tensor, DsaLink]:
    """:func:`dsa_summary` and the :class:`DsaLink` to pass to :func:`dsa_apply` with the
    same ``x``: the backward then writes ``grad_x`` once, in the summary's backward."""
    check_x(x)
    s, _, carry_gy, carry_mask = torch.ops.lightning_attn.dsa_summary(x)
    return s, DsaLink(carry_gy, carry_mask)


def dsa_apply(x: Tensor, mask: Tensor, link: DsaLink | None = None) -> Tensor:
    """``y = x * mask`` with ``mask (B,1,H,W)`` broadcast over ``C``; ``y`` keeps ``x``'s
    layout and has the promoted dtype of ``x`` and ``mask``.

    Backward: ``grad_mask = sum_C(grad_y * x)``, and ``grad_x = grad_y * mask`` — written
    here without ``link``; with the ``link`` of :func:`dsa_summary_linked` (of the same
    ``x``), handed to the summary's backward, which writes the whole ``grad_x``.
    """
    check_x(x)
    b, _, h, w = x.shape
    check_map("mask", mask, (b, 1, h, w), x)
    if link is None:
        return torch.ops.lightning_attn.dsa_apply(x, mask, None, None)
    if not isinstance(link, DsaLink) or tuple(link.grad_y.shape) != tuple(x.shape):
        raise ValueError(
            f"link must be the DsaLink that dsa_summary_linked returned for this x of shape "
            f"{tuple(x.shape)}, got {type(link).__name__}"
        )
    return torch.ops.lightning_attn.dsa_apply(x, mask, link.grad_y, link.mask)


#: Kernels of this module (the sm_90 compile test and the launch count read it).
KERNELS = (
    _dsa_summary_kernel, _dsa_summary_combine_kernel, _sum_splits_kernel,
    _dsa_summary_backward_kernel, _dsa_apply_kernel, _dsa_apply_backward_kernel,
)
_ = triton  # the module's kernels are triton.jit functions
