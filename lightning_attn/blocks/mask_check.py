"""A one-call check of a block's masks on a batch (the seed's add-on 10)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .recording import _RECORDING_STATE, AttentionBlock, RecordingConfig
from .statistics import MaskStats, block_stats
from .validation import check_fraction
from .warnings import MaskCollapseWarning

__all__ = ["quick_mask_check"]



@torch.no_grad()
def quick_mask_check(
    module: nn.Module, x: torch.Tensor, std_threshold: float = 0.02
) -> dict[str, MaskStats]:
    """Run ``module`` on ``x`` in eval mode and return the statistics of each of its masks.

    The statistics are the block's own recording (:mod:`~lightning_attn.blocks.statistics`),
    the same numbers the diagnostics callbacks log: ``mean``, ``std`` (unbiased), ``min``,
    ``max``, ``sat_low``/``sat_high``; keys are the block's mask names (``mask`` for DSA,
    ``mask_h``/``mask_w`` — the seed's ``a_h``/``a_w`` — for CoordinateAttention). Emits a
    :class:`MaskCollapseWarning` for each mask whose std is below ``std_threshold``. The
    module's train/eval mode and recording state are restored afterwards; nothing is kept.
    """
    std_threshold = check_fraction("std_threshold", std_threshold)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(module, AttentionBlock):
        raise TypeError(
            f"{type(module).__name__} records no masks: it does not implement AttentionBlock "
            "(inherit lightning_attn.blocks.RecordingMixin and call self.record(...))"
        )
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    config = RecordingConfig(histogram_bins=0)
    # The block may be recording for a run: keep its state aside and put it back after.
    saved = {k: module.__dict__[k] for k in _RECORDING_STATE if k in module.__dict__}
    was_training = module.training
    module.clear_recording()
    module.configure_recording(config, device)
    layout = module.statistics_layout
    module.eval()
    module.start_recording(quick_mask_check)
    try:
        module(x)
        values = module.recorded_statistics.tolist()
    finally:
        module.train(was_training)
        module.clear_recording()
        module.__dict__.update(saved)
    stats = block_stats(layout, values).masks
    for name, s in stats.items():
        if s.std < std_threshold:
            warnings.warn(
                f"{type(module).__name__}: mask {name!r} std {s.std:.4g} is below "
                f"std_threshold={std_threshold}: the mask is nearly constant and may have "
                "collapsed (try a lower alpha, gate='hardsigmoid', or a higher temperature)",
                MaskCollapseWarning,
                stacklevel=2,
            )
    return stats
