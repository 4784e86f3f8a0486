"""CoordinateAttention's full-size work as Triton kernels and ``torch.library`` custom ops.

=============================  =============================================================
function                       computes
=============================  =============================================================
:func:`coord_pool`             ``x_h = mean_W x (B,C,H,1)``, ``x_w = mean_H x (B,C,1,W)``;
                               with ``with_max``, ``(mean + max) / 2`` along each axis
                               (add-on 1)
:func:`coord_pool_linked`      the same, and a :class:`CoordLink` for :func:`coord_scale`
:func:`coord_scale`            ``y = x * (c + k * u_h * u_w)``, ``u_h (B,C,H,1)``,
                               ``u_w (B,C,1,W)``; ``c`` and ``k`` 0-d tensors or Python
                               numbers (``c=None``: 0, ``k=None``: 1)
=============================  =============================================================

One gradient buffer, four backward passes (five with ``with_max``). Linked (what the block
does), the scale's backward reads ``grad_y`` and ``x`` once for the map gradients
(``sum_W(grad_y x u_w)``, ``sum_H(grad_y x u_h)``, ``sum(grad_y x)``) and writes no
``grad_x``; it hands ``grad_y`` and the pieces of the scale (``k * u_h``, ``u_w`` and ``c``,
packed into one small float32 vector) to the pool's backward as the gradients of two extra
outputs of the pool op (carriers with all strides 0). The pool's backward runs last and
writes ``grad_x = grad_y * (c + k u_h u_w) + grad_h / W + grad_w / H`` (+ the max terms,
which read ``x`` for the ties) in one pass. All of it travels as autograd gradients of
custom-op outputs, which ``torch.compile`` traces.

Tiles: ``[BLOCK_C, BLOCK_H, BLOCK_W]`` of whole rows (``BLOCK_W`` is ``W`` rounded up to a
power of two, at most 8192); a program owns ``BLOCK_C`` channel planes (of one sample, or of
consecutive samples when ``C`` is smaller than a block) and loops down ``H``, so both
reductions finish inside it without atomics (deterministic). NCHW rows start at offsets
declared multiples of the largest power of two dividing ``W`` and the strides (host-checked
``tl.multiple_of``), so W = 56 and 28 load 16 bytes of float32 at a time and 14 eight (a
7-wide row cannot be aligned: 4 bytes).
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
    next_pow2,
    tensor_key,
    tile_sizes,
    vector_width,
    zero_stride,
)
from .triton_dsa import check_map, check_x

__all__ = ["CoordLink", "coord_pool", "coord_pool_linked", "coord_scale"]

#: Widest row (``W`` rounded up to a power of two) a CoordinateAttention kernel holds.
MAX_ROW = 8192
#: What autotune keys the CoordinateAttention kernels on (besides the tensors' dtypes).
_KEY = ["C", "H", "W_V", "VEC", "FOLD", "BLOCK_C", "BLOCK_H", "BLOCK_W"]


class CoordLink(NamedTuple):
    """The carriers through which :func:`coord_scale`'s backward hands ``grad_y`` and the
    scale's pieces to :func:`coord_pool_linked`'s backward (pool outputs, all strides 0)."""

    grad_y: Tensor
    pieces: Tensor


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _coord_planes(pid, C, n_planes, FOLD: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``(b, c)`` planes program ``pid`` owns: ``(plane, b, c, in_range)``, ``BLOCK_C``
    each, ``plane`` and ``b`` int64.

    With ``FOLD`` (``BLOCK_C >= C``) a program owns ``BLOCK_C`` consecutive planes, b-major,
    so that a small ``C`` wastes no lanes; otherwise ``BLOCK_C`` consecutive channels of one
    sample, so that Triton sees channels_last loads as contiguous and vectorises them.
    """
    if FOLD:
        plane = pid.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = plane < n_planes
        pb, pc = plane // C, plane % C
    else:
        n_cblk = tl.cdiv(C, BLOCK_C)
        pb = (pid // n_cblk).to(tl.int64)
        pc = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = pc < C
        plane = pb * C + pc
    return plane, pb, pc, c_in


@triton.jit
def _rows(pb, pc, offs_h, sb, sc, sh, VEC: tl.constexpr):
    """Row offsets ``b * sb + c * sc + h * sh`` ``[BLOCK_C, ROWS]`` (int64), declared
    multiples of ``VEC`` (checked on the host: every stride is) so that rows load ``VEC``
    elements at a time. The plane and height parts are declared apart: a hint on the
    ``[1, 1]`` sum (one row per step, W >= 2048) fails Triton's sm_90 coalescing pass."""
    planes = pb * sb + pc * sc
    heights = offs_h * sh
    if VEC > 1:  # only then: the hint replaces what the compiler knows (contiguity in C too)
        planes = tl.multiple_of(planes, VEC)
        heights = tl.multiple_of(heights, VEC)
    rows = planes[:, None] + heights[None, :]
    return rows


@triton.jit
def _coord_pool_kernel(
    x_ptr, xh_ptr, xw_ptr, maxh_ptr, cnth_ptr, maxw_ptr, cntw_ptr,
    C, H, W_V, n_planes,
    sxb, sxc, sxh, sxw,
    WITH_MAX: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    W = W_V * VEC
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    col_sum = tl.zeros((BLOCK_C, BLOCK_W), ACC)
    col_max = tl.full((BLOCK_C, BLOCK_W), float("-inf"), ACC)
    col_cnt = tl.zeros((BLOCK_C, BLOCK_W), tl.int32)
    col_nan = tl.zeros((BLOCK_C, BLOCK_W), tl.int32)
    ROWS: tl.constexpr = (BLOCK_H + TILE_DIV - 1) // TILE_DIV
    for h0 in tl.range(0, H, ROWS, num_stages=NUM_STAGES):
        offs_h = h0 + tl.arange(0, ROWS)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        x_at = _rows(pb, pc, offs_h, sxb, sxc, sxh, VEC)[:, :, None] + offs_w * sxw
        v = tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
        col_sum += tl.reduce(v, 1, ACC_ADD)
        row = tl.reduce(v, 2, ACC_ADD) / W
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        if WITH_MAX:
            ok = inside & (v == v)
            key = tl.where(ok, v, float("-inf"))
            # amax's gradient is split among ties: keep the tie count with the max.
            r_max = tl.reduce(key, 2, ACC_MAX)
            r_cnt = tl.reduce((ok & (key == r_max[:, :, None])).to(tl.int32), 2, ACC_ADD)
            r_nan = tl.reduce((inside & (v != v)).to(tl.int32), 2, ACC_MAX) > 0
            r_max = tl.where(r_nan, float("nan"), r_max)
            r_cnt = tl.where(r_nan, 0, r_cnt)
            row = 0.5 * (row + r_max)
            tl.store(maxh_ptr + row_at, r_max, mask=ch_in)
            tl.store(cnth_ptr + row_at, r_cnt.to(ACC), mask=ch_in)
            t_max = tl.reduce(key, 1, ACC_MAX)
            t_cnt = tl.reduce((ok & (key == t_max[:, None, :])).to(tl.int32), 1, ACC_ADD)
            col_cnt = tl.where(
                t_max > col_max, t_cnt, tl.where(t_max == col_max, col_cnt + t_cnt, col_cnt)
            )
            col_max = tl.maximum(col_max, t_max)
            col_nan = tl.maximum(col_nan, tl.reduce((inside & (v != v)).to(tl.int32), 1,
                                                    ACC_MAX))
        tl.store(xh_ptr + row_at, row.to(xh_ptr.dtype.element_ty), mask=ch_in)
    col = col_sum / H
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    if WITH_MAX:
        col_max = tl.where(col_nan > 0, float("nan"), col_max)
        col_cnt = tl.where(col_nan > 0, 0, col_cnt)
        col = 0.5 * (col + col_max)
        tl.store(maxw_ptr + col_at, col_max, mask=cw_in)
        tl.store(cntw_ptr + col_at, col_cnt.to(ACC), mask=cw_in)
    tl.store(xw_ptr + col_at, col.to(xw_ptr.dtype.element_ty), mask=cw_in)


@triton.jit
def _coord_pool_backward_kernel(
    gh_ptr, gw_ptr, x_ptr, maxh_ptr, cnth_ptr, maxw_ptr, cntw_ptr,
    gy_ptr, kuh_ptr, uw_ptr, c_ptr, gx_ptr,
    C, H, W_V, n_planes,
    sxb, sxc, sxh, sxw,
    sgyb, sgyc, sgyh, sgyw,
    sgxb, sgxc, sgxh, sgxw,
    WITH_MAX: tl.constexpr, LINKED: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    """``grad_x = grad_h / W + grad_w / H`` (+ the max terms), and linked
    ``+ grad_y * (c + (k u_h) u_w)``: the whole input gradient in one write."""
    W = W_V * VEC
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    g_w = tl.load(gw_ptr + col_at, mask=cw_in, other=0.0).to(ACC)
    if WITH_MAX:
        g_w = 0.5 * g_w  # x_w = 0.5 * (mean + max): each half gets half the gradient
        col_max = tl.load(maxw_ptr + col_at, mask=cw_in, other=0.0)
        # amax's backward: grad / count * (x == max); a NaN column has count 0 -> NaN.
        g_w_max = g_w / tl.load(cntw_ptr + col_at, mask=cw_in, other=1.0)
    g_w = g_w / H
    if LINKED:
        u_w = tl.load(uw_ptr + col_at, mask=cw_in, other=0.0)
        c = tl.load(c_ptr)
    ROWS: tl.constexpr = (BLOCK_H + TILE_DIV - 1) // TILE_DIV
    for h0 in tl.range(0, H, ROWS, num_stages=NUM_STAGES):
        offs_h = h0 + tl.arange(0, ROWS)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        g_h = tl.load(gh_ptr + row_at, mask=ch_in, other=0.0).to(ACC)
        if WITH_MAX:
            g_h = 0.5 * g_h
            row_max = tl.load(maxh_ptr + row_at, mask=ch_in, other=0.0)
            g_h_max = g_h / tl.load(cnth_ptr + row_at, mask=ch_in, other=1.0)
        g = (g_h / W)[:, :, None] + g_w[:, None, :]
        if WITH_MAX:
            x_at = _rows(pb, pc, offs_h, sxb, sxc, sxh, VEC)[:, :, None] + offs_w * sxw
            v = tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
            g += g_h_max[:, :, None] * (v == row_max[:, :, None]).to(ACC)
            g += g_w_max[:, None, :] * (v == col_max[:, None, :]).to(ACC)
        if LINKED:
            ku_h = tl.load(kuh_ptr + row_at, mask=ch_in, other=0.0)
            gy_at = _rows(pb, pc, offs_h, sgyb, sgyc, sgyh, VEC)[:, :, None] + offs_w * sgyw
            gy = tl.load(gy_ptr + gy_at, mask=inside, other=0.0).to(ACC)
            g += gy * (c + ku_h[:, :, None] * u_w[:, None, :])
        gx_at = _rows(pb, pc, offs_h, sgxb, sgxc, sgxh, VEC)[:, :, None] + offs_w * sgxw
        tl.store(gx_ptr + gx_at, g.to(gx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _coord_scale_kernel(
    x_ptr, uh_ptr, uw_ptr, c_ptr, k_ptr, y_ptr, c_value: tl.float64, k_value: tl.float64,
    C, H, W_V, n_planes,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    C_TENSOR: tl.constexpr, K_TENSOR: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    W = W_V * VEC
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    # c and k: 0-d tensors, or numbers (a fixed beta) passed by value, never made tensors
    k = tl.load(k_ptr).to(ACC) if K_TENSOR else tl.full((), k_value, ACC)
    c = tl.load(c_ptr).to(ACC) if C_TENSOR else tl.full((), c_value, ACC)
    u_w = tl.load(
        uw_ptr + plane[:, None] * W + offs_w[None, :], mask=c_in[:, None] & w_in[None, :],
        other=0.0,
    ).to(ACC)
    ROWS: tl.constexpr = (BLOCK_H + TILE_DIV - 1) // TILE_DIV
    for h0 in tl.range(0, H, ROWS, num_stages=NUM_STAGES):
        offs_h = h0 + tl.arange(0, ROWS)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        u_h = tl.load(
            uh_ptr + plane[:, None] * H + offs_h[None, :], mask=c_in[:, None] & h_in[None, :],
            other=0.0,
        ).to(ACC)
        x_at = _rows(pb, pc, offs_h, sxb, sxc, sxh, VEC)[:, :, None] + offs_w * sxw
        v = tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
        scale = c + k * (u_h[:, :, None] * u_w[:, None, :])
        y_at = _rows(pb, pc, offs_h, syb, syc, syh, VEC)[:, :, None] + offs_w * syw
        tl.store(y_ptr + y_at, (v * scale).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _coord_scale_backward_kernel(
    gy_ptr, x_ptr, uh_ptr, uw_ptr, c_ptr, k_ptr, c_value: tl.float64, k_value: tl.float64,
    gx_ptr, rows_gu_ptr, cols_gu_ptr, rows_g_ptr, kuh_ptr, puw_ptr, pc_ptr,
    C, H, W_V, n_planes,
    sgyb, sgyc, sgyh, sgyw,
    sxb, sxc, sxh, sxw,
    sgxb, sgxc, sgxh, sgxw,
    C_TENSOR: tl.constexpr, K_TENSOR: tl.constexpr, WRITE_GX: tl.constexpr,
    REDUCE: tl.constexpr, REDUCE_G: tl.constexpr, PIECES: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    NUM_STAGES: tl.constexpr, TILE_DIV: tl.constexpr,
):
    """The map gradients' reductions of ``g = grad_y * x``: ``sum_W(g u_w)`` per row,
    ``sum_H(g u_h)`` per column, ``sum_W(g)`` per row (for ``c``); unlinked also
    ``grad_x = grad_y * scale``; linked (``PIECES``) the pieces ``k u_h``, ``u_w``, ``c``
    for the pool's backward."""
    W = W_V * VEC
    pid = tl.program_id(0)
    plane, pb, pc, c_in = _coord_planes(pid, C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    k = tl.load(k_ptr).to(ACC) if K_TENSOR else tl.full((), k_value, ACC)
    c = tl.load(c_ptr).to(ACC) if C_TENSOR else tl.full((), c_value, ACC)
    u_w = tl.load(uw_ptr + col_at, mask=cw_in, other=0.0).to(ACC)
    if PIECES:
        tl.store(puw_ptr + col_at, u_w, mask=cw_in)
        first = tl.arange(0, 1)  # a tensor store (the interpreter wants one), by program 0
        tl.store(pc_ptr + first, tl.zeros((1,), ACC) + c, mask=first + pid == 0)
    col_gu = tl.zeros((BLOCK_C, BLOCK_W), ACC)
    ROWS: tl.constexpr = (BLOCK_H + TILE_DIV - 1) // TILE_DIV
    for h0 in tl.range(0, H, ROWS, num_stages=NUM_STAGES):
        offs_h = h0 + tl.arange(0, ROWS)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        u_h = tl.load(uh_ptr + row_at, mask=ch_in, other=0.0).to(ACC)
        if PIECES:
            tl.store(kuh_ptr + row_at, k * u_h, mask=ch_in)
        gy_at = _rows(pb, pc, offs_h, sgyb, sgyc, sgyh, VEC)[:, :, None] + offs_w * sgyw
        gy = tl.load(gy_ptr + gy_at, mask=inside, other=0.0).to(ACC)
        if WRITE_GX:
            scale = c + k * (u_h[:, :, None] * u_w[:, None, :])
            gx_at = _rows(pb, pc, offs_h, sgxb, sgxc, sgxh, VEC)[:, :, None] + offs_w * sgxw
            tl.store(gx_ptr + gx_at, (gy * scale).to(gx_ptr.dtype.element_ty), mask=inside)
        if REDUCE:
            x_at = _rows(pb, pc, offs_h, sxb, sxc, sxh, VEC)[:, :, None] + offs_w * sxw
            g = gy * tl.load(x_ptr + x_at, mask=inside, other=0.0).to(ACC)
            tl.store(rows_gu_ptr + row_at, tl.reduce(g * u_w[:, None, :], 2, ACC_ADD),
                     mask=ch_in)
            col_gu += tl.reduce(g * u_h[:, :, None], 1, ACC_ADD)
            if REDUCE_G:
                tl.store(rows_g_ptr + row_at, tl.reduce(g, 2, ACC_ADD), mask=ch_in)
    if REDUCE:
        tl.store(cols_gu_ptr + col_at, col_gu, mask=cw_in)


# ------------------------------------------------------------------------------------------
# Launch parameters
# ------------------------------------------------------------------------------------------

_CACHE = LaunchCache()


def _channels_fast(x: Tensor) -> bool:
    """Whether ``C`` is the contiguous dimension (channels_last) rather than ``W``."""
    return x.stride(1) == 1 and x.shape[1] > 1 and x.stride(3) != 1


class CoordLaunch(NamedTuple):
    grid: tuple[int]
    #: FOLD, BLOCK_C, BLOCK_H, BLOCK_W, VEC
    constexprs: dict
    #: a ``BLOCK_C * BLOCK_H * BLOCK_W`` step, ``H / BLOCK_H`` steps per program
    config: LaunchConfig
    vec: int


def coord_launch(x: Tensor, *others: Tensor) -> CoordLaunch:
    """Grid and tiles of the CoordinateAttention kernels over ``x`` (and the other full-size
    tensors of the launch, which set the vector width with it): ``BLOCK_C`` channel planes
    per program, ``BLOCK_H`` whole rows of each per step, about ``elements`` per step;
    ``FOLD`` when a block spans more than one sample's channels. Memoised."""
    return _CACHE.get(tuple(tensor_key(t) for t in (x, *others)),
                      lambda: _coord_launch(x, *others))


def _coord_launch(x: Tensor, *others: Tensor) -> CoordLaunch:
    sizes = tile_sizes(x)
    b, c, h, w = x.shape
    block_w = next_pow2(w)
    if block_w > MAX_ROW:
        raise ValueError(
            f"backend='triton' CoordinateAttention kernels hold whole rows of at most "
            f"{MAX_ROW} elements; got an input of width W={w} (shape {tuple(x.shape)}): "
            "use backend='torch'"
        )
    planes = next_pow2(b * c)
    if _channels_fast(x):
        block_c = min(planes, sizes.coord_channels, max(1, sizes.elements // block_w))
        block_h = min(next_pow2(h), max(1, sizes.elements // (block_c * block_w)))
        vec = 1  # loads run along C: Triton's own divisibility-by-16 specialisation
    else:
        block_h = min(next_pow2(h), max(1, sizes.elements // block_w))
        block_c = min(planes, max(1, sizes.elements // (block_h * block_w)))
        vec = vector_width((x, *others), (0, 1, 2), 3, w) if w > 1 else 1
    fold = block_c > c
    grid = (cdiv(b * c, block_c),) if fold else (b * cdiv(c, block_c),)
    constexprs = {"FOLD": fold, "BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w,
                  "VEC": vec}
    config = launch_config(block_c * block_h * block_w, cdiv(h, block_h))
    return CoordLaunch(grid, constexprs, config, vec)


# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------


def _pool_outputs(x: Tensor, with_max: bool):
    b, c, h, w = x.shape
    acc = acc_torch(x)
    stat_h = x.new_empty((2, b, c, h), dtype=acc) if with_max else x.new_empty(0, dtype=acc)
    stat_w = x.new_empty((2, b, c, w), dtype=acc) if with_max else x.new_empty(0, dtype=acc)
    return (
        x.new_empty((b, c, h, 1)), x.new_empty((b, c, 1, w)), stat_h, stat_w,
        # The carriers: what the scale's backward hands over arrives as their gradients.
        zero_stride((b, c, h, w), x, x.dtype),
        zero_stride((b * c * (h + w) + 1,), x, acc),
    )


def _coord_pool_impl(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                          Tensor, Tensor]:
    outs = _pool_outputs(x, with_max)
    x_h, x_w, stat_h, stat_w = outs[:4]
    if x.numel() == 0:
        return outs
    check_triton_input(x, "lightning_attn::coord_pool")
    check_span(x, "x")
    b, c, h, w = x.shape
    p = coord_launch(x)
    stats = (stat_h[0], stat_h[1], stat_w[0], stat_w[1]) if with_max else (x_h,) * 4
    with launch_guard(x):
        launch(
            _coord_pool_kernel, p.grid, x.device,
            (x, x_h, x_w, *stats, c, h, w // p.vec, b * c, *x.stride()),
            dict(WITH_MAX=with_max, ACC=acc_dtype(x), **p.constexprs), _KEY, p.config,
        )
    return outs


_coord_pool = torch.library.custom_op(
    "lightning_attn::coord_pool", mutates_args=()
)(_coord_pool_impl)


@_coord_pool.register_fake
def _(x: Tensor, with_max: bool):
    return _pool_outputs(x, with_max)


def _coord_pool_backward_impl(
    grad_h: Tensor, grad_w: Tensor, x: Tensor, stat_h: Tensor, stat_w: Tensor, with_max: bool,
    grad_y: Tensor | None, pieces: Tensor | None,
) -> Tensor:
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    b, c, h, w = x.shape
    linked = grad_y is not None
    gy = grad_y if linked else grad_x  # an unused pointer when not linked
    if linked:
        check_span(grad_y, "grad_y")
    p = coord_launch(x, gy, grad_x)
    stats = (stat_h[0], stat_h[1], stat_w[0], stat_w[1]) if with_max else (grad_h,) * 4
    n_h = b * c * h
    # The packed pieces: k * u_h (B*C*H), u_w (B*C*W), c (1); views, no 32-bit products.
    kuh, uw, cc = ((pieces[:n_h], pieces[n_h:-1], pieces[-1:]) if linked else (grad_h,) * 3)
    xs = x if with_max else grad_x  # x is read for the ties of the max only
    with launch_guard(x):
        launch(
            _coord_pool_backward_kernel, p.grid, x.device,
            (grad_h.contiguous(), grad_w.contiguous(), xs, *stats, gy, kuh, uw, cc, grad_x,
             c, h, w // p.vec, b * c, *xs.stride(), *gy.stride(), *grad_x.stride()),
            dict(WITH_MAX=with_max, LINKED=linked, ACC=acc_dtype(grad_h, grad_w, x),
                 **p.constexprs),
            _KEY, p.config,
        )
    return grad_x


_coord_pool_backward = torch.library.custom_op(
    "lightning_attn::coord_pool_backward", mutates_args=()
)(_coord_pool_backward_impl)


@_coord_pool_backward.register_fake
def _(grad_h, grad_w, x, stat_h, stat_w, with_max, grad_y, pieces):
    return torch.empty_like(x)


def _coord_pool_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs
    x, with_max = inputs
    ctx.save_for_backward(x, output[2], output[3])
    ctx.with_max = with_max


def _coord_pool_grad(ctx, grad_h, grad_w, _grad_stat_h, _grad_stat_w, grad_y, pieces):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)
    x, stat_h, stat_w = ctx.saved_tensors
    b, c, h, w = x.shape
    if grad_h is None:
        grad_h = x.new_zeros((b, c, h, 1))
    if grad_w is None:
        grad_w = x.new_zeros((b, c, 1, w))
    if grad_y is None or pieces is None:
        grad_y = pieces = None
    grad_x = torch.ops.lightning_attn.coord_pool_backward(
        grad_h, grad_w, x, stat_h, stat_w, ctx.with_max, grad_y, pieces
    )
    return grad_x, None


_coord_pool.register_autograd(_coord_pool_grad, setup_context=_coord_pool_setup)


def _scale_dtype(x: Tensor, u_h: Tensor, u_w: Tensor) -> torch.dtype:
    # As ``x * (c + k * u_h * u_w)`` in torch: the 0-d c and k never promote the maps.
    return torch.promote_types(x.dtype, torch.promote_types(u_h.dtype, u_w.dtype))


def _coord_scale_impl(
    x: Tensor, u_h: Tensor, u_w: Tensor, c: Tensor | None, k: Tensor | None,
    c_value: float, k_value: float, carry_gy: Tensor | None, carry_pieces: Tensor | None,
) -> Tensor:
    y = torch.empty_like(x, dtype=_scale_dtype(x, u_h, u_w))
    if x.numel() == 0:
        return y
    check_triton_input(x, "lightning_attn::coord_scale")
    check_span(x, "x")
    b, ch, h, w = x.shape
    p = coord_launch(x, y)
    with launch_guard(x):
        launch(
            _coord_scale_kernel, p.grid, x.device,
            (x, u_h.contiguous(), u_w.contiguous(), x if c is None else c,
             x if k is None else k, y, float(c_value), float(k_value),
             ch, h, w // p.vec, b * ch, *x.stride(), *y.stride()),
            dict(C_TENSOR=c is not None, K_TENSOR=k is not None,
                 ACC=acc_dtype(x, u_h, u_w, c, k), **p.constexprs),
            _KEY, p.config,
        )
    return y


_coord_scale = torch.library.custom_op(
    "lightning_attn::coord_scale", mutates_args=()
)(_coord_scale_impl)


@_coord_scale.register_fake
def _(x, u_h, u_w, c, k, c_value, k_value, carry_gy, carry_pieces):
    return torch.empty_like(x, dtype=_scale_dtype(x, u_h, u_w))


def _scale_backward_outputs(x, u_h, u_w, c, k, need_x, need_maps, need_c, linked):
    b, ch, h, w = x.shape
    acc = acc_torch(x, u_h, u_w, c, k)
    grad_x = torch.empty_like(x) if need_x and not linked else x.new_empty(0)
    rows_gu = x.new_empty((b, ch, h) if need_maps else (0,), dtype=acc)
    cols_gu = x.new_empty((b, ch, w) if need_maps else (0,), dtype=acc)
    rows_g = x.new_empty((b, ch, h) if need_c else (0,), dtype=acc)
    pieces = x.new_empty((b * ch * (h + w) + 1,) if linked else (0,), dtype=acc_torch(x))
    return grad_x, rows_gu, cols_gu, rows_g, pieces


def _coord_scale_backward_impl(
    grad_y: Tensor, x: Tensor, u_h: Tensor, u_w: Tensor, c: Tensor | None, k: Tensor | None,
    c_value: float, k_value: float, need_x: bool, need_maps: bool, need_c: bool, linked: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = _scale_backward_outputs(x, u_h, u_w, c, k, need_x, need_maps, need_c, linked)
    grad_x, rows_gu, cols_gu, rows_g, pieces = outs
    write_gx = need_x and not linked
    if x.numel() == 0 or not (need_x or need_maps or linked):
        return grad_x, rows_gu.zero_(), cols_gu.zero_(), rows_g.zero_(), pieces.zero_()
    check_span(grad_y, "grad_y")
    b, ch, h, w = x.shape
    gx = grad_x if write_gx else x  # an unused pointer
    p = coord_launch(x, grad_y, gx)
    n_h = b * ch * h
    kuh, puw, pc = (pieces[:n_h], pieces[n_h:-1], pieces[-1:]) if linked else (x,) * 3
    with launch_guard(x):
        launch(
            _coord_scale_backward_kernel, p.grid, x.device,
            (grad_y, x, u_h.contiguous(), u_w.contiguous(), x if c is None else c,
             x if k is None else k, float(c_value), float(k_value),
             gx, rows_gu if need_maps else x, cols_gu if need_maps else x,
             rows_g if need_c else x, kuh, puw, pc,
             ch, h, w // p.vec, b * ch, *grad_y.stride(), *x.stride(), *gx.stride()),
            dict(C_TENSOR=c is not None, K_TENSOR=k is not None, WRITE_GX=write_gx,
                 REDUCE=need_maps, REDUCE_G=need_c, PIECES=linked,
                 ACC=acc_dtype(grad_y, x, u_h, u_w, c, k), **p.constexprs),
            _KEY, p.config,
        )
    return grad_x, rows_gu, cols_gu, rows_g, pieces


_coord_scale_backward = torch.library.custom_op(
    "lightning_attn::coord_scale_backward", mutates_args=()
)(_coord_scale_backward_impl)


@_coord_scale_backward.register_fake
def _(grad_y, x, u_h, u_w, c, k, c_value, k_value, need_x, need_maps, need_c, linked):
    return _scale_backward_outputs(x, u_h, u_w, c, k, need_x, need_maps, need_c, linked)


def _coord_scale_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs
    x, u_h, u_w, c, k, c_value, k_value, carry_gy, _ = inputs
    ctx.has_c, ctx.has_k = c is not None, k is not None
    ctx.values = (c_value, k_value)
    ctx.linked = carry_gy is not None
    ctx.save_for_backward(x, u_h, u_w, c if c is not None else x, k if k is not None else x)


def _coord_scale_grad(ctx, grad_y: Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD)
    if grad_y is None:  # y took no part in what is differentiated
        return (None,) * 9
    x, u_h, u_w, c, k = ctx.saved_tensors
    c = c if ctx.has_c else None
    k = k if ctx.has_k else None
    need_x, need_h, need_w, need_c, need_k, _, _, need_link, _ = ctx.needs_input_grad
    need_c = need_c and c is not None
    need_k = need_k and k is not None
    need_maps = need_h or need_w or need_c or need_k
    linked = ctx.linked and need_link
    c_value, k_value = ctx.values
    grad_x, rows_gu, cols_gu, rows_g, pieces = torch.ops.lightning_attn.coord_scale_backward(
        grad_y, x, u_h, u_w, c, k, c_value, k_value, need_x and not linked, need_maps,
        need_c, linked,
    )
    # d y / d u_h = k * sum_W(grad_y * x * u_w), d y / d k = sum(grad_y * x * u_h * u_w):
    # small maps, finished in torch.
    scale_k = k if k is not None else k_value
    grad_h = grad_w = grad_c = grad_k = None
    if need_h:
        grad_h = (rows_gu * scale_k).unsqueeze(-1).to(u_h.dtype)
    if need_w:
        grad_w = (cols_gu * scale_k).unsqueeze(-2).to(u_w.dtype)
    if need_k:
        grad_k = (rows_gu * u_h.squeeze(-1)).sum().to(k.dtype)
    if need_c:
        grad_c = rows_g.sum().to(c.dtype)
    if linked:  # grad_x is written by the pool's backward, from grad_y and the pieces
        return None, grad_h, grad_w, grad_c, grad_k, None, None, grad_y, pieces
    return (grad_x if need_x else None), grad_h, grad_w, grad_c, grad_k, None, None, None, None


_coord_scale.register_autograd(_coord_scale_grad, setup_context=_coord_scale_setup)


# ------------------------------------------------------------------------------------------
# Public functions (what the block calls)
# ------------------------------------------------------------------------------------------


def coord_pool(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor]:
    """``x (B,C,H,W) -> (x_h (B,C,H,1), x_w (B,C,1,W))`` in one read of ``x``.

    ``x_h = mean_W x``, ``x_w = mean_H x``; with ``with_max`` each is ``(mean + max) / 2``
    along its axis (CoordinateAttention's add-on 1), the max gradient split evenly among tied
    maxima exactly as ``amax``'s (the plain path's).
    """
    x_h, x_w, _ = coord_pool_linked(x, with_max)
    return x_h, x_w


def coord_pool_linked(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor, CoordLink]:
    """:func:`coord_pool` and the :class:`CoordLink` to pass to :func:`coord_scale` with the
    same ``x``: the backward then writes ``grad_x`` once, in the pool's backward."""
    check_x(x)
    x_h, x_w, _, _, carry_gy, carry_pieces = torch.ops.lightning_attn.coord_pool(
        x, bool(with_max)
    )
    return x_h, x_w, CoordLink(carry_gy, carry_pieces)


def _scalar(name: str, t: Tensor | float | None, x: Tensor, default: float):
    """``(tensor or None, value)``: a 0-d tensor stays a tensor, a number is passed by value
    (never made a tensor: that would be a host-to-device copy in every forward)."""
    if t is None:
        return None, default
    if isinstance(t, Tensor):
        if t.dim() != 0 or t.device != x.device:
            raise ValueError(
                f"{name} must be a 0-d tensor on {x.device} or a number, got shape "
                f"{tuple(t.shape)} on {t.device}"
            )
        return t, default
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a 0-d tensor, a number or None, got {t!r}")
    return None, float(t)


def coord_scale(
    x: Tensor,
    u_h: Tensor,
    u_w: Tensor,
    c: Tensor | float | None,
    k: Tensor | float | None,
    link: CoordLink | None = None,
) -> Tensor:
    """``y = x * (c + k * u_h * u_w)``, ``x (B,C,H,W)``, ``u_h (B,C,H,1)``, ``u_w (B,C,1,W)``;
    ``c`` and ``k`` 0-d tensors or numbers; ``c=None`` is 0 and ``k=None`` is 1.

    Differentiable w.r.t. every tensor; the backward reads ``grad_y`` and ``x`` once for
    ``k * sum_W(grad_y x u_w)``, ``k * sum_H(grad_y x u_h)`` and the scalar sums for ``c``
    and ``k``, and writes ``grad_x = grad_y * scale`` — here without ``link``; with the
    ``link`` of :func:`coord_pool_linked` (of the same ``x``), in the pool's backward.
    """
    check_x(x)
    b, ch, h, w = x.shape
    check_map("u_h", u_h, (b, ch, h, 1), x)
    check_map("u_w", u_w, (b, ch, 1, w), x)
    c_t, c_value = _scalar("c", c, x, 0.0)
    k_t, k_value = _scalar("k", k, x, 1.0)
    if link is None:
        carry_gy = carry_pieces = None
    elif not isinstance(link, CoordLink) or tuple(link.grad_y.shape) != tuple(x.shape):
        raise ValueError(
            f"link must be the CoordLink that coord_pool_linked returned for this x of shape "
            f"{tuple(x.shape)}, got {type(link).__name__}"
        )
    else:
        carry_gy, carry_pieces = link
    return torch.ops.lightning_attn.coord_scale(
        x, u_h, u_w, c_t, k_t, c_value, k_value, carry_gy, carry_pieces
    )


#: Kernels of this module (the sm_90 compile test reads it).
KERNELS = (
    _coord_pool_kernel, _coord_pool_backward_kernel, _coord_scale_kernel,
    _coord_scale_backward_kernel,
)
_ = triton  # the module's kernels are triton.jit functions
