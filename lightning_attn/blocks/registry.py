"""Build an attention block by name, for configuration files and LightningCLI."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .coordinate import CoordinateAttention
from .dynamic_spatial import DynamicSpatialAttention

__all__ = ["IdentityAttention", "create_attention", "attention_names", "register_attention"]


class IdentityAttention(nn.Module):
    """``"none"``: returns its input unchanged, for no-attention baselines."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _dsa(channels: int, **kwargs) -> nn.Module:
    # DSA acts on the channel mean/max maps, so its weights do not depend on channels.
    return DynamicSpatialAttention(**kwargs)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "dsa": _dsa,
    "coord": CoordinateAttention,
    "none": IdentityAttention,
}


def attention_names() -> list[str]:
    """The names :func:`create_attention` knows."""
    return sorted(_REGISTRY)


def register_attention(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add ``factory(channels, **kwargs) -> nn.Module`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"attention name {name!r} is already registered")
    _REGISTRY[name] = factory


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the block registered as ``name`` for a ``(B, channels, H, W)`` feature map.

    ``"dsa"`` -> :class:`DynamicSpatialAttention` (``channels`` unused by its weights),
    ``"coord"`` -> :class:`CoordinateAttention`, ``"none"`` -> :class:`IdentityAttention`.
    Keyword arguments go to the block's constructor.
    """
    factory = _REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown attention name {name!r}; known names: {attention_names()}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels!r}")
    return factory(channels, **kwargs)
