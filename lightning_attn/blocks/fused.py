"""Fused autograd functions for the full-size work of both blocks.

The attention blocks spend almost all their time and memory on a few elementwise passes
over the ``(B, C, H, W)`` input; everything else is on small maps. These functions do that
full-size work in as few passes as possible and keep no full-size tensor beyond the input
(which autograd keeps anyway) and the output.

Both are differentiable once; a second derivative raises. Use ``fused=False`` on the block
for double backward.
"""

from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["spatial_summary", "apply_spatial_mask", "SpatialGradStash", "axis_scale"]


class SpatialGradStash:
    """Hands ``grad_y`` from the mask product's backward to the channel summary's backward.

    ``y = x * mask`` and ``s = [mean_c(x), max_c(x)]`` both send a full-size gradient to
    ``x``. Autograd would build each one and add them (three full-size writes). Because
    ``mask`` is computed from ``s``, the product's backward always runs first; it stores
    ``grad_y`` here and the summary's backward writes
    ``grad_x = grad_y * mask + grad_mean / C`` in one pass, then scatters the max gradient.
    """

    __slots__ = ("grad_y", "mask")

    def __init__(self) -> None:
        self.grad_y: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grad_y, mask = self.grad_y, self.mask
        self.grad_y = self.mask = None
        return grad_y, mask


class _SpatialSummary(Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, stash: SpatialGradStash) -> torch.Tensor:
        avg = x.mean(dim=1, keepdim=True)
        # torch.max (not amax): one index per position, so the gradient goes to one channel
        # among tied maxima, as in the seed.
        mx, idx = torch.max(x, dim=1, keepdim=True)
        ctx.save_for_backward(idx)
        ctx.stash = stash
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        # channels_last makes the input-gradient of the 2->1 convolutions ~4x faster.
        return torch.cat([avg, mx], dim=1).contiguous(memory_format=torch.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_s: torch.Tensor):
        (idx,) = ctx.saved_tensors
        b, c, h, w = ctx.x_shape
        grad_mean = grad_s[:, 0:1] / c
        grad_y, mask = ctx.stash.take()
        if grad_y is not None:
            grad_x = torch.addcmul(grad_mean, grad_y, mask)
        else:  # y took no part in the loss: only the summary path carries gradient
            grad_x = grad_mean.expand(b, c, h, w).to(ctx.x_dtype, copy=True)
        grad_x.scatter_add_(1, idx, grad_s[:, 1:2].to(grad_x.dtype))
        return grad_x, None


class _ApplySpatialMask(Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, mask: torch.Tensor, stash: SpatialGradStash, x_needs_grad: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(x, mask)
        ctx.stash = stash
        ctx.x_needs_grad = x_needs_grad
        return x * mask

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, mask = ctx.saved_tensors
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = (grad_y * x).sum(dim=1, keepdim=True)
        if ctx.x_needs_grad:
            ctx.stash.grad_y, ctx.stash.mask = grad_y, mask
        return None, grad_mask, None, None


def spatial_summary(x: torch.Tensor, stash: SpatialGradStash) -> torch.Tensor:
    """``(B,C,H,W) -> (B,2,H,W)`` channels_last ``[mean_c(x), max_c(x)]``."""
    return _SpatialSummary.apply(x, stash)


def apply_spatial_mask(
    x: torch.Tensor, mask: torch.Tensor, stash: SpatialGradStash
) -> torch.Tensor:
    """``y = x * mask`` with ``mask`` ``(B,1,H,W)``; its ``x``-gradient is delivered by the
    summary's backward through ``stash`` (``x`` must be the tensor given to
    :func:`spatial_summary` with the same ``stash``)."""
    return _ApplySpatialMask.apply(x.detach(), mask, stash, x.requires_grad)


class _AxisScale(Function):
    """``y = x * (c + k * u_h * u_w)`` without a full-size ``att`` or ``scale``."""

    @staticmethod
    def forward(ctx, x, u_h, u_w, c, k):
        ctx.save_for_backward(x, u_h, u_w, c, k)
        y = x * (k * u_h)
        y.mul_(u_w)
        y.addcmul_(x, c)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, u_h, u_w, c, k = ctx.saved_tensors
        need_x, need_h, need_w, need_c, need_k = ctx.needs_input_grad
        grad_x = grad_h = grad_w = grad_c = grad_k = None
        if need_x:
            grad_x = grad_y * (k * u_h)
            grad_x.mul_(u_w)
            grad_x.addcmul_(grad_y, c)
        if need_h or need_w or need_c or need_k:
            g = grad_y * x
            # sum_w g[b,c,h,w] * u_w[b,c,w] and sum_h u_h[b,c,h] * g[b,c,h,w] are batched
            # matrix products over (B, C).
            gh = torch.matmul(g, u_w.transpose(-1, -2))  # (B,C,H,1)
            if need_h:
                grad_h = gh * k
            if need_w:
                grad_w = torch.matmul(u_h.transpose(-1, -2), g) * k  # (B,C,1,W)
            if need_k:
                grad_k = (gh * u_h).sum().reshape(k.shape)
            if need_c:
                grad_c = g.sum().reshape(c.shape)
        return grad_x, grad_h, grad_w, grad_c, grad_k


def axis_scale(
    x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor, c: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """``x (B,C,H,W) * (c + k * u_h (B,C,H,1) * u_w (B,C,1,W))``, ``c`` and ``k`` 0-d."""
    return _AxisScale.apply(x, u_h, u_w, c, k)
