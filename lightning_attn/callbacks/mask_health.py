"""MaskHealthMonitor: spread and saturation of every attention mask."""

from __future__ import annotations

from collections.abc import Sequence

from .base import AttentionStatsCallback
from .health import HealthThresholds

__all__ = ["MaskHealthMonitor"]


class MaskHealthMonitor(AttentionStatsCallback):
    """Logs, per block and mask, the mask's mean, std and saturation.

    Masks: ``mask`` ``(B,1,H,W)`` of DynamicSpatialAttention, ``mask_h`` ``(B,C,H,1)`` and
    ``mask_w`` ``(B,C,1,W)`` of CoordinateAttention. Over every value of every training
    forward of a logging step (all micro-batches, all processes):
    ``attn/<block>/<mask>/mean``, ``.../std`` (unbiased), ``.../sat_low`` (share below
    ``saturation_low``) and ``.../sat_high`` (share above ``saturation_high``). Warns about
    mask collapse (std below ``std_threshold``), saturation (saturated share above
    ``saturation_threshold``) and non-finite mask values.

    Args:
        include, exclude: fnmatch patterns of block names to watch / leave out.
        log_every_n_steps: ``None`` follows the Trainer; ``0`` never.
        histogram_every_n_steps: histograms of the mask values to TensorBoard (0: off).
        saturation_low, saturation_high: saturation thresholds.
        std_threshold: collapse threshold of the std.
        saturation_threshold: warn when more than this share of values is saturated.
        on_problem: ``"warn"``, ``"raise"`` or ``"ignore"``.
    """

    _sections = frozenset({"mask"})
    _kinds = ("mask_collapse", "mask_saturation", "nonfinite")

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        saturation_low: float = 0.05,
        saturation_high: float = 0.95,
        std_threshold: float = 0.02,
        saturation_threshold: float = 0.5,
        on_problem: str = "warn",
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            thresholds=HealthThresholds(
                saturation_low=saturation_low,
                saturation_high=saturation_high,
                std_threshold=std_threshold,
                saturation_threshold=saturation_threshold,
            ),
            on_problem=on_problem,
        )
