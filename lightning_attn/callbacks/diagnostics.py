"""AttentionDiagnostics: the one statistics callback, configured by sections and thresholds.

Hook flow of one training logging point (one optimizer step; see :mod:`.schedule`)::

    on_train_batch_start      the schedule says "measure" -> every block records (a flag)
      forward(s)              each block adds its sums to its accumulator, in the graph
    on_before_optimizer_step  gradient norms of the learnable scalars
    on_train_batch_end        on the micro-batch that steps the optimizer: one vector, one
                              collective, one host copy (:mod:`.collector`) -> statistics
                              -> problems (:mod:`.health`) and the writer seam
                              (:mod:`.writers`): scalars through Lightning, histograms, texts

Validation and test epochs record over every batch and log one point per epoch
(``val/attn/...``, ``test/attn/...``); the first validation / test batch also gives the
attention-map images. On every other training batch the hooks compare two integers.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from torch.optim import Optimizer

from .. import __version__
from ..blocks.recording import RecordingConfig, find_attention_blocks
from ..blocks.statistics import HISTOGRAM_BINS, GlobalStats
from ..blocks.validation import check_choice, check_fraction, check_int, check_patterns
from ..blocks.warnings import MissingStatisticsWarning
from .collector import StatisticsCollector
from .health import HealthThresholds, Problem, ProblemReporter, find_problems
from .maps import render_maps
from .schedule import LoggingSchedule
from .summary import render_summary
from .tags import (
    CONFIG_TAG,
    PROBLEMS_TAG,
    custom_scalar_layout,
    histogram_tag,
    maps_tag,
    scalar_metrics,
)
from .writers import DiagnosticsOutput

__all__ = ["SECTIONS", "AttentionDiagnostics"]

Section = Literal["router", "mask", "param"]
OnProblem = Literal["warn", "raise", "stop", "ignore"]
#: The statistics a callback can log: router weights, masks, scalar parameters.
SECTIONS: tuple[str, ...] = ("router", "mask", "param")
_STAGES = {"validate": "val", "test": "test"}


def _images_of(batch: Any) -> torch.Tensor | None:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x
    return None


class AttentionDiagnostics(Callback):
    """Router entropy, mask health, parameter trajectories, attention maps and a summary.

    Finds every attention block of the LightningModule (anything implementing
    :class:`~lightning_attn.blocks.AttentionBlock`: both blocks of this package and your own)
    and, on the Trainer's logging steps, has each block record its statistics inside its own
    forward — eager or compiled — then logs them exactly over the global batch under DDP.

    Args:
        include, exclude: fnmatch patterns of block names to watch / leave out.
        log_every_n_steps: ``None`` (default) follows ``Trainer(log_every_n_steps=...)``: the
            points then share the module's own logging rows; ``0`` never.
        histogram_every_n_steps: mask / router-weight histograms (TensorBoard); ``None``
            (default) is ten times the scalar interval; ``0`` never.
        std_threshold, saturation_low, saturation_high, saturation_threshold,
        router_collapse_threshold, router_indifference_threshold, indifference_warmup_steps,
        dead_branch_factor, temperature_min, temperature_max, unit_margin: override single
            fields of ``thresholds`` (see :class:`~.health.HealthThresholds` for each).
        on_problem: ``"warn"`` (once per block and kind, rank zero), ``"raise"``
            (:class:`~lightning_attn.blocks.AttentionProblemError` on every process),
            ``"stop"`` (warn, then ``trainer.should_stop`` on every process at the same
            step) or ``"ignore"``.
        num_images: images of the first validation / test batch in the attention-map grid
            (``0``: no maps).
        overlay_alpha: opacity of the masks over the images.
        summary: print the ``rich`` summary table at the end of each training epoch.
        sections: the statistics to log: any of ``"router"``, ``"mask"``, ``"param"``.
        thresholds: every health threshold in one object (default ``HealthThresholds()``).
        eval_statistics: also log one point per validation / test epoch
            (``val/attn/...``, ``test/attn/...``).
        log_statistics: write the statistics to the loggers (``False``: only warnings and
            the table).

    Example::

        trainer = Trainer(log_every_n_steps=50, callbacks=[AttentionDiagnostics()])
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        std_threshold: float | None = None,
        saturation_low: float | None = None,
        saturation_high: float | None = None,
        saturation_threshold: float | None = None,
        router_collapse_threshold: float | None = None,
        router_indifference_threshold: float | None = None,
        indifference_warmup_steps: int | None = None,
        dead_branch_factor: float | None = None,
        temperature_min: float | None = None,
        temperature_max: float | None = None,
        unit_margin: float | None = None,
        on_problem: OnProblem = "warn",
        num_images: int = 8,
        overlay_alpha: float = 0.5,
        summary: bool = True,
        sections: Sequence[Section] = SECTIONS,
        thresholds: HealthThresholds | None = None,
        eval_statistics: bool = True,
        log_statistics: bool = True,
    ) -> None:
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        self._schedule = LoggingSchedule(log_every_n_steps, histogram_every_n_steps)
        overrides = {
            name: value
            for name, value in dict(
                std_threshold=std_threshold, saturation_low=saturation_low,
                saturation_high=saturation_high, saturation_threshold=saturation_threshold,
                router_collapse_threshold=router_collapse_threshold,
                router_indifference_threshold=router_indifference_threshold,
                indifference_warmup_steps=indifference_warmup_steps,
                dead_branch_factor=dead_branch_factor, temperature_min=temperature_min,
                temperature_max=temperature_max, unit_margin=unit_margin,
            ).items()
            if value is not None
        }
        if thresholds is not None and not isinstance(thresholds, HealthThresholds):
            raise TypeError(
                f"thresholds must be a HealthThresholds, got {type(thresholds).__name__}"
            )
        self.thresholds = dataclasses.replace(thresholds or HealthThresholds(), **overrides)
        self._reporter = ProblemReporter(on_problem)
        if isinstance(sections, str):
            sections = (sections,)
        if not isinstance(sections, Sequence):
            raise TypeError(
                f"sections must be a sequence of {list(SECTIONS)}, got {sections!r}"
            )
        self.sections = tuple(
            check_choice(f"sections[{i}]", s, SECTIONS) for i, s in enumerate(sections)
        )
        self.num_images = check_int("num_images", num_images, 0)
        self.overlay_alpha = check_fraction("overlay_alpha", overlay_alpha)
        self.summary = bool(summary)
        self.eval_statistics = bool(eval_statistics)
        self.log_statistics = bool(log_statistics)
        #: The statistics and problems of the latest training point (host floats only).
        self.last_stats: GlobalStats | None = None
        self.last_problems: list[Problem] = []
        self._num_points = 0
        self._layout_dirs: list[str] = []
        self._init_runtime()

    def _init_runtime(self) -> None:
        bins = HISTOGRAM_BINS if self._schedule.histogram_every_n_steps != 0 else 0
        self._collector = StatisticsCollector(
            RecordingConfig(self.thresholds.saturation_low, self.thresholds.saturation_high, bins)
        )
        self._output: DiagnosticsOutput | None = None
        self._module_ref: weakref.ref | None = None
        self._point: tuple[bool, bool] | None = None  # (scalars, histograms) being recorded
        self._eval_open = False
        self._capturing = False
        self._missing_warned: set[str] = set()

    # -- identity and options --------------------------------------------------------------
    @property
    def on_problem(self) -> str:
        return self._reporter.on_problem

    @property
    def log_every_n_steps(self) -> int | None:
        return self._schedule.log_every_n_steps

    @property
    def block_names(self) -> list[str]:
        """Qualified names of the blocks being watched."""
        return list(self._collector.blocks)

    @property
    def num_points(self) -> int:
        """Training logging points measured so far (continues across a resume)."""
        return self._num_points

    @property
    def state_key(self) -> str:
        # Keyed on what the callback watches and logs, not on its thresholds (as
        # EarlyStopping keys on what it monitors): a resumed run may change a threshold.
        return self._generate_state_key(
            sections=self.sections, include=self.include, exclude=self.exclude
        )

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._output = DiagnosticsOutput(trainer)
        owner = type(self).__name__
        if stage == "fit" and self.sections and self._schedule.interval(trainer) == 0:
            rank_zero_warn(f"{owner}: log_every_n_steps is 0, so no statistics are gathered")
        wanted = []
        if self.log_statistics and self.sections and self._schedule.histogram_interval(trainer):
            wanted.append("histograms")
        if self.num_images:
            wanted.append("attention-map images")
        if wanted and not self._output.rich_writers and trainer.is_global_zero:
            rank_zero_info(
                f"{owner}: no logger of the Trainer shows {' or '.join(wanted)} "
                "(TensorBoardLogger does); scalars still go to every logger, and warnings "
                "and the summary still work"
            )

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup: lazily built blocks exist and sit
        # on their device. Before the first forward: no extra compilation.
        if self._module_ref is not None and self._module_ref() is pl_module:
            return
        blocks, unmatched = find_attention_blocks(pl_module, self.include, self.exclude)
        for pattern in unmatched:
            rank_zero_warn(f"{type(self).__name__}: pattern {pattern!r} matches no attention "
                           f"block")
        if not blocks:
            rank_zero_warn(
                f"{type(self).__name__}: no attention block (anything implementing "
                f"lightning_attn.blocks.AttentionBlock) found in {type(pl_module).__name__}"
                + (f" matching include={list(self.include)}" if self.include else "")
                + (f" and exclude={list(self.exclude)}" if self.exclude else "")
                + "; the callback will do nothing"
            )
        self._collector.bind(blocks, pl_module.device)
        self._module_ref = weakref.ref(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        output = self._output
        if not self._collector.blocks or output is None or not output.rich_writers:
            return
        dirs = [getattr(w.logger, "log_dir", None) or "" for w in output.rich_writers]
        if all(d in self._layout_dirs for d in dirs):
            return  # resumed into a run that already has its layout and configuration
        if self.log_statistics:
            output.layout(custom_scalar_layout(self._collector.infos, self.sections))
        output.json(CONFIG_TAG, self._config_document(trainer), LoggingSchedule.step(trainer))
        self._layout_dirs += [d for d in dirs if d not in self._layout_dirs]

    def _config_document(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What the report needs to judge the run as the callback did."""
        return {
            "version": __version__,
            "callback": type(self).__name__,
            "thresholds": dataclasses.asdict(self.thresholds),
            "sections": list(self.sections),
            "on_problem": self.on_problem,
            "log_every_n_steps": self._schedule.interval(trainer),
            "histogram_every_n_steps": self._schedule.histogram_interval(trainer),
            "blocks": [
                {
                    "name": i.name, "masks": list(i.layout.mask_names),
                    "branches": list(i.branch_names or ()), "params": list(i.param_names),
                    "trainable": list(i.trainable_names),
                }
                for i in self._collector.infos
            ],
        }

    # -- one training point ----------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._collector.blocks or self._point is not None:
            return  # nothing to watch, or a point spanning micro-batches is open
        scalars, histograms = self._schedule.decide(trainer)
        scalars = scalars and bool(self.sections or self.summary)
        histograms = histograms and self.log_statistics and bool(self.sections)
        if scalars or histograms:
            self._point = (scalars, histograms)
            self._collector.open(histograms)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._point is not None:
            self._collector.record_gradients()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._point is None or not LoggingSchedule.steps_optimizer(trainer):
            return  # not a point, or more micro-batches of this optimizer step to come
        scalars, histograms = self._point
        self._point = None
        stats = self._collector.finish(trainer, LoggingSchedule.step(trainer))
        self._warn_missing(stats)
        problems = find_problems(stats, self.thresholds, sections=self.sections)
        self.last_stats, self.last_problems = stats, problems
        output = self._output
        if scalars:
            self._num_points += 1
            if self.log_statistics:
                output.scalars(pl_module, scalar_metrics(stats, self.sections), False)
        if histograms:
            output.histograms(
                {
                    histogram_tag(block, name): counts
                    for block, bs in stats.blocks.items()
                    for name, counts in bs.histograms.items()
                    if ("router" if name == "router" else "mask") in self.sections
                },
                stats.step,
            )
        self._report(trainer, problems)

    def _report(self, trainer: pl.Trainer, problems: list[Problem]) -> None:
        if self.on_problem == "ignore":
            return
        fresh = [p for p in problems if self._reporter.key(p.block, p.kind) not in
                 self._reporter.reported]
        for p in fresh:  # written before a "raise" can interrupt
            self._output.json(PROBLEMS_TAG, dataclasses.asdict(p), p.step)
        self._reporter.report(problems)
        if fresh and self.on_problem == "stop":
            trainer.should_stop = True  # same problems on every process: same step

    def _warn_missing(self, stats: GlobalStats) -> None:
        for name, bs in stats.blocks.items():
            if bs.forwards or name in self._missing_warned:
                continue
            self._missing_warned.add(name)
            rank_zero_warn(
                f"attention block {name!r} recorded no statistics during the logging step at "
                f"step {stats.step}: it did not run in that step, or it ran somewhere its "
                "recording cannot reach (torch.jit, torch.export, an ONNX or TensorRT engine, "
                "a forward that does not call self.record(...)). Exclude it "
                "(exclude=[...]) if it is not meant to run in training.",
                category=MissingStatisticsWarning,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A batch whose LightningModule.on_train_batch_start returned -1 ends the epoch
        # without on_train_batch_end: close its point, so nothing else is recorded.
        if self._point is not None:
            self._point = None
            self._collector.close()
        if self.summary and trainer.is_global_zero and self._collector.blocks:
            self._print_summary(trainer)

    def _print_summary(self, trainer: pl.Trainer) -> None:
        console = Console()
        stats, epoch = self.last_stats, trainer.current_epoch
        if stats is None:
            console.print(
                f"Attention summary (epoch {epoch}): no statistics yet - no logging step so "
                "far (see log_every_n_steps)"
            )
            return
        console.print(
            render_summary(
                stats, self.last_problems, self._reporter.reported, self._collector.infos,
                title=f"Attention summary (epoch {epoch}, step {stats.step})",
            )
        )

    # -- validation and test: one point per epoch, maps from the first batch ----------------
    def _stage(self, trainer: pl.Trainer) -> str | None:
        if trainer.sanity_checking or not self._collector.blocks:
            return None
        return _STAGES.get(trainer.state.stage.value if trainer.state.stage else "", "val")

    def _eval_epoch_start(self, trainer: pl.Trainer) -> None:
        if (
            self._stage(trainer) is not None and self.eval_statistics and self.sections
            and self.log_statistics and self._point is None
        ):
            self._collector.open()
            self._eval_open = True

    def _eval_batch_start(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> None:
        if self.num_images and self._stage(trainer) and batch_idx == 0 and dataloader_idx == 0:
            for block in self._collector.blocks.values():
                block.start_capture(self)
            self._capturing = True

    def _eval_batch_end(self, trainer: pl.Trainer, batch: Any) -> None:
        if not self._capturing:
            return
        maps = {}
        for name, block in self._collector.blocks.items():
            if block.captured_map is not None:
                maps[name] = block.captured_map[: self.num_images].detach().cpu()
        self._stop_capture()
        stage = self._stage(trainer)
        if not maps or not trainer.is_global_zero or not self._output.rich_writers:
            return
        images = _images_of(batch)
        if images is not None and images.shape[0] != next(iter(maps.values())).shape[0]:
            images = images[: self.num_images]
        grid = render_maps(images, maps, self.overlay_alpha)
        self._output.image(maps_tag(stage), grid, LoggingSchedule.step(trainer))

    def _stop_capture(self) -> None:
        if self._capturing:
            for block in self._collector.blocks.values():
                block.stop_capture(self)
        self._capturing = False

    def _eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._eval_open:
            return
        self._eval_open = False
        stage = self._stage(trainer) or "val"
        stats = self._collector.finish(trainer, LoggingSchedule.step(trainer))
        self._output.scalars(pl_module, scalar_metrics(stats, self.sections, stage), True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start(trainer)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start(trainer)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(trainer, batch_idx, dataloader_idx)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(trainer, batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, batch)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(trainer, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    # -- cleanup ---------------------------------------------------------------------------
    def _release(self) -> None:
        self._point, self._eval_open = None, False
        self._stop_capture()
        self._collector.unbind()  # recording off, accumulators dropped
        self._module_ref = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call `teardown` after an exception: leave nothing behind.
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    # -- checkpointing and pickling --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "reported": self._reporter.state_dict(),
            "num_points": self._num_points,
            "layout_dirs": list(self._layout_dirs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reporter.load_state_dict(state_dict.get("reported", {}))
        self._num_points = int(state_dict.get("num_points", 0))
        self._layout_dirs = list(state_dict.get("layout_dirs", []))

    def __getstate__(self) -> dict[str, Any]:
        # Configuration and history travel (ddp_spawn); modules, tensors and writers do not.
        state = self.__dict__.copy()
        for key in ("_collector", "_output", "_module_ref", "_point", "_eval_open",
                    "_capturing", "_missing_warned"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

