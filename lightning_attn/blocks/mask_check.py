"""A one-call check of a block's masks on a batch (the seed's add-on 10)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .observation import AttentionObservation, ObservableAttention
from .warnings import MaskCollapseWarning

__all__ = ["mask_stats", "quick_mask_check"]


@torch.no_grad()
def mask_stats(mask: torch.Tensor) -> dict[str, float]:
    """min, mean, max and (unbiased) std of a mask, as Python floats."""
    m = mask.detach().float()
    return {
        "min": float(m.min()), "mean": float(m.mean()),
        "max": float(m.max()), "std": float(m.std()),
    }


@torch.no_grad()
def quick_mask_check(
    module: nn.Module, x: torch.Tensor, std_threshold: float = 0.02
) -> dict[str, dict[str, float]]:
    """Run ``module`` on ``x`` in eval mode and return the statistics of each mask.

    Works for :class:`CoordinateAttention` (keys ``a_h``, ``a_w``, as in the seed) and any
    block speaking :class:`ObservableAttention` (keys as the observation names them, e.g.
    ``mask`` for DSA). Emits a :class:`MaskCollapseWarning` for each mask whose std is
    below ``std_threshold``. The module's train/eval mode is restored afterwards.
    """
    if not isinstance(std_threshold, (int, float)) or not std_threshold >= 0:
        raise ValueError(f"std_threshold must be a number >= 0, got {std_threshold!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    seen: dict[str, torch.Tensor] = {}

    def observe(_: nn.Module, obs: AttentionObservation) -> None:
        seen.update(obs.masks)

    handle = module.attach_observer(observe) if isinstance(module, ObservableAttention) else None
    if handle is None and not hasattr(module, "last_mask_stats"):
        raise TypeError(
            f"{type(module).__name__} exposes no masks: it neither has last_mask_stats() "
            "nor implements ObservableAttention"
        )
    was_training = module.training
    module.eval()
    try:
        module(x)
    finally:
        module.train(was_training)
        if handle is not None:
            handle.remove()
    if hasattr(module, "last_mask_stats"):
        stats = module.last_mask_stats()
    else:
        stats = {name: mask_stats(m) for name, m in seen.items()}
    for name, s in stats.items():
        if s["std"] < std_threshold:
            warnings.warn(
                f"{type(module).__name__}: mask {name!r} std {s['std']:.4g} is below "
                f"std_threshold={std_threshold}: the mask is nearly constant and may have "
                "collapsed (try a lower alpha, gate='hardsigmoid', or a higher temperature)",
                MaskCollapseWarning,
                stacklevel=2,
            )
    return stats
