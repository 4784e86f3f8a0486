"""Models for the surgery tests: timm's Swin code at a small size (channels-last stages), a
ConvNeXt-like block (channels-last inside, channels-first out), and a block of one's own."""

from __future__ import annotations

import timm
import torch
from torch import nn


def small_swin() -> nn.Module:
    """timm's Swin-T code at a size the tests can afford (random init, in eval mode): on a
    (B, 3, 64, 64) input its stages output (B, 16, 16, 24), (B, 8, 8, 48), (B, 4, 4, 96) and
    (B, 2, 2, 192)."""
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
        embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3,
    ).eval()


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block's walk through the layouts: a depthwise conv on (B, C, H, W),
    LayerNorm and a linear layer on (B, H, W, C), back to (B, C, H, W). Its output is
    channels-first; ``stage`` is where a block goes after it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stage = Stage(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


class Stage(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class Gate(nn.Module):
    """A block of one's own, built as ``factory(channels)``: ``x * sigmoid(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)
