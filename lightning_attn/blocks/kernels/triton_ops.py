"""Triton kernels for the blocks' full-size work, as ``torch.library`` custom ops.

``backend="triton"`` runs the four functions below on CUDA tensors (or on CPU tensors under
``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use). Each is a custom op in
the ``lightning_attn::`` namespace with a fake (meta) implementation and an autograd formula,
so that ``torch.compile(block, fullgraph=True)`` traces them as single graph nodes and the
backward kernels appear in the compiled backward graph.

==================  ======================================================================
function            computes
==================  ======================================================================
:func:`dsa_summary` ``x (B,C,H,W) -> s (B,2,H,W) = [mean_C x, max_C x]``; saves the first
                    maximal channel (the index ``torch.max(x, 1)`` returns) as int32
                    ``(B,1,H,W)``
:func:`dsa_apply`   ``y = x * mask``, ``mask (B,1,H,W)``
:func:`coord_pool`  ``x_h = mean_W x (B,C,H,1)``, ``x_w = mean_H x (B,C,1,W)``; with
                    ``with_max``, ``(mean + max) / 2`` along each axis (add-on 1)
:func:`coord_scale` ``y = x * (c + k * u_h * u_w)``, ``u_h (B,C,H,1)``, ``u_w (B,C,1,W)``,
                    ``c``, ``k`` 0-d (``c=None``: an exact zero, its term skipped)
==================  ======================================================================

Numerics: every kernel loads its inputs in their own dtype (float32, bfloat16, float16 or
float64) and computes and accumulates in float32 (float64 when an input is float64), rounding
once on store. Output dtypes are those of the plain path under the same autocast:
``dsa_apply`` and ``coord_scale`` return ``torch.promote_types`` of their full-size and
map operands (a float32 ``x`` times a bfloat16 mask is float32), the reductions return
``x.dtype``. NaN propagates as in the seeds: ``torch.max`` returns NaN and the index of the
first NaN channel, and ``amax`` (add-on 1) returns NaN; its gradient, like amax's, splits
evenly among tied maxima (``grad / count * (x == max)``, so a NaN row gets NaN gradients).

Passes over full-size ``(B,C,H,W)`` memory (one pass = reading or writing ``numel``
elements; everything else is on maps ``C`` or ``H*W`` times smaller):

=====================  =======  ========  ==================================================
op                     forward  backward  backward detail
=====================  =======  ========  ==================================================
``dsa_summary``        1        1         writes its part of ``grad_x``
``dsa_apply``          2        3         reads ``grad_y`` and ``x``, writes its part of
                                          ``grad_x`` and reduces ``grad_mask`` in one kernel
``coord_pool``         1        1 (2)     writes its part of ``grad_x`` (with ``with_max``
                                          also reads ``x`` for the ties)
``coord_scale``        2        3         reads ``grad_y`` and ``x``, writes its part of
                                          ``grad_x`` and reduces the grads of ``u_h``,
                                          ``u_w``, ``c``, ``k`` in one kernel
=====================  =======  ========  ==================================================

A block is therefore 3 passes forward (the floor: the mask depends on a full read of ``x``
before ``y`` can be written) and 7 backward (8 with add-on 1): autograd adds the two parts
of ``grad_x`` (read both, write one: 3 passes) because ``x`` enters two ops. The floor is 4
(read ``grad_y`` and ``x`` for the map gradients, then read ``grad_y`` and write ``grad_x``);
reaching it needs the summary's backward to see ``grad_y``, which the torch path does with a
Python-side stash that a compiled graph cannot hold. Without ``x.requires_grad`` the
backward is 2 passes per block (``grad_y`` and ``x`` read once for the map gradients).

Block sizes (:data:`GPU_TILES`; chosen for an H100, not tuned: no GPU was available when
this was written). Loads are coalesced along whichever of ``C`` and ``W`` is contiguous in
memory: a kernel reads each full-size tensor's own strides, so contiguous, channels_last and
any other strides (a stride-0 ``grad_y`` from ``y.sum()``, an expanded batch) work without a
copy; only contiguous and channels_last are fast. Each step loads about 2048 elements (8 KB
in float32, 16 per thread with 4 warps):

- DSA, reducing over ``C`` per pixel: ``[BLOCK_C, BLOCK_S]`` tiles over ``C`` and the
  flattened ``H*W``; NCHW takes 256 contiguous pixels and 8 channels per step (16-byte
  vector loads), channels_last 64 contiguous channels and 32 pixels; a program loops over
  all of ``C``, keeping per-lane partial sums, maxima and argmaxima that it reduces once.
- CoordinateAttention, reducing over ``W`` per row and over ``H`` per column:
  ``[BLOCK_C, BLOCK_H, BLOCK_W]`` tiles of whole rows (``BLOCK_W`` is ``W`` rounded up to a
  power of two, at most 8192); a program owns ``BLOCK_C`` channel planes (of one sample, or
  of consecutive samples when ``C`` is smaller than a block) and loops down ``H``, so both
  reductions finish inside it without atomics (deterministic). NCHW rows of a width that is
  not a multiple of 16 bytes load as scalars (still coalesced across a warp).

Under Triton's interpreter (CPU tensors, the tests) tiles are eight times larger
(:data:`INTERPRETER_TILES`): it costs per program and per op, hardly per element.
``tests/blocks/triton_sm90_compile.py`` compiles every kernel for sm_90 without a GPU.
``triton.autotune`` is not used: the interpreter would run every configuration.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import check_triton_input

__all__ = ["coord_pool", "coord_scale", "dsa_apply", "dsa_summary"]

#: Widest row (``W`` rounded up to a power of two) a CoordinateAttention kernel holds.
_MAX_ROW = 8192
#: In-sample offsets are 32-bit; the batch offset is 64-bit.
_MAX_SAMPLE_SPAN = 2**31 - 1

_DOUBLE_BACKWARD = (
    "the Triton path of lightning-attn blocks supports first derivatives only; build the "
    "block with backend='plain' for double backward (create_graph=True)"
)


# ------------------------------------------------------------------------------------------
# Kernels
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
_ADD = getattr(tl.standard, "_sum_combine", _add_combine)
_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_MIN = getattr(tl.standard, "_elementwise_min", _min_combine)


@triton.jit
def _dsa_pixels(pid, HW, W, n_sblk, BLOCK_S: tl.constexpr):
    """The pixels program ``pid`` owns: sample ``b`` and ``BLOCK_S`` flattened ``H*W``
    offsets, with their in-range mask and ``(h, w)`` (unused, and removed by the compiler,
    when a tensor's pixels fold into one stride)."""
    b = (pid // n_sblk).to(tl.int64)
    offs_s = (pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S)
    return b, offs_s, offs_s < HW, offs_s // W, offs_s % W


@triton.jit
def _dsa_summary_kernel(
    x_ptr, s_ptr, arg_ptr,
    C, HW, W, n_sblk,
    sxb, sxc, sxh, sxw,
    FLAT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, offs_s, s_in, h, w = _dsa_pixels(tl.program_id(0), HW, W, n_sblk, BLOCK_S)
    x_pix = x_ptr + b * sxb + (offs_s * sxw if FLAT else h * sxh + w * sxw)

    # Per-lane accumulators, reduced across lanes once at the end. ``C`` marks "none yet".
    acc_sum = tl.zeros((BLOCK_C, BLOCK_S), ACC)
    acc_max = tl.full((BLOCK_C, BLOCK_S), float("-inf"), ACC)
    acc_arg = tl.zeros((BLOCK_C, BLOCK_S), tl.int32) + C
    acc_nan = tl.zeros((BLOCK_C, BLOCK_S), tl.int32) + C  # first NaN channel
    for i in range(0, tl.cdiv(C, BLOCK_C)):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (offs_c < C)[:, None] & s_in[None, :]
        v = tl.load(x_pix[None, :] + offs_c[:, None] * sxc, mask=inside, other=0.0).to(ACC)
        channel = tl.broadcast_to(offs_c[:, None], (BLOCK_C, BLOCK_S))
        acc_sum += v
        is_nan = v != v
        acc_nan = tl.minimum(acc_nan, tl.where(inside & is_nan, channel, C))
        # Strictly greater keeps the earliest channel of each lane; the first valid value
        # seeds the lane, so an all -inf pixel still names channel 0 like torch.max.
        take = inside & (v == v) & ((v > acc_max) | (acc_arg == C))
        acc_max = tl.where(take, v, acc_max)
        acc_arg = tl.where(take, channel, acc_arg)

    total = tl.reduce(acc_sum, 0, _ADD)
    best = tl.reduce(acc_max, 0, _MAX)
    arg = tl.reduce(tl.where((acc_max == best[None, :]) & (acc_arg < C), acc_arg, C), 0, _MIN)
    first_nan = tl.reduce(acc_nan, 0, _MIN)
    has_nan = first_nan < C
    best = tl.where(has_nan, float("nan"), best)
    arg = tl.where(has_nan, first_nan, arg)

    out = s_ptr + b * 2 * HW + offs_s
    tl.store(out, (total / C).to(s_ptr.dtype.element_ty), mask=s_in)
    tl.store(out + HW, best.to(s_ptr.dtype.element_ty), mask=s_in)
    tl.store(arg_ptr + b * HW + offs_s, arg, mask=s_in)


@triton.jit
def _dsa_summary_backward_kernel(
    gs_ptr, arg_ptr, gx_ptr,
    C, HW, W, n_sblk,
    sgb, sgc, sgh, sgw,
    FLAT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, offs_s, s_in, h, w = _dsa_pixels(tl.program_id(0), HW, W, n_sblk, BLOCK_S)
    gs = gs_ptr + b * 2 * HW + offs_s
    g_mean = tl.load(gs, mask=s_in, other=0.0).to(ACC) / C
    g_max = tl.load(gs + HW, mask=s_in, other=0.0).to(ACC)
    arg = tl.load(arg_ptr + b * HW + offs_s, mask=s_in, other=-1)
    gx_pix = gx_ptr + b * sgb + (offs_s * sgw if FLAT else h * sgh + w * sgw)
    for i in range(0, tl.cdiv(C, BLOCK_C)):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (offs_c < C)[:, None] & s_in[None, :]
        # where, not a product: a NaN max gradient reaches only the argmax channel.
        g = g_mean[None, :] + tl.where(offs_c[:, None] == arg[None, :], g_max[None, :], 0.0)
        tl.store(
            gx_pix[None, :] + offs_c[:, None] * sgc, g.to(gx_ptr.dtype.element_ty), mask=inside
        )


@triton.jit
def _dsa_apply_kernel(
    x_ptr, m_ptr, y_ptr,
    C, HW, W, n_sblk,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    FLAT_X: tl.constexpr, FLAT_Y: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, offs_s, s_in, h, w = _dsa_pixels(tl.program_id(0), HW, W, n_sblk, BLOCK_S)
    mask = tl.load(m_ptr + b * HW + offs_s, mask=s_in, other=0.0).to(ACC)
    x_pix = x_ptr + b * sxb + (offs_s * sxw if FLAT_X else h * sxh + w * sxw)
    y_pix = y_ptr + b * syb + (offs_s * syw if FLAT_Y else h * syh + w * syw)
    for i in range(0, tl.cdiv(C, BLOCK_C)):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (offs_c < C)[:, None] & s_in[None, :]
        v = tl.load(x_pix[None, :] + offs_c[:, None] * sxc, mask=inside, other=0.0).to(ACC)
        tl.store(
            y_pix[None, :] + offs_c[:, None] * syc,
            (v * mask[None, :]).to(y_ptr.dtype.element_ty),
            mask=inside,
        )


@triton.jit
def _dsa_apply_backward_kernel(
    gy_ptr, x_ptr, m_ptr, gx_ptr, gm_ptr,
    C, HW, W, n_sblk,
    sgyb, sgyc, sgyh, sgyw,
    sxb, sxc, sxh, sxw,
    sgxb, sgxc, sgxh, sgxw,
    FLAT_GY: tl.constexpr, FLAT_X: tl.constexpr, FLAT_GX: tl.constexpr,
    WRITE_GX: tl.constexpr, WRITE_GM: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, offs_s, s_in, h, w = _dsa_pixels(tl.program_id(0), HW, W, n_sblk, BLOCK_S)
    mask = tl.load(m_ptr + b * HW + offs_s, mask=s_in, other=0.0).to(ACC)
    gy_pix = gy_ptr + b * sgyb + (offs_s * sgyw if FLAT_GY else h * sgyh + w * sgyw)
    x_pix = x_ptr + b * sxb + (offs_s * sxw if FLAT_X else h * sxh + w * sxw)
    gx_pix = gx_ptr + b * sgxb + (offs_s * sgxw if FLAT_GX else h * sgxh + w * sgxw)
    acc = tl.zeros((BLOCK_C, BLOCK_S), ACC)
    for i in range(0, tl.cdiv(C, BLOCK_C)):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (offs_c < C)[:, None] & s_in[None, :]
        gy = tl.load(gy_pix[None, :] + offs_c[:, None] * sgyc, mask=inside, other=0.0).to(ACC)
        if WRITE_GX:
            tl.store(
                gx_pix[None, :] + offs_c[:, None] * sgxc,
                (gy * mask[None, :]).to(gx_ptr.dtype.element_ty),
                mask=inside,
            )
        if WRITE_GM:
            v = tl.load(x_pix[None, :] + offs_c[:, None] * sxc, mask=inside, other=0.0)
            acc += gy * v.to(ACC)
    if WRITE_GM:
        tl.store(
            gm_ptr + b * HW + offs_s, tl.reduce(acc, 0, _ADD).to(gm_ptr.dtype.element_ty), mask=s_in
        )


@triton.jit
def _coord_planes(pid, C, n_planes, FOLD: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``(b, c)`` planes program ``pid`` owns: ``(plane, b, c, in_range)``, ``BLOCK_C`` each.

    With ``FOLD`` (``BLOCK_C >= C``) a program owns ``BLOCK_C`` consecutive planes, b-major,
    so that a small ``C`` wastes no lanes; otherwise ``BLOCK_C`` consecutive channels of one
    sample, so that Triton sees channels_last loads as contiguous and vectorises them.
    """
    if FOLD:
        plane = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = plane < n_planes
        plane = plane.to(tl.int64)
        pb, pc = plane // C, plane % C
    else:
        n_cblk = tl.cdiv(C, BLOCK_C)
        pb = (pid // n_cblk).to(tl.int64)
        pc = (pid % n_cblk) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_in = pc < C
        plane = pb * C + pc
    return plane, pb, pc, c_in


@triton.jit
def _coord_pool_kernel(
    x_ptr, xh_ptr, xw_ptr, stat_h_ptr, stat_w_ptr,
    C, H, W, n_planes,
    sxb, sxc, sxh, sxw,
    WITH_MAX: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    x_cw = x_ptr + (pb * sxb + pc * sxc)[:, None, None] + offs_w[None, None, :] * sxw
    col_sum = tl.zeros((BLOCK_C, BLOCK_W), ACC)
    col_max = tl.full((BLOCK_C, BLOCK_W), float("-inf"), ACC)
    col_cnt = tl.zeros((BLOCK_C, BLOCK_W), tl.int32)
    col_nan = tl.zeros((BLOCK_C, BLOCK_W), tl.int32)
    for i in range(0, tl.cdiv(H, BLOCK_H)):
        offs_h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        v = tl.load(x_cw + offs_h[None, :, None] * sxh, mask=inside, other=0.0).to(ACC)
        col_sum += tl.reduce(v, 1, _ADD)
        row = tl.reduce(v, 2, _ADD) / W
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        if WITH_MAX:
            ok = inside & (v == v)
            key = tl.where(ok, v, float("-inf"))
            # amax's gradient is split among ties: keep the tie count with the max.
            r_max = tl.reduce(key, 2, _MAX)
            r_cnt = tl.reduce((ok & (key == r_max[:, :, None])).to(tl.int32), 2, _ADD)
            r_nan = tl.reduce((inside & (v != v)).to(tl.int32), 2, _MAX) > 0
            r_max = tl.where(r_nan, float("nan"), r_max)
            r_cnt = tl.where(r_nan, 0, r_cnt)
            row = 0.5 * (row + r_max)
            tl.store(stat_h_ptr + row_at, r_max, mask=ch_in)
            tl.store(stat_h_ptr + n_planes * H + row_at, r_cnt.to(ACC), mask=ch_in)
            t_max = tl.reduce(key, 1, _MAX)
            t_cnt = tl.reduce((ok & (key == t_max[:, None, :])).to(tl.int32), 1, _ADD)
            col_cnt = tl.where(
                t_max > col_max, t_cnt, tl.where(t_max == col_max, col_cnt + t_cnt, col_cnt)
            )
            col_max = tl.maximum(col_max, t_max)
            col_nan = tl.maximum(col_nan, tl.reduce((inside & (v != v)).to(tl.int32), 1, _MAX))
        tl.store(xh_ptr + row_at, row.to(xh_ptr.dtype.element_ty), mask=ch_in)
    col = col_sum / H
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    if WITH_MAX:
        col_max = tl.where(col_nan > 0, float("nan"), col_max)
        col_cnt = tl.where(col_nan > 0, 0, col_cnt)
        col = 0.5 * (col + col_max)
        tl.store(stat_w_ptr + col_at, col_max, mask=cw_in)
        tl.store(stat_w_ptr + n_planes * W + col_at, col_cnt.to(ACC), mask=cw_in)
    tl.store(xw_ptr + col_at, col.to(xw_ptr.dtype.element_ty), mask=cw_in)


@triton.jit
def _coord_pool_backward_kernel(
    gh_ptr, gw_ptr, x_ptr, stat_h_ptr, stat_w_ptr, gx_ptr,
    C, H, W, n_planes,
    sxb, sxc, sxh, sxw,
    sgb, sgc, sgh, sgw,
    WITH_MAX: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    g_w = tl.load(gw_ptr + col_at, mask=cw_in, other=0.0).to(ACC)
    if WITH_MAX:
        g_w = 0.5 * g_w  # x_w = 0.5 * (mean + max): each half gets half the gradient
        col_max = tl.load(stat_w_ptr + col_at, mask=cw_in, other=0.0)
        # amax's backward: grad / count * (x == max); a NaN column has count 0 -> NaN.
        g_w_max = g_w / tl.load(stat_w_ptr + n_planes * W + col_at, mask=cw_in, other=1.0)
    g_w = g_w / H
    x_cw = x_ptr + (pb * sxb + pc * sxc)[:, None, None] + offs_w[None, None, :] * sxw
    gx_cw = gx_ptr + (pb * sgb + pc * sgc)[:, None, None] + offs_w[None, None, :] * sgw
    for i in range(0, tl.cdiv(H, BLOCK_H)):
        offs_h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        g_h = tl.load(gh_ptr + row_at, mask=ch_in, other=0.0).to(ACC)
        if WITH_MAX:
            g_h = 0.5 * g_h
            row_max = tl.load(stat_h_ptr + row_at, mask=ch_in, other=0.0)
            g_h_max = g_h / tl.load(stat_h_ptr + n_planes * H + row_at, mask=ch_in, other=1.0)
        g = (g_h / W)[:, :, None] + g_w[:, None, :]
        if WITH_MAX:
            v = tl.load(x_cw + offs_h[None, :, None] * sxh, mask=inside, other=0.0).to(ACC)
            g += g_h_max[:, :, None] * (v == row_max[:, :, None]).to(ACC)
            g += g_w_max[:, None, :] * (v == col_max[:, None, :]).to(ACC)
        tl.store(
            gx_cw + offs_h[None, :, None] * sgh, g.to(gx_ptr.dtype.element_ty), mask=inside
        )


@triton.jit
def _coord_scale_kernel(
    x_ptr, uh_ptr, uw_ptr, c_ptr, k_ptr, y_ptr,
    C, H, W, n_planes,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    HAS_C: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    k = tl.load(k_ptr).to(ACC)
    c = tl.load(c_ptr).to(ACC) if HAS_C else 0.0
    u_w = tl.load(
        uw_ptr + plane[:, None] * W + offs_w[None, :], mask=c_in[:, None] & w_in[None, :],
        other=0.0,
    ).to(ACC)
    x_cw = x_ptr + (pb * sxb + pc * sxc)[:, None, None] + offs_w[None, None, :] * sxw
    y_cw = y_ptr + (pb * syb + pc * syc)[:, None, None] + offs_w[None, None, :] * syw
    for i in range(0, tl.cdiv(H, BLOCK_H)):
        offs_h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        u_h = tl.load(
            uh_ptr + plane[:, None] * H + offs_h[None, :], mask=c_in[:, None] & h_in[None, :],
            other=0.0,
        ).to(ACC)
        v = tl.load(x_cw + offs_h[None, :, None] * sxh, mask=inside, other=0.0).to(ACC)
        scale = k * (u_h[:, :, None] * u_w[:, None, :])
        if HAS_C:
            scale = c + scale
        tl.store(
            y_cw + offs_h[None, :, None] * syh, (v * scale).to(y_ptr.dtype.element_ty),
            mask=inside,
        )


@triton.jit
def _coord_scale_backward_kernel(
    gy_ptr, x_ptr, uh_ptr, uw_ptr, c_ptr, k_ptr,
    gx_ptr, rows_gu_ptr, cols_gu_ptr, rows_g_ptr,
    C, H, W, n_planes,
    sgyb, sgyc, sgyh, sgyw,
    sxb, sxc, sxh, sxw,
    sgxb, sgxc, sgxh, sgxw,
    HAS_C: tl.constexpr, WRITE_GX: tl.constexpr, REDUCE: tl.constexpr,
    REDUCE_G: tl.constexpr, ACC: tl.constexpr,
    FOLD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane, pb, pc, c_in = _coord_planes(tl.program_id(0), C, n_planes, FOLD, BLOCK_C)
    offs_w = tl.arange(0, BLOCK_W)
    w_in = offs_w < W
    cw_in = c_in[:, None] & w_in[None, :]
    col_at = plane[:, None] * W + offs_w[None, :]
    k = tl.load(k_ptr).to(ACC)
    c = tl.load(c_ptr).to(ACC) if HAS_C else 0.0
    u_w = tl.load(uw_ptr + col_at, mask=cw_in, other=0.0).to(ACC)
    gy_cw = gy_ptr + (pb * sgyb + pc * sgyc)[:, None, None] + offs_w[None, None, :] * sgyw
    x_cw = x_ptr + (pb * sxb + pc * sxc)[:, None, None] + offs_w[None, None, :] * sxw
    gx_cw = gx_ptr + (pb * sgxb + pc * sgxc)[:, None, None] + offs_w[None, None, :] * sgxw
    col_gu = tl.zeros((BLOCK_C, BLOCK_W), ACC)
    for i in range(0, tl.cdiv(H, BLOCK_H)):
        offs_h = i * BLOCK_H + tl.arange(0, BLOCK_H)
        h_in = offs_h < H
        inside = c_in[:, None, None] & h_in[None, :, None] & w_in[None, None, :]
        ch_in = c_in[:, None] & h_in[None, :]
        row_at = plane[:, None] * H + offs_h[None, :]
        u_h = tl.load(uh_ptr + row_at, mask=ch_in, other=0.0).to(ACC)
        gy = tl.load(gy_cw + offs_h[None, :, None] * sgyh, mask=inside, other=0.0).to(ACC)
        if WRITE_GX:
            scale = k * (u_h[:, :, None] * u_w[:, None, :])
            if HAS_C:
                scale = c + scale
            tl.store(
                gx_cw + offs_h[None, :, None] * sgxh, (gy * scale).to(gx_ptr.dtype.element_ty),
                mask=inside,
            )
        if REDUCE:
            v = tl.load(x_cw + offs_h[None, :, None] * sxh, mask=inside, other=0.0).to(ACC)
            g = gy * v
            tl.store(rows_gu_ptr + row_at, tl.reduce(g * u_w[:, None, :], 2, _ADD), mask=ch_in)
            col_gu += tl.reduce(g * u_h[:, :, None], 1, _ADD)
            if REDUCE_G:
                tl.store(rows_g_ptr + row_at, tl.reduce(g, 2, _ADD), mask=ch_in)
    if REDUCE:
        tl.store(cols_gu_ptr + col_at, col_gu, mask=cw_in)


# ------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------


def _acc(*tensors: Tensor | None):
    """float64 accumulation when an input is float64, float32 otherwise."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def _acc_torch(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if _acc(*tensors) is tl.float64 else torch.float32


def _check_span(t: Tensor, name: str) -> None:
    span = sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:], strict=True))
    if span > _MAX_SAMPLE_SPAN:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} spans {span} elements per sample; the Triton "
            "kernels index a sample with 32-bit offsets (at most 2**31 - 1): use "
            "backend='torch'"
        )


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


#: CUDA: 2048 elements (8 KB of float32, 16 per thread with 4 warps); runs of 256 pixels
#: (1 KB) or 64 channels (256 B) along the contiguous dimension; 32 channel planes per
#: CoordinateAttention program in channels_last, so that (64, 256, 56, 56) still makes 512
#: programs for 132 SMs.
GPU_TILES = TileSizes(elements=2048, dsa_pixels=256, dsa_channels=64, coord_channels=32)
#: Triton's interpreter costs per program and per op, hardly per element: on CPU tensors
#: (the tests) eight times larger tiles mean up to eight times fewer programs. The tests that
#: check the kernels' loops over several tiles switch to :data:`GPU_TILES`.
INTERPRETER_TILES = TileSizes(
    elements=16384, dsa_pixels=2048, dsa_channels=512, coord_channels=256
)


def _tile_sizes(x: Tensor) -> TileSizes:
    return GPU_TILES if x.device.type == "cuda" else INTERPRETER_TILES


def _dsa_tiles(x: Tensor) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)``: long contiguous runs along whichever of C and H*W is
    contiguous, about ``elements`` per step."""
    sizes = _tile_sizes(x)
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    if _channels_fast(x):
        block_c = min(triton.next_power_of_2(c), sizes.dsa_channels)
        block_s = min(triton.next_power_of_2(hw), max(1, sizes.elements // block_c))
    else:
        block_s = min(triton.next_power_of_2(hw), sizes.dsa_pixels)
        block_c = min(triton.next_power_of_2(c), max(1, sizes.elements // block_s))
    return block_c, block_s


def _coord_launch(x: Tensor) -> tuple[tuple[int], dict]:
    """Grid and tile parameters of the CoordinateAttention kernels: ``BLOCK_C`` channel
    planes per program, ``BLOCK_H`` whole rows of each per step, about ``elements`` per step;
    ``FOLD`` when a block spans more than one sample's channels."""
    sizes = _tile_sizes(x)
    b, c, h, w = x.shape
    block_w = triton.next_power_of_2(w)
    if block_w > _MAX_ROW:
        raise ValueError(
            f"backend='triton' CoordinateAttention kernels hold whole rows of at most "
            f"{_MAX_ROW} elements; got an input of width W={w} (shape {tuple(x.shape)}): "
            "use backend='torch'"
        )
    planes = triton.next_power_of_2(b * c)
    if _channels_fast(x):
        block_c = min(planes, sizes.coord_channels, max(1, sizes.elements // block_w))
        block_h = min(triton.next_power_of_2(h), max(1, sizes.elements // (block_c * block_w)))
    else:
        block_h = min(triton.next_power_of_2(h), max(1, sizes.elements // block_w))
        block_c = min(planes, max(1, sizes.elements // (block_h * block_w)))
    fold = block_c > c
    grid = (triton.cdiv(b * c, block_c),) if fold else (b * triton.cdiv(c, block_c),)
    return grid, {
        "FOLD": fold, "BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w,
        "num_warps": 4 if block_c * block_h * block_w <= GPU_TILES.elements else 8,
    }


# ------------------------------------------------------------------------------------------
# DSA ops
# ------------------------------------------------------------------------------------------


@torch.library.custom_op("lightning_attn::dsa_summary", mutates_args=())
def _dsa_summary(x: Tensor) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    s = x.new_empty((b, 2, h, w))
    arg = x.new_empty((b, 1, h, w), dtype=torch.int32)
    if x.numel() == 0:
        return s, arg
    check_triton_input(x, "lightning_attn::dsa_summary")
    _check_span(x, "x")
    strides, flat = _pixel_strides(x)
    block_c, block_s = _dsa_tiles(x)
    n_sblk = triton.cdiv(h * w, block_s)
    _dsa_summary_kernel[(b * n_sblk,)](
        x, s, arg, c, h * w, w, n_sblk, *strides,
        FLAT=flat, ACC=_acc(x), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return s, arg


@_dsa_summary.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    b, _, h, w = x.shape
    return x.new_empty((b, 2, h, w)), x.new_empty((b, 1, h, w), dtype=torch.int32)


@torch.library.custom_op("lightning_attn::dsa_summary_backward", mutates_args=())
def _dsa_summary_backward(grad_s: Tensor, arg: Tensor, x: Tensor) -> Tensor:
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    b, c, h, w = x.shape
    grad_s = grad_s.contiguous()
    strides, flat = _pixel_strides(grad_x)
    block_c, block_s = _dsa_tiles(grad_x)
    n_sblk = triton.cdiv(h * w, block_s)
    _dsa_summary_backward_kernel[(b * n_sblk,)](
        grad_s, arg, grad_x, c, h * w, w, n_sblk, *strides,
        FLAT=flat, ACC=_acc(grad_s, x), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return grad_x


@_dsa_summary_backward.register_fake
def _(grad_s: Tensor, arg: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _dsa_summary_setup(ctx, inputs, output) -> None:
    (x,) = inputs
    _, arg = output
    ctx.save_for_backward(x, arg)


def _dsa_summary_grad(ctx, grad_s: Tensor, _grad_arg) -> Tensor:
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    x, arg = ctx.saved_tensors
    return torch.ops.lightning_attn.dsa_summary_backward(grad_s, arg, x)


_dsa_summary.register_autograd(_dsa_summary_grad, setup_context=_dsa_summary_setup)


@torch.library.custom_op("lightning_attn::dsa_apply", mutates_args=())
def _dsa_apply(x: Tensor, mask: Tensor) -> Tensor:
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, mask.dtype))
    if x.numel() == 0:
        return y
    check_triton_input(x, "lightning_attn::dsa_apply")
    _check_span(x, "x")
    b, c, h, w = x.shape
    x_strides, x_flat = _pixel_strides(x)
    y_strides, y_flat = _pixel_strides(y)
    block_c, block_s = _dsa_tiles(x)
    n_sblk = triton.cdiv(h * w, block_s)
    _dsa_apply_kernel[(b * n_sblk,)](
        x, mask.contiguous(), y, c, h * w, w, n_sblk, *x_strides, *y_strides,
        FLAT_X=x_flat, FLAT_Y=y_flat, ACC=_acc(x, mask), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return y


@_dsa_apply.register_fake
def _(x: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, mask.dtype))


@torch.library.custom_op("lightning_attn::dsa_apply_backward", mutates_args=())
def _dsa_apply_backward(
    grad_y: Tensor, x: Tensor, mask: Tensor, need_x: bool, need_mask: bool
) -> tuple[Tensor, Tensor]:
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    grad_mask = torch.empty_like(mask, memory_format=torch.contiguous_format)
    if not need_mask:
        grad_mask = mask.new_empty(0)
    if x.numel() == 0 or not (need_x or need_mask):
        return grad_x, grad_mask.zero_()
    _check_span(grad_y, "grad_y")
    b, c, h, w = x.shape
    gy_strides, gy_flat = _pixel_strides(grad_y)
    x_strides, x_flat = _pixel_strides(x)
    gx_strides, gx_flat = _pixel_strides(grad_x) if need_x else (x_strides, x_flat)
    block_c, block_s = _dsa_tiles(x)
    n_sblk = triton.cdiv(h * w, block_s)
    _dsa_apply_backward_kernel[(b * n_sblk,)](
        grad_y, x, mask.contiguous(), grad_x if need_x else x, grad_mask if need_mask else mask,
        c, h * w, w, n_sblk, *gy_strides, *x_strides, *gx_strides,
        FLAT_GY=gy_flat, FLAT_X=x_flat, FLAT_GX=gx_flat, WRITE_GX=need_x, WRITE_GM=need_mask,
        ACC=_acc(grad_y, x, mask), BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return grad_x, grad_mask


@_dsa_apply_backward.register_fake
def _(grad_y, x, mask, need_x, need_mask):
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    if not need_mask:
        return grad_x, mask.new_empty(0)
    return grad_x, torch.empty_like(mask, memory_format=torch.contiguous_format)


def _dsa_apply_setup(ctx, inputs, output) -> None:
    x, mask = inputs
    ctx.save_for_backward(x, mask)


def _dsa_apply_grad(ctx, grad_y: Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    x, mask = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad
    grad_x, grad_mask = torch.ops.lightning_attn.dsa_apply_backward(
        grad_y, x, mask, need_x, need_mask
    )
    return (grad_x if need_x else None), (grad_mask if need_mask else None)


_dsa_apply.register_autograd(_dsa_apply_grad, setup_context=_dsa_apply_setup)


# ------------------------------------------------------------------------------------------
# CoordinateAttention ops
# ------------------------------------------------------------------------------------------


def _coord_pool_outputs(x: Tensor, with_max: bool):
    b, c, h, w = x.shape
    acc = _acc_torch(x)
    stat_h = x.new_empty((2, b, c, h), dtype=acc) if with_max else x.new_empty(0, dtype=acc)
    stat_w = x.new_empty((2, b, c, w), dtype=acc) if with_max else x.new_empty(0, dtype=acc)
    return x.new_empty((b, c, h, 1)), x.new_empty((b, c, 1, w)), stat_h, stat_w


@torch.library.custom_op("lightning_attn::coord_pool", mutates_args=())
def _coord_pool(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_h, x_w, stat_h, stat_w = _coord_pool_outputs(x, with_max)
    if x.numel() == 0:
        return x_h, x_w, stat_h, stat_w
    check_triton_input(x, "lightning_attn::coord_pool")
    _check_span(x, "x")
    b, c, h, w = x.shape
    grid, launch = _coord_launch(x)
    _coord_pool_kernel[grid](
        x, x_h, x_w, stat_h if with_max else x_h, stat_w if with_max else x_w,
        c, h, w, b * c, *x.stride(),
        WITH_MAX=with_max, ACC=_acc(x),
        **launch,
    )
    return x_h, x_w, stat_h, stat_w


@_coord_pool.register_fake
def _(x: Tensor, with_max: bool):
    return _coord_pool_outputs(x, with_max)


@torch.library.custom_op("lightning_attn::coord_pool_backward", mutates_args=())
def _coord_pool_backward(
    grad_h: Tensor, grad_w: Tensor, x: Tensor, stat_h: Tensor, stat_w: Tensor, with_max: bool
) -> Tensor:
    grad_x = torch.empty_like(x)
    if x.numel() == 0:
        return grad_x
    b, c, h, w = x.shape
    grid, launch = _coord_launch(grad_x)
    _coord_pool_backward_kernel[grid](
        grad_h.contiguous(), grad_w.contiguous(), x,
        stat_h if with_max else grad_x, stat_w if with_max else grad_x, grad_x,
        c, h, w, b * c, *x.stride(), *grad_x.stride(),
        WITH_MAX=with_max, ACC=_acc(grad_h, grad_w, x),
        **launch,
    )
    return grad_x


@_coord_pool_backward.register_fake
def _(grad_h, grad_w, x, stat_h, stat_w, with_max):
    return torch.empty_like(x)


def _coord_pool_setup(ctx, inputs, output) -> None:
    x, with_max = inputs
    _, _, stat_h, stat_w = output
    ctx.save_for_backward(x, stat_h, stat_w)
    ctx.with_max = with_max


def _coord_pool_grad(ctx, grad_h, grad_w, _grad_stat_h, _grad_stat_w):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    x, stat_h, stat_w = ctx.saved_tensors
    b, c, h, w = x.shape
    if grad_h is None:
        grad_h = x.new_zeros((b, c, h, 1))
    if grad_w is None:
        grad_w = x.new_zeros((b, c, 1, w))
    grad_x = torch.ops.lightning_attn.coord_pool_backward(
        grad_h, grad_w, x, stat_h, stat_w, ctx.with_max
    )
    return grad_x, None


_coord_pool.register_autograd(_coord_pool_grad, setup_context=_coord_pool_setup)


@torch.library.custom_op("lightning_attn::coord_scale", mutates_args=())
def _coord_scale(
    x: Tensor, u_h: Tensor, u_w: Tensor, c: Tensor | None, k: Tensor
) -> Tensor:
    y = torch.empty_like(x, dtype=_coord_scale_dtype(x, u_h, u_w))
    if x.numel() == 0:
        return y
    check_triton_input(x, "lightning_attn::coord_scale")
    _check_span(x, "x")
    b, ch, h, w = x.shape
    grid, launch = _coord_launch(x)
    _coord_scale_kernel[grid](
        x, u_h.contiguous(), u_w.contiguous(), k if c is None else c, k, y,
        ch, h, w, b * ch, *x.stride(), *y.stride(),
        HAS_C=c is not None, ACC=_acc(x, u_h, u_w, c, k),
        **launch,
    )
    return y


def _coord_scale_dtype(x: Tensor, u_h: Tensor, u_w: Tensor) -> torch.dtype:
    # As ``x * (c + k * u_h * u_w)`` in torch: the 0-d c and k never promote the maps.
    return torch.promote_types(x.dtype, torch.promote_types(u_h.dtype, u_w.dtype))


@_coord_scale.register_fake
def _(x, u_h, u_w, c, k):
    return torch.empty_like(x, dtype=_coord_scale_dtype(x, u_h, u_w))


@torch.library.custom_op("lightning_attn::coord_scale_backward", mutates_args=())
def _coord_scale_backward(
    grad_y: Tensor, x: Tensor, u_h: Tensor, u_w: Tensor, c: Tensor | None, k: Tensor,
    need_x: bool, need_maps: bool, need_c: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_x, rows_gu, cols_gu, rows_g = _coord_scale_backward_outputs(
        x, u_h, u_w, c, k, need_x, need_maps, need_c
    )
    if x.numel() == 0 or not (need_x or need_maps):
        return grad_x, rows_gu.zero_(), cols_gu.zero_(), rows_g.zero_()
    _check_span(grad_y, "grad_y")
    b, ch, h, w = x.shape
    grid, launch = _coord_launch(x)
    _coord_scale_backward_kernel[grid](
        grad_y, x, u_h.contiguous(), u_w.contiguous(), k if c is None else c, k,
        grad_x if need_x else x, rows_gu if need_maps else x, cols_gu if need_maps else x,
        rows_g if need_c else x,
        ch, h, w, b * ch, *grad_y.stride(), *x.stride(),
        *(grad_x.stride() if need_x else x.stride()),
        HAS_C=c is not None, WRITE_GX=need_x, REDUCE=need_maps, REDUCE_G=need_c,
        ACC=_acc(grad_y, x, u_h, u_w, c, k),
        **launch,
    )
    return grad_x, rows_gu, cols_gu, rows_g


def _coord_scale_backward_outputs(x, u_h, u_w, c, k, need_x, need_maps, need_c):
    b, ch, h, w = x.shape
    acc = _acc_torch(x, u_h, u_w, c, k)
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    rows_gu = x.new_empty((b, ch, h) if need_maps else (0,), dtype=acc)
    cols_gu = x.new_empty((b, ch, w) if need_maps else (0,), dtype=acc)
    rows_g = x.new_empty((b, ch, h) if need_c else (0,), dtype=acc)
    return grad_x, rows_gu, cols_gu, rows_g


@_coord_scale_backward.register_fake
def _(grad_y, x, u_h, u_w, c, k, need_x, need_maps, need_c):
    return _coord_scale_backward_outputs(x, u_h, u_w, c, k, need_x, need_maps, need_c)


def _coord_scale_setup(ctx, inputs, output) -> None:
    x, u_h, u_w, c, k = inputs
    ctx.has_c = c is not None
    ctx.save_for_backward(x, u_h, u_w, c if c is not None else k, k)


def _coord_scale_grad(ctx, grad_y: Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD)
    x, u_h, u_w, c, k = ctx.saved_tensors
    c = c if ctx.has_c else None
    need_x, need_h, need_w, need_c, need_k = ctx.needs_input_grad
    need_c = need_c and c is not None
    need_maps = need_h or need_w or need_c or need_k
    grad_x, rows_gu, cols_gu, rows_g = torch.ops.lightning_attn.coord_scale_backward(
        grad_y, x, u_h, u_w, c, k, need_x, need_maps, need_c
    )
    # d y / d u_h = k * sum_W(grad_y * x * u_w), d y / d k = sum(grad_y * x * u_h * u_w):
    # small maps, finished in torch.
    grad_h = grad_w = grad_c = grad_k = None
    if need_h:
        grad_h = (k * rows_gu).unsqueeze(-1).to(u_h.dtype)
    if need_w:
        grad_w = (k * cols_gu).unsqueeze(-2).to(u_w.dtype)
    if need_k:
        grad_k = (rows_gu * u_h.squeeze(-1)).sum().to(k.dtype)
    if need_c:
        grad_c = rows_g.sum().to(c.dtype)
    return (grad_x if need_x else None), grad_h, grad_w, grad_c, grad_k


_coord_scale.register_autograd(_coord_scale_grad, setup_context=_coord_scale_setup)


# ------------------------------------------------------------------------------------------
# Public functions (what the blocks call)
# ------------------------------------------------------------------------------------------


def _check_map(name: str, t: Tensor, shape: tuple[int, ...], x: Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_x(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point (B, C, H, W) tensor, got shape {tuple(x.shape)} "
            f"and dtype {x.dtype}"
        )


def dsa_summary(x: Tensor) -> Tensor:
    """``x (B,C,H,W) -> s (B,2,H,W)``: ``[mean_C x, max_C x]`` in ``x.dtype`` (contiguous).

    One read of ``x``. The gradient of the max goes to the first maximal channel (the index
    ``torch.max(x, 1)`` returns, kept as int32 ``(B,1,H,W)``), so ReLU zeros tied at the max
    send it to one channel as in the seed.
    """
    _check_x(x)
    return torch.ops.lightning_attn.dsa_summary(x)[0]


def dsa_apply(x: Tensor, mask: Tensor) -> Tensor:
    """``y = x * mask`` with ``mask (B,1,H,W)`` broadcast over ``C``; ``y`` keeps ``x``'s
    layout and has the promoted dtype of ``x`` and ``mask``.

    Backward: ``grad_x = grad_y * mask`` and ``grad_mask = sum_C(grad_y * x)`` in one kernel.
    """
    _check_x(x)
    b, _, h, w = x.shape
    _check_map("mask", mask, (b, 1, h, w), x)
    return torch.ops.lightning_attn.dsa_apply(x, mask)


def coord_pool(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor]:
    """``x (B,C,H,W) -> (x_h (B,C,H,1), x_w (B,C,1,W))`` in one read of ``x``.

    ``x_h = mean_W x``, ``x_w = mean_H x``; with ``with_max`` each is ``(mean + max) / 2``
    along its axis (CoordinateAttention's add-on 1), the max gradient split evenly among tied
    maxima exactly as ``amax``'s (the plain path's).
    """
    _check_x(x)
    x_h, x_w, _, _ = torch.ops.lightning_attn.coord_pool(x, bool(with_max))
    return x_h, x_w


def coord_scale(
    x: Tensor, u_h: Tensor, u_w: Tensor, c: Tensor | None, k: Tensor
) -> Tensor:
    """``y = x * (c + k * u_h * u_w)``, ``u_h (B,C,H,1)``, ``u_w (B,C,1,W)``, ``c`` and ``k``
    0-d tensors; ``c=None`` is an exact zero (its term is skipped).

    Differentiable w.r.t. all five; the backward reads ``grad_y`` and ``x`` once, writes
    ``grad_x`` and reduces ``k * sum_W(grad_y x u_w)``, ``k * sum_H(grad_y x u_h)`` and the
    scalar sums for ``c`` and ``k``.
    """
    _check_x(x)
    b, ch, h, w = x.shape
    _check_map("u_h", u_h, (b, ch, h, 1), x)
    _check_map("u_w", u_w, (b, ch, 1, w), x)
    for name, t in (("c", c), ("k", k)):
        if t is not None and (t.dim() != 0 or t.device != x.device):
            raise ValueError(
                f"{name} must be a 0-d tensor on {x.device}, got shape {tuple(t.shape)} on "
                f"{t.device}"
            )
    return torch.ops.lightning_attn.coord_scale(x, u_h, u_w, c, k)
