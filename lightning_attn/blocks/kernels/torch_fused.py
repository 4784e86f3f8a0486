"""Fused autograd functions for the full-size work of both blocks.

The attention blocks spend almost all their time and memory on a few elementwise passes
over the ``(B, C, H, W)`` input; everything else is on small maps. These functions do that
full-size work in as few passes as possible and keep no full-size tensor beyond the input
(which autograd keeps anyway) and the output.

Both are differentiable once; a second derivative raises. Use ``backend="plain"`` on the block
for double backward.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd import Function, Variable

_DOUBLE_BACKWARD = (
    "the fused fast path of lightning-attn blocks supports first derivatives only; "
    "build the block with backend='plain' for double backward (create_graph=True)"
)


def first_derivative_only(backward):
    """Like ``once_differentiable``, but raise at once under ``create_graph=True``.

    ``once_differentiable`` defers its error to a second backward that, with gradients
    handed between functions through a stash, may never reach it: a wrong second
    derivative would follow silently.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        return backward(ctx, *grads)

    return wrapper


class GradStash:
    """Hands a full-size gradient from one fused function's backward to another's.

    The receiving function consumes it in the same backward pass. Whatever is left at the
    end of a pass (the receiver did not run, e.g. ``autograd.grad`` w.r.t. parameters only)
    is dropped then, so it can never leak into a later pass.
    """

    __slots__ = ("tensors",)

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] | None = None

    def put(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors
        Variable._execution_engine.queue_callback(self.clear)

    def take(self) -> tuple[torch.Tensor, ...] | None:
        tensors, self.tensors = self.tensors, None
        return tensors

    def clear(self) -> None:
        self.tensors = None


__all__ = [
    "GradStash",
    "apply_spatial_mask",
    "axis_mean_pool",
    "axis_scale",
    "first_argmax",
    "spatial_summary",
]


class _SpatialSummary(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, stash: GradStash) -> torch.Tensor:
        avg = x.mean(dim=1, keepdim=True)
        # amax is ~20x faster than torch.max(dim) with indices; the index torch.max would
        # pick (the first maximal channel) is recovered in backward, only when needed.
        mx = x.amax(dim=1, keepdim=True)
        ctx.save_for_backward(x, mx)
        ctx.stash = stash
        # channels_last makes the input-gradient of the 2->1 convolutions ~4x faster.
        return torch.cat([avg, mx], dim=1).contiguous(memory_format=torch.channels_last)

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_s: torch.Tensor):
        x, mx = ctx.saved_tensors
        c = x.shape[1]
        grad_mean = grad_s[:, 0:1] / c
        idx, scratch = _first_argmax(x, mx)
        # The float32 scratch of the index search becomes grad_x when dtypes allow: one
        # full-size buffer for both.
        out = scratch if scratch.dtype == x.dtype else None
        # y = x * mask sends grad_y * mask to x; its backward always runs first (the mask
        # is computed from s) and left grad_y here, so both terms are written in one pass.
        stashed = ctx.stash.take()
        if stashed is not None:
            grad_y, mask = stashed
            if out is not None and torch.result_type(grad_y, mask) != out.dtype:
                out = None
            grad_x = torch.addcmul(grad_mean, grad_y, mask, out=out)
        else:  # y took no part in the loss: only the summary path carries gradient
            grad_x = grad_mean.expand_as(x).to(x.dtype, copy=True)
        grad_x.scatter_add_(1, idx, grad_s[:, 1:2].to(grad_x.dtype))
        return grad_x, None


