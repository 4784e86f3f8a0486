"""The base of the statistics callbacks: find blocks, measure on logging steps, report.

Hook flow of one logging point (one optimizer step; see :mod:`.schedule`)::

    on_train_batch_start      schedule says "measure" -> collector.attach() (observers on)
      forward(s)              each block's observer adds its sums on the device
    on_before_optimizer_step  gradient norms of the learnable parameters
    on_train_batch_end        observers off; on the micro-batch that steps the optimizer:
                              collector.finish() -> one all-reduce, one host copy
                              -> scalars to every logger, histograms to TensorBoard,
                                 problems -> warnings (once per block and kind)

On every other batch the hooks compare two integers and return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from ._checks import check_patterns
from .collector import SECTIONS, StatisticsCollector
from .discovery import find_attention_blocks
from .health import PROBLEM_KINDS, HealthThresholds, Problem, ProblemReporter, find_problems
from .schedule import LoggingSchedule
from .statistics import GlobalStats
from .tags import custom_scalar_layout, scalar_metrics
from .tensorboard import (
    log_scalars,
    register_layout,
    tensorboard_loggers,
    warn_no_tensorboard,
    write_histograms,
    write_pending_layouts,
)

__all__ = ["AttentionStatsCallback"]


class AttentionStatsCallback(Callback):
    """Shared machinery of the statistics callbacks (not meant to be used directly).

    Subclasses choose which statistics they gather (``_sections``), which problems they
    report (``_kinds``) and whether they log scalars (``_log_scalars``).

    Args:
        include: fnmatch patterns of block names to watch (default: all blocks).
        exclude: fnmatch patterns of block names to leave out.
        log_every_n_steps: measure every this many optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``; ``0`` never.
        histogram_every_n_steps: write histograms every this many optimizer steps (``0``: never).
        thresholds: the health thresholds.
        on_problem: ``"warn"``, ``"raise"`` or ``"ignore"``.
    """

    _sections: ClassVar[frozenset[str]] = SECTIONS
    _kinds: ClassVar[tuple[str, ...]] = tuple(PROBLEM_KINDS)
    _log_scalars: ClassVar[bool] = True

    def __init__(
        self,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        thresholds: HealthThresholds | None = None,
        on_problem: str = "warn",
    ) -> None:
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        self._schedule = LoggingSchedule(log_every_n_steps, histogram_every_n_steps)
        self.thresholds = thresholds if thresholds is not None else HealthThresholds()
        self._reporter = ProblemReporter(on_problem)
        self._collector = StatisticsCollector(
            self._sections, self.thresholds.saturation_low, self.thresholds.saturation_high
        )
        #: The statistics and problems of the latest logging point (host floats only).
        self.last_stats: GlobalStats | None = None
        self.last_problems: list[Problem] = []
        self._num_points = 0
        self._last_step = -1
        self._layout_dirs: list[str] = []
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._blocks: dict[str, nn.Module] = {}
        self._collecting = False
        self._scalar_point = False

    # -- identity and options --------------------------------------------------------------
    @property
    def log_every_n_steps(self) -> int | None:
        return self._schedule.log_every_n_steps

    @property
    def histogram_every_n_steps(self) -> int:
        return self._schedule.histogram_every_n_steps or 0

    @property
    def on_problem(self) -> str:
        return self._reporter.on_problem

    @property
    def block_names(self) -> list[str]:
        """Qualified names of the blocks being watched (set at ``on_fit_start``)."""
        return list(self._blocks)

    @property
    def num_points(self) -> int:
        """Logging points measured so far (continues across a resume)."""
        return self._num_points

    def _identity(self) -> dict[str, Any]:
        return {
            "include": self.include,
            "exclude": self.exclude,
            "log_every_n_steps": self.log_every_n_steps,
            "histogram_every_n_steps": self.histogram_every_n_steps,
            # Two instances that differ only in thresholds or on_problem must not share a
            # key: Lightning refuses duplicate keys of stateful callbacks.
            "thresholds": self.thresholds,
            "on_problem": self.on_problem,
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._identity())

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        if self._log_scalars:
            what = "custom-scalars layout"
            if self.histogram_every_n_steps:
                what = "histograms or " + what
            warn_no_tensorboard(trainer, owner, what)
        if self._schedule.interval(trainer) == 0:
            rank_zero_warn(f"{owner}: log_every_n_steps is 0, so no statistics are gathered")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup, so lazily built blocks exist.
        self._bind(pl_module, find_attention_blocks(pl_module, self.include, self.exclude))

    def _bind(self, pl_module: pl.LightningModule, blocks: dict[str, nn.Module]) -> None:
        self._collector.reset()
        self._collecting = False
        self._blocks = blocks
        self._collector.bind(blocks)
        if not blocks:
            rank_zero_warn(
                f"{type(self).__name__}: no attention block (DynamicSpatialAttention, "
                f"CoordinateAttention or ObservableAttention) found in "
                f"{type(pl_module).__name__}"
                + (f" matching include={list(self.include)}" if self.include else "")
                + (f" and exclude={list(self.exclude)}" if self.exclude else "")
                + "; the callback will do nothing"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._log_scalars or not self._blocks or not trainer.is_global_zero:
            return
        if not any(lg.log_dir not in self._layout_dirs for lg in tensorboard_loggers(trainer)):
            return  # resumed into a run that already has its layout
        layout = custom_scalar_layout(self._collector.layouts, self._sections)
        new_dirs = register_layout(trainer, layout)
        self._layout_dirs += [d for d in new_dirs if d not in self._layout_dirs]

    # -- one logging point -----------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._blocks:
            return
        scalars, histograms = self._schedule.decide(trainer)
        if not (scalars or histograms):
            if self._collector.active:  # a point left open by an interrupted step
                self._collector.reset()
            return
        self._collecting, self._scalar_point = True, scalars
        self._collector.attach(trainer.strategy.root_device, histograms)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._collecting:
            self._collector.record_gradients()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._collecting:
            return
        self._collecting = False
        self._collector.detach()
        if not self._schedule.steps_optimizer(trainer):
            return  # more micro-batches of this optimizer step to come
        stats = self._collector.finish(trainer, step=trainer.global_step)
        self._on_statistics(trainer, pl_module, stats, self._scalar_point)

    def _on_statistics(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: GlobalStats,
        scalars: bool,
    ) -> None:
        problems = find_problems(stats, self.thresholds, self._kinds, self._sections)
        self.last_stats, self.last_problems = stats, problems
        if scalars:
            self._num_points += 1
            self._last_step = stats.step
            if self._log_scalars:
                write_pending_layouts(trainer)
                log_scalars(trainer, scalar_metrics(stats, self._sections), stats.step)
        if self._log_scalars and any(bs.histograms for bs in stats.blocks.values()):
            write_histograms(trainer, stats)
        self._reporter.report(problems)  # last: with on_problem="raise" the values are logged

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A batch whose LightningModule.on_train_batch_start returned -1 ends the epoch
        # without on_train_batch_end: take the observers off so that nothing between here
        # and the next training batch (epoch-end hooks, validation) is observed.
        if self._collecting:
            self._collecting = False
            self._collector.detach()

    # -- cleanup ---------------------------------------------------------------------------
    def _release(self) -> None:
        self._collector.reset()
        self._collecting = False

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._collector.bind({})
        self._blocks = {}

    # -- checkpointing and pickling --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "reported": self._reporter.state_dict(),
            "num_points": self._num_points,
            "last_step": self._last_step,
            "layout_dirs": list(self._layout_dirs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reporter.load_state_dict(state_dict.get("reported", {}))
        self._num_points = int(state_dict.get("num_points", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._layout_dirs = list(state_dict.get("layout_dirs", []))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blocks"] = {}  # modules and observer handles never travel
        state["_collecting"] = False
        return state
