"""Attention-map images: display normalisation, a colormap, overlays, a labelled grid; a
ViT's class-token attention laid over its image (:func:`token_map`); the layer x head
heatmaps of the heads' entropy and max logit (:func:`head_heatmaps`).

No torchvision: a few tensor operations and Pillow (for the labels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..core.presentation import short_names

__all__ = [
    "colormap",
    "colour_scale",
    "head_heatmaps",
    "label_columns",
    "make_grid",
    "overlay",
    "render_maps",
    "to_display",
    "token_grid",
    "token_map",
    "upsample_mask",
]

#: Tiles are enlarged (nearest neighbour, integer factor) to at least this width so that
#: their column labels fit.
MIN_TILE_WIDTH = 96
_LABEL_HEIGHT = 16

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



def label_columns(grid: torch.Tensor, labels: Sequence[str], tile_width: int,
                  padding: int = 2) -> torch.Tensor:
    """``(3, H, W)`` grid -> ``(3, 16 + H, W)`` with a white header naming each column."""
    _, _, width = grid.shape
    header = Image.new("RGB", (width, _LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(header)
    font = ImageFont.load_default(size=11)
    for j, label in enumerate(labels):
        x0 = padding + j * (tile_width + padding)
        text = label
        while text and draw.textlength(text, font=font) > tile_width:
            text = text[:-2] + "…" if len(text) > 2 else ""
        offset = max(0, (tile_width - draw.textlength(text, font=font)) / 2)
        draw.text((x0 + offset, 2), text, fill="black", font=font)
    return torch.cat((_tensor(header).to(grid.dtype), grid), dim=1)


def _tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as ``(3, H, W)`` floats in ``[0, 1]``."""
    out = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return out.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


