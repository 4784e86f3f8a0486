"""Tiny image helpers (no torchvision): display normalisation, a colormap, overlay, grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["colormap", "make_grid", "overlay", "to_display", "upsample_mask"]

# viridis at 0, 1/4, 1/2, 3/4, 1
_STOPS = (
    (0.267, 0.005, 0.329),
    (0.229, 0.322, 0.546),
    (0.128, 0.567, 0.551),
    (0.369, 0.789, 0.383),
    (0.993, 0.906, 0.144),
)


def to_display(images: torch.Tensor) -> torch.Tensor:
    """``(N,C,H,W)`` -> ``(N,3,H,W)`` in ``[0, 1]``, min-max normalised per image.

    One channel becomes grey, three are taken as RGB, any other count is averaged to grey.
    Non-finite values are shown as 0.
    """
    x = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    if x.shape[1] != 3:
        x = x.mean(dim=1, keepdim=True)
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def colormap(values: torch.Tensor) -> torch.Tensor:
    """``(N,1,H,W)`` values in ``[0, 1]`` -> ``(N,3,H,W)`` viridis colours."""
    stops = torch.tensor(_STOPS, dtype=torch.float32, device=values.device)
    v = torch.nan_to_num(values.float(), nan=0.0).clamp(0.0, 1.0)[:, 0] * (len(_STOPS) - 1)
    i0 = v.floor().long().clamp(max=len(_STOPS) - 2)
    frac = (v - i0).unsqueeze(-1)
    rgb = stops[i0] * (1.0 - frac) + stops[i0 + 1] * frac  # (N,H,W,3)
    return rgb.permute(0, 3, 1, 2)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N,1,h,w)`` -> ``(N,1,H,W)`` bilinear, clamped to ``[0, 1]``."""
    m = mask.detach().float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return m.clamp(0.0, 1.0)


def overlay(base: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``(N,3,H,W)`` image blended with the colormapped ``(N,1,H,W)`` heat: ``(N,3,H,W)``."""
    return (1.0 - alpha) * base + alpha * colormap(heat)


def make_grid(tiles: torch.Tensor, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """``(R,C,3,H,W)`` tiles -> one ``(3, R*(H+p)+p, C*(W+p)+p)`` image (rows x columns)."""
    r, c, ch, h, w = tiles.shape
    grid = tiles.new_full((ch, r * (h + padding) + padding, c * (w + padding) + padding), pad_value)
    for i in range(r):
        for j in range(c):
            y, x = padding + i * (h + padding), padding + j * (w + padding)
            grid[:, y : y + h, x : x + w] = tiles[i, j]
    return grid
