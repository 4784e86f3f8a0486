"""AttentionDiagnostics: every diagnostic of this package in one callback, one pass per block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ._checks import check_interval
from .attention_map import AttentionMapLogger
from .base import AttentionStatsCallback
from .discovery import find_attention_blocks
from .health import HealthThresholds
from .summary import print_summary
from .tensorboard import tensorboard_loggers

__all__ = ["AttentionDiagnostics"]


class AttentionDiagnostics(AttentionStatsCallback):
    """Router entropy, mask health, parameter trajectories, attention maps and a summary.

    Does what :class:`RouterEntropyMonitor`, :class:`MaskHealthMonitor`,
    :class:`ParameterTrajectoryMonitor`, :class:`AttentionMapLogger` and
    :class:`AttentionSummary` do together, with one set of options, one observer per block and
    one statistics pass (one all-reduce, one host sync) per logging step. Same tags and
    warnings as the individual callbacks.

    Args:
        include, exclude: fnmatch patterns of block names to watch / leave out.
        log_every_n_steps: ``None`` follows the Trainer; ``0`` never.
        histogram_every_n_steps: mask / router-weight histograms to TensorBoard (0: off).
        std_threshold: mask collapse when the std is below this.
        saturation_low, saturation_high: a mask value below / above these is saturated.
        saturation_threshold: mask saturation when more than this share is saturated.
        router_collapse_threshold: router collapse when ``entropy_norm`` is below this.
        router_indifference_threshold: indifference when ``entropy_norm`` is above this ...
        indifference_warmup_steps: ... once ``global_step`` reaches this.
        dead_branch_factor: a branch is dead below ``dead_branch_factor / K`` mean weight.
        on_problem: ``"warn"``, ``"raise"`` or ``"ignore"``.
        num_images: validation images in the attention-map grid (``0``: no maps).
        overlay_alpha: opacity of the masks over the images.
        summary: print the ``rich`` summary table at the end of each training epoch.

    Example::

        trainer = Trainer(callbacks=[AttentionDiagnostics(log_every_n_steps=50)])
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        std_threshold: float = 0.02,
        saturation_low: float = 0.05,
        saturation_high: float = 0.95,
        saturation_threshold: float = 0.5,
        router_collapse_threshold: float = 0.1,
        router_indifference_threshold: float = 0.98,
        indifference_warmup_steps: int = 500,
        dead_branch_factor: float = 0.1,
        on_problem: str = "warn",
        num_images: int = 8,
        overlay_alpha: float = 0.5,
        summary: bool = True,
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            thresholds=HealthThresholds(
                std_threshold=std_threshold,
                saturation_low=saturation_low,
                saturation_high=saturation_high,
                saturation_threshold=saturation_threshold,
                router_collapse_threshold=router_collapse_threshold,
                router_indifference_threshold=router_indifference_threshold,
                indifference_warmup_steps=indifference_warmup_steps,
                dead_branch_factor=dead_branch_factor,
            ),
            on_problem=on_problem,
        )
        self.num_images = check_interval("num_images", num_images)
        self.summary = bool(summary)
        self._maps = (
            AttentionMapLogger(num_images, include, exclude, overlay_alpha) if num_images else None
        )

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "num_images": self.num_images}

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not tensorboard_loggers(trainer):
            parts = ["custom-scalars layout"]
            if self.histogram_every_n_steps:
                parts.append("histograms")
            if self._maps is not None:
                parts.append("attention-map images")
            rank_zero_info(
                f"{type(self).__name__}: the Trainer has no TensorBoardLogger, so it writes no "
                f"{', '.join(parts)} (scalars still go to every logger; warnings and the "
                "summary still work)"
            )
        if self._schedule.interval(trainer) == 0:
            rank_zero_warn(
                f"{type(self).__name__}: log_every_n_steps is 0, so no statistics are gathered"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = find_attention_blocks(pl_module, self.include, self.exclude)
        self._bind(pl_module, blocks)
        if self._maps is not None:
            self._maps._bind(blocks)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._maps is not None:
            self._maps.teardown(trainer, pl_module, stage)

    # -- attention maps (validation) -------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._maps is not None:
            self._maps.on_validation_epoch_start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._maps is not None:
            self._maps.on_validation_batch_end(
                trainer, pl_module, outputs, batch, batch_idx, dataloader_idx
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._maps is not None:
            self._maps.on_validation_epoch_end(trainer, pl_module)

    # -- summary ---------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.summary:
            print_summary(self, trainer)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._maps is not None:
            state["maps"] = self._maps.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._maps is not None and "maps" in state_dict:
            self._maps.load_state_dict(state_dict["maps"])