def first_argmax(x: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """Index of the first channel where ``x`` equals its max ``mx``: ``(B,1,H,W)`` int64.

    Matches the index ``torch.max(x, 1)`` returns, so the max gradient goes to one channel
    among tied maxima (ReLU zeros tie often), as in the seed. A position holding NaN maps
    to the last channel (torch.max would name the NaN's channel); never out of range.
    """
    return _first_argmax(x, mx)[0]


def _first_argmax(x: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`first_argmax` and its full-size float32 scratch, free for the caller."""
    c = x.shape[1]
    # key = rank where x == max (rank c for channel 0 down to 1), rank - c <= 0 elsewhere;
    # its amax is the first maximal channel. Four vectorised passes instead of the slow
    # index-tracking reduction of torch.max / argmax (~5x faster on CPU).
    rank = torch.arange(c, 0, -1, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
    # sign in x's own dtype: a float64 gap below float32's range is still a gap.
    key = (x - mx).sign_().float()
    key.mul_(c).add_(rank)
    first = c - key.amax(dim=1, keepdim=True)
    return first.nan_to_num_(nan=c - 1).long().clamp_(0, c - 1), key


class _ApplySpatialMask(Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, mask: torch.Tensor, stash: GradStash, x_needs_grad: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, mask)
        ctx.stash = stash
        ctx.x_needs_grad = x_needs_grad
        return x * mask

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_y: torch.Tensor):
        x, mask = ctx.saved_tensors
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = (grad_y * x).sum(dim=1, keepdim=True)
        if ctx.x_needs_grad:
            ctx.stash.put(grad_y, mask)
        return None, grad_mask, None, None


def spatial_summary(x: torch.Tensor, stash: GradStash) -> torch.Tensor:
    """``(B,C,H,W) -> (B,2,H,W)`` channels_last ``[mean_c(x), max_c(x)]``."""
    return _SpatialSummary.apply(x, stash)


def apply_spatial_mask(
    x: torch.Tensor, mask: torch.Tensor, stash: GradStash
) -> torch.Tensor:
    """``y = x * mask`` with ``mask`` ``(B,1,H,W)``; its ``x``-gradient is delivered by the
    summary's backward through ``stash`` (``x`` must be the tensor given to
    :func:`spatial_summary` with the same ``stash``)."""
    return _ApplySpatialMask.apply(x.detach(), mask, stash, x.requires_grad)


class _AxisMeanPool(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, stash: GradStash):
        ctx.stash = stash
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_h: torch.Tensor, grad_w: torch.Tensor):
        (b, c, h, w), dtype, device = ctx.x_meta
        grad_h, grad_w = grad_h / w, grad_w / h
        stashed = ctx.stash.take()
        if stashed is None:  # y took no part in the loss
            return (grad_h + grad_w).to(dtype), None
        # grad_x = grad_y * (k u_h) * u_w + c * grad_y + grad_h / W + grad_w / H, written in
        # four passes into one buffer.
        grad_y, ku_h, u_w, scale_c = stashed
        grad_x = grad_y * ku_h
        torch.addcmul(grad_w.to(grad_x.dtype), grad_x, u_w, out=grad_x)
        if isinstance(scale_c, torch.Tensor):
            grad_x.addcmul_(grad_y, scale_c)
        elif scale_c is not None:  # a number (a fixed beta)
            grad_x.add_(grad_y, alpha=scale_c)
        grad_x.add_(grad_h)
        return grad_x, None


def axis_mean_pool(
    x: torch.Tensor, stash: GradStash
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B,C,H,W) -> (mean_W x (B,C,H,1), mean_H x (B,C,1,W))``; its backward also writes
    the ``x``-gradient of :func:`axis_scale` (same ``x``, same ``stash``) into one buffer."""
    return _AxisMeanPool.apply(x, stash)


class _AxisScale(Function):
    """``y = x * (c + k * u_h * u_w)`` without a full-size ``att`` or ``scale``; ``c`` and
    ``k`` 0-d tensors or numbers, ``c=None`` 0 and ``k=None`` 1."""

    @staticmethod
    def forward(ctx, x, u_h, u_w, c, k, stash, x_needs_grad):
        c_t = c if isinstance(c, torch.Tensor) else None
        k_t = k if isinstance(k, torch.Tensor) else None
        ctx.save_for_backward(x, u_h, u_w, c_t, k_t)
        ctx.numbers = (c, k)
        ctx.stash = stash
        ctx.x_needs_grad = x_needs_grad
        y = x * (u_h if k is None else k * u_h)
        y.mul_(u_w)
        if c_t is not None:
            y.addcmul_(x, c_t)
        elif c is not None:
            y.add_(x, alpha=c)
        return y

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_y):
        x, u_h, u_w, c_t, k_t = ctx.saved_tensors
        c, k = ctx.numbers
        c = c_t if c_t is not None else c
        k = k_t if k_t is not None else k
        _, need_h, need_w, need_c, need_k, _, _ = ctx.needs_input_grad
        grad_h = grad_w = grad_c = grad_k = None
        if ctx.x_needs_grad:  # the pooling's backward writes grad_x (see axis_mean_pool)
            ctx.stash.put(grad_y, u_h if k is None else k * u_h, u_w, c)
        if need_h or need_w or need_c or need_k:
            g = grad_y * x
            u_h, u_w = u_h.to(g.dtype), u_w.to(g.dtype)  # autocast may leave them in bf16
            # sum_w g[b,c,h,w] * u_w[b,c,w] and sum_h u_h[b,c,h] * g[b,c,h,w] are batched
            # matrix products over (B, C).
            if need_c:
                grad_c = g.sum().reshape(c.shape)
            gh = torch.matmul(g, u_w.transpose(-1, -2))  # (B,C,H,1)
            if need_h:
                grad_h = gh if k is None else gh * k
            if need_k:
                grad_k = (gh * u_h).sum().reshape(k.shape)
            if need_w:
                grad_w = torch.matmul(u_h.transpose(-1, -2), g)  # (B,C,1,W)
                grad_w = grad_w if k is None else grad_w * k
        return None, grad_h, grad_w, grad_c, grad_k, None, None


def axis_scale(
    x: torch.Tensor,
    u_h: torch.Tensor,
    u_w: torch.Tensor,
    c: torch.Tensor | float | None,
    k: torch.Tensor | float | None,
    stash: GradStash,
) -> torch.Tensor:
    """``x (B,C,H,W) * (c + k * u_h (B,C,H,1) * u_w (B,C,1,W))``, ``c`` and ``k`` 0-d
    tensors or numbers; ``c=None`` stands for an exact zero (its full-size pass is skipped),
    ``k=None`` for an exact one.

    The ``x``-gradient is delivered by :func:`axis_mean_pool`'s backward through ``stash``;
    ``x`` must be the tensor given to it.
    """
    return _AxisScale.apply(x.detach(), u_h, u_w, c, k, stash, x.requires_grad)
