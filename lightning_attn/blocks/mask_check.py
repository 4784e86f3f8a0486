"""A one-call check of a block's masks on a batch (the seed's add-on 10)."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from ..core.problems import PROBLEM_KINDS, HealthThresholds, find_problems
from ..core.statistics import GlobalStats, MaskStats, RecordingConfig, block_stats
from ..core.validation import check_fraction
from .recording import _RECORDING_STATE, AttentionBlock

__all__ = ["quick_mask_check"]


@torch.no_grad()
def quick_mask_check(
    module: nn.Module, x: torch.Tensor, std_threshold: float = 0.02
) -> dict[str, MaskStats]:
    """Run ``module`` on ``x`` in eval mode and return the statistics of each of its masks.

    The statistics are the block's own recording (:mod:`lightning_attn.core.statistics`),
    the same numbers the diagnostics callbacks log (:class:`MaskStats`: mean, unbiased std,
    extremes, saturated shares); keys are the block's mask names (``mask`` for DSA,
    ``mask_h``/``mask_w`` — the seed's ``a_h``/``a_w`` — for CoordinateAttention). Judged by
    the diagnostics' own collapse rule: a :class:`MaskCollapseWarning` when a mask's std is
    below ``std_threshold``. The module's train/eval mode and recording state are restored
    afterwards; nothing is kept.
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
    # The block may be recording for a run: keep its state aside and put it back after.
    saved = {k: module.__dict__[k] for k in _RECORDING_STATE if k in module.__dict__}
    was_training = module.training
    module.clear_recording()
    module.configure_recording(RecordingConfig(histogram_bins=0), device)
    layout = module.statistics_layout
    module.eval()
    module.start_recording(quick_mask_check)
    try:
        module(x)
        values = module.recorded_statistics().tolist()
    finally:
        module.train(was_training)
        module.clear_recording()
        module.__dict__.update(saved)
    stats = block_stats(layout, values)
    kind = PROBLEM_KINDS["mask_collapse"]
    # The rule judges the worst mask; each mask is judged on its own here.
    for name, mask_stats in stats.masks.items():
        alone = GlobalStats(0, {type(module).__name__: dataclasses.replace(
            stats, masks={name: mask_stats}, router=None)})
        for p in find_problems(alone, HealthThresholds(std_threshold=std_threshold),
                               kinds=(kind.name,)):
            warnings.warn(f"{type(module).__name__}: {p.detail}. Try: {p.hint}.",
                          kind.category, stacklevel=2)
    return stats.masks