_SCALE_HEIGHT = 30
_SCALE_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def colour_scale(width: int, alpha: float = 1.0, label: str = "mask value",
                 low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``(3, 30, width)``: the colormap as a bar with ticks from ``low`` to ``high``, labelled
    ``label`` — the key to the colours above it (blended over white with ``alpha``)."""
    bar_width = max(width - (120 if label else 16), 60)
    ramp = torch.linspace(0.0, 1.0, bar_width).view(1, 1, 1, -1)
    bar = colormap(ramp)[0] * alpha + (1.0 - alpha)  # (3, 1, bar_width)
    image = Image.new("RGB", (width, _SCALE_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=10)
    x0, y0, height = 6, 3, 10
    pixels = (bar[:, 0].T * 255).round().to(torch.uint8).tolist()
    for i, rgb in enumerate(pixels):
        draw.line([(x0 + i, y0), (x0 + i, y0 + height)], fill=tuple(rgb))
    for tick in _SCALE_TICKS:
        x = x0 + round(tick * (bar_width - 1))
        draw.line([(x, y0 + height), (x, y0 + height + 3)], fill="black")
        text = f"{low + tick * (high - low):.3g}"
        draw.text((x - draw.textlength(text, font=font) / 2, y0 + height + 4), text,
                  fill="black", font=font)
    draw.text((x0 + bar_width + 8, y0), label, fill="black", font=font)
    return _tensor(image)


def render_maps(
    images: torch.Tensor | None,
    maps: Mapping[str, torch.Tensor],
    overlay_alpha: float = 0.5,
) -> torch.Tensor:
    """One labelled grid: a row per image; the input, then each block's map over it.

    Args:
        images: ``(N, C, H, W)`` inputs, or ``None`` (then the maps are shown alone).
        maps: block name -> spatial map ``(N, 1, h, w)`` in ``[0, 1]``, in column order.
        overlay_alpha: opacity of the coloured map over the image.

    Returns a ``(3, H', W')`` float image in ``[0, 1]`` on the CPU, with the colour scale of
    the masks under the grid.
    """
    maps = {name: m.detach().float().cpu() for name, m in maps.items()}
    n = min([m.shape[0] for m in maps.values()] + ([images.shape[0]] if images is not None else []))
    if images is not None:
        base = to_display(images[:n].detach().cpu())
        size = tuple(base.shape[-2:])
    else:
        size = tuple(next(iter(maps.values())).shape[-2:]) if maps else (1, 1)
        base = None
    scale = max(1, -(-MIN_TILE_WIDTH // size[1]))
    shown = (size[0] * scale, size[1] * scale)
    columns, labels = [], []
    if base is not None:
        columns.append(F.interpolate(base, size=shown, mode="nearest"))
        labels.append("input")
    for label, m in zip(short_names(list(maps)).values(), maps.values(), strict=True):
        heat = upsample_mask(m[:n], size)
        tile = overlay(base, heat, overlay_alpha) if base is not None else colormap(heat)
        columns.append(F.interpolate(tile, size=shown, mode="nearest"))
        labels.append(label)
    grid = make_grid(torch.stack(columns, dim=1))  # (N, columns, 3, H, W)
    labelled = label_columns(grid, labels, shown[1])
    alpha = overlay_alpha if base is not None else 1.0
    return torch.cat((labelled, colour_scale(labelled.shape[-1], alpha)), dim=1)


#: The most tokens before the patches that :func:`token_grid` considers (a class token,
#: a distillation token, registers).
MAX_PREFIX_TOKENS = 16


def token_grid(keys: int, size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)``: how ``keys`` tokens are ``prefix >= 1`` tokens (a class token
    first) and the ``h x w`` square patches, of a whole number of pixels, of an image of
    ``size (H, W)``; the fewest prefix tokens that fit. ``None`` when nothing fits (windowed
    attention, no class token, text)."""
    height, width = size
    for prefix in range(1, min(MAX_PREFIX_TOKENS, keys - 1) + 1):
        patches = keys - prefix
        if (height * width) % patches:
            continue
        side = math.isqrt(height * width // patches)
        if side * side * patches == height * width and height % side == 0 == width % side:
            return prefix, height // side, width // side
    return None


def token_map(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """A class token's attention ``(N, keys)`` over its image's patches as a map
    ``(N, 1, h, w)``, each divided by its largest patch's share (``[0, 1]``: 1 is the patch the
    token attends to most); ``None`` when the keys are not a prefix and the image's patches
    (:func:`token_grid`)."""
    grid = token_grid(attention.shape[-1], size)
    if grid is None:
        return None
    prefix, h, w = grid
    patches = attention.detach().float()[:, prefix:]
    patches = patches / patches.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return patches.reshape(-1, 1, h, w)


_CELL = 12
_MISSING = (214, 214, 222)  # a head the module does not have, or a non-finite value


def head_heatmaps(
    names: Sequence[str],
    entropy: Sequence[Sequence[float]],
    max_logit: Sequence[Sequence[float]],
) -> torch.Tensor:
    """Two layer x head heatmaps side by side: each head's normalised entropy (``[0, 1]``:
    0 one key, 1 uniform) and its max logit (from the lowest to the highest value shown).
    One row per module, in ``names`` order (``entropy[i]``, ``max_logit[i]``: one value per
    head of ``names[i]``), one column per head; grey: no such head, or not finite.
    Returns a ``(3, H, W)`` float image in ``[0, 1]``."""
    labels = list(short_names(list(names)).values())
    font = ImageFont.load_default(size=10)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 8 + int(max((measure.textlength(t, font=font) for t in labels), default=0))
    heads = max((len(v) for v in (*entropy, *max_logit)), default=0)
    finite = [v for row in max_logit for v in row if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    panels = [_heat_panel(entropy, heads, 0.0, 1.0, "head entropy (0 one key, 1 uniform)"),
              _heat_panel(max_logit, heads, low, max(high, low + 1e-6), "max logit")]
    rows = 32 + len(labels) * _CELL  # title, head numbers, cells
    image = Image.new("RGB", (label_width, rows), "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(labels):
        draw.text((2, 32 + i * _CELL), text, fill="black", font=font)
    left = _tensor(image)
    left = torch.cat((left, torch.ones(3, panels[0].shape[1] - left.shape[1], left.shape[2])),
                     dim=1)
    gap = torch.ones(3, panels[0].shape[1], 10)
    return torch.cat((left, panels[0], gap, panels[1]), dim=2)


def _heat_panel(values: Sequence[Sequence[float]], heads: int, low: float, high: float,
                title: str) -> torch.Tensor:
    """One heatmap with its title, head numbers and colour scale: ``(3, H, W)``."""
    width = max(heads * _CELL, 200)
    image = Image.new("RGB", (width, 32 + len(values) * _CELL), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=10)
    draw.text((0, 2), title, fill="black", font=font)
    step = 1 if heads <= 16 else 4
    for h in range(0, heads, step):
        draw.text((h * _CELL + 2, 18), str(h), fill="black", font=font)
    scaled = torch.tensor([[(v - low) / (high - low) for v in row] + [math.nan] * (heads - len(row))
                           for row in values], dtype=torch.float32).reshape(len(values), heads)
    colours = (colormap(scaled.view(1, 1, *scaled.shape))[0] * 255).round().to(torch.uint8)
    for i in range(scaled.shape[0]):
        for h in range(heads):
            fill = tuple(colours[:, i, h].tolist()) if math.isfinite(scaled[i, h]) else _MISSING
            x, y = h * _CELL, 32 + i * _CELL
            draw.rectangle([x, y, x + _CELL - 2, y + _CELL - 2], fill=fill)
    return torch.cat((_tensor(image), colour_scale(width, label="", low=low, high=high)), dim=1)
