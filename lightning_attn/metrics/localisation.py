"""How much of an attention mask's mass falls inside the object's box, relative to chance.

``score = (mask mass inside the box / total mask mass) / (box area / image area)``

1.0 means the mask puts no more weight on the box than a uniform mask would (no
localisation); ``1 / box_share`` is the maximum (all mass inside the box); below 1.0 the mask
avoids the object.

The mask is compared with the box at the mask's own resolution, exactly: each mask cell is
treated as a constant patch of the image (nearest-neighbour upsampling to ``S x S``, done
analytically), and the box, scaled to mask coordinates, covers each cell by a fraction in
``[0, 1]``. No upsampled mask is ever built, and the result does not depend on whether
``S`` is a multiple of the mask size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["LocalisationScore", "localisation_ratio"]


def _axis_coverage(lo: Tensor, hi: Tensor, n: int) -> Tensor:
    """``(B,) x (B,) -> (B, n)``: length of ``[lo, hi)`` inside each unit cell ``[j, j+1)``."""
    j = torch.arange(n, device=lo.device, dtype=lo.dtype)
    left = torch.maximum(lo[:, None], j)
    right = torch.minimum(hi[:, None], j + 1)
    return (right - left).clamp_(min=0.0, max=1.0)


def _check_inputs(mask: Tensor, boxes: Tensor, image_size: Sequence[int]) -> tuple[int, int]:
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a (B, 1, h, w) tensor, got {shape}")
    if not isinstance(boxes, Tensor) or boxes.shape != (mask.shape[0], 4):
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a (B, 4) tensor with B={mask.shape[0]}, got {shape}")
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"boxes must be finite, got {boxes.tolist()!r}")
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in image_size)
    ):
        raise ValueError(f"image_size must be a pair of ints (H, W) >= 1, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def localisation_ratio(mask: Tensor, boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """Per-sample localisation score ``(B,)`` (see the module docstring).

    Args:
        mask: ``(B,1,h,w)`` non-negative mask (any resolution).
        boxes: ``(B,4)`` ``(x0, y0, x1, y1)`` in image pixels, ``x1``/``y1`` exclusive.
        image_size: ``(H, W)`` of the image the boxes refer to.

    A sample whose mask has no mass, or whose box has no area, scores 1.0 (no localisation).
    """
    height, width = _check_inputs(mask, boxes, image_size)
    _, _, h, w = mask.shape
    m = mask[:, 0].float()
    b = boxes.to(device=m.device, dtype=torch.float32)
    x0, x1 = (b[:, 0] * (w / width)).clamp(0, w), (b[:, 2] * (w / width)).clamp(0, w)
    y0, y1 = (b[:, 1] * (h / height)).clamp(0, h), (b[:, 3] * (h / height)).clamp(0, h)
    # an inverted box (x1 < x0 or y1 < y0) is empty, also when both axes are inverted
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    cover_x = _axis_coverage(x0, x1, w)  # (B, w)
    cover_y = _axis_coverage(y0, y1, h)  # (B, h)
    inside = torch.einsum("bhw,bh,bw->b", m, cover_y, cover_x)
    total = m.sum(dim=(1, 2))
    box_share = (x1 - x0) * (y1 - y0) / (h * w)
    valid = (total > 0) & (box_share > 0)
    ratio = (inside / total.clamp(min=1e-12)) / box_share.clamp(min=1e-12)
    return torch.where(valid, ratio, torch.ones_like(ratio))


class LocalisationScore(Metric):
    """Mean per-sample :func:`localisation_ratio` over everything seen, across processes.

    States ``ratio_sum`` and ``count`` are reduced with ``sum``, then divided: under DDP the
    result equals the single-process score on the union of the shards.

    ``update(mask (B,1,h,w), boxes (B,4), image_size=(H, W))``; ``compute() -> 0-d tensor``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    ratio_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("ratio_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, mask: Tensor, boxes: Tensor, image_size: Sequence[int]) -> None:
        ratio = localisation_ratio(mask.detach(), boxes, image_size)
        self.ratio_sum += ratio.sum().to(self.ratio_sum.dtype)
        self.count += ratio.numel()

    def compute(self) -> Tensor:
        return self.ratio_sum / self.count.clamp(min=1)
