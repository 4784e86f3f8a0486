"""Tiny wrappers that let attention blocks sit in ``nn.Sequential`` and existing models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionAfter", "OutputOnly", "first_tensor"]


def first_tensor(out: torch.Tensor | tuple | list) -> torch.Tensor:
    """``y`` from a block's output: the tensor itself, or the first item of ``(y, mask[, rw])``."""
    return out[0] if isinstance(out, (tuple, list)) else out


class OutputOnly(nn.Module):
    """Calls ``block`` and returns only its features ``y``.

    DynamicSpatialAttention returns ``(y, mask)``; inside ``nn.Sequential`` the next layer
    needs ``y`` alone. Blocks that already return a tensor pass through unchanged.

    Shapes: ``x (B,C,H,W) -> y (B,C,H,W)``. The block stays reachable as ``.block`` (and is
    what the diagnostics find and read).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.block(x))


class AttentionAfter(nn.Module):
    """``attention(module(x))``, keeping only ``y``: for composing a new model.

    The wrapped submodule lives at ``.module`` and the block at ``.attention``, so putting
    this in place of an existing submodule renames its state-dict keys
    (``layer1.0.conv1.weight`` -> ``layer1.module.0.conv1.weight``) and pretrained weights no
    longer load: for a model that already exists use
    :func:`~lightning_attn.modules.insert_attention`, which keeps every key.
    """

    def __init__(self, module: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.attention = attention

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return first_tensor(self.attention(self.module(*args, **kwargs)))
