"""AttentionDiagnostics: the one statistics callback, configured by sections and thresholds.

Hook flow of one training logging point (one optimizer step; see :mod:`lightning_attn.schedule`)::

    on_train_batch_start      the schedule says "measure" -> every block records (a flag)
      forward(s)              each block adds its sums to its accumulator, in the graph
    on_before_optimizer_step  the scalar parameters as the forwards used them (before the
                              update) and the gradient norms of the learnable ones
    on_train_batch_end        on the micro-batch that steps the optimizer: one vector, one
                              collective, one host copy (:mod:`.collector`) -> statistics
                              -> problems (:mod:`.health`) and the writer seam
                              (:mod:`.writers`): scalars through Lightning, histograms, texts

Validation and test runs record over every batch and log one point per run
(``val/attn/...``, ``test/attn/...``); the first validation / test batch also gives the
attention-map images. A ``validate``/``test`` call logs at the step of the weights it
evaluates: that of the checkpoint it loaded (a new Trainer's own counter is 0), or the
Trainer's own step after a fit; it writes an ``attn/evaluation`` record saying which (the
step is ``null`` for weights of unknown step: the report then draws a marker, not a point
of the training curve). Each phase records into its own accumulator row (the hooks of
Lightning's loops switch the row), so a validation run inside an accumulation window, a
sanity check or ``trainer.validate`` between fits never adds to a training point. On every
other training batch the hooks compare two integers.

A *run* is one ``fit``: every fit started without ``ckpt_path`` gets a new ``run_id`` and
fresh warning state (a callback reused by a sweep warns about each model); a fit resumed from
a checkpoint holding this callback's state continues its run; an evaluation carries the
``run_id`` of the run it evaluates (the checkpoint's, or the fit before it). Every
diagnostics callback of one Trainer shares the run's ``run_id``.
"""

from __future__ import annotations

import dataclasses
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from torch.optim import Optimizer

from .. import __version__
from ..blocks.adapters import AttentionAdapter, check_adapters
from ..blocks.census import unseen_attention
from ..blocks.discovery import averaged_copies, find_attention_blocks
from ..core.categories import (
    DiagnosticsStateWarning,
    MissingStatisticsWarning,
    RecordingContractWarning,
    UnsupportedAttentionWarning,
)
from ..core.point import breaches
from ..core.problems import HealthThresholds, Measured, Problem, measure_point, problems_of
from ..core.statistics import (
    HISTOGRAM_BINS,
    SECTIONS,
    GlobalStats,
    RecordingConfig,
)
from ..core.tags import (
    CONFIG_TAG,
    EVALUATION_TAG,
    HEADS_MAP_TAG,
    HEADS_TAG,
    PREFIX,
    PROBLEMS_TAG,
    chart_layout,
    head_record,
    histogram_tag,
    maps_tag,
    scalar_columns,
)
from ..core.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_patterns,
)
from ..schedule import LoggingSchedule
from .collector import StatisticsCollector
from .health import ProblemReporter
from .maps import head_heatmaps, render_maps, token_map
from .summary import render_summary
from .writers import (
    DiagnosticsOutput,
    DiagnosticsWriter,
    ScalarBatch,
    check_writers,
    monitored_metrics,
)

__all__ = ["READ_EVERY_N_STEPS", "SECTIONS", "AttentionDiagnostics"]

#: Training points are read, judged and written in batches: the points of this many steps
#: (one host copy and one pass of the rules for the batch). Logging at every step, a warning
#: comes up to this many steps after the point it names. A point that must act at its step
#: (``on_problem`` ``"raise"`` / ``"stop"``, a monitored statistic) is read as it ends.
READ_EVERY_N_STEPS = 32

Section = Literal["router", "mask", "param", "heads"]
OnProblem = Literal["warn", "raise", "stop", "ignore"]
#: Lightning's evaluation stages -> the phase they record in (and their tags' prefix).
_EVAL_PHASES = {"validate": "val", "sanity_check": "val", "test": "test"}
#: The threshold keywords of the release before ``thresholds=HealthThresholds(...)``, accepted
#: (with a FutureWarning) until the next release. A literal list: a field added to
#: HealthThresholds since is a field only, never a keyword of the callback.
_DEPRECATED = (
    "std_threshold", "saturation_low", "saturation_high", "saturation_threshold",
    "router_collapse_threshold", "router_indifference_threshold",
    "indifference_warmup_steps", "dead_branch_factor", "temperature_min", "temperature_max",
    "unit_margin",
)


def _thresholds_of(
    owner: str, thresholds: HealthThresholds | None, deprecated: dict[str, Any]
) -> HealthThresholds:
    """``thresholds`` with the deprecated threshold keywords applied (a ``FutureWarning``);
    any other keyword is a ``TypeError`` that says where a threshold goes."""
    thresholds = HealthThresholds() if thresholds is None else thresholds
    if not isinstance(thresholds, HealthThresholds):
        raise TypeError(f"thresholds must be a HealthThresholds, got {type(thresholds).__name__}")
    unknown = sorted(set(deprecated) - set(_DEPRECATED))
    if unknown:
        fields = [f.name for f in dataclasses.fields(HealthThresholds)]
        hint = (f"; {', '.join(u for u in unknown if u in fields)} go in "
                "thresholds=HealthThresholds(...)" if set(unknown) & set(fields) else "")
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}{hint} "
                        f"(HealthThresholds fields: {fields})")
    overrides = {k: v for k, v in deprecated.items() if v is not None}
    if overrides:
        keywords = ", ".join(f"{k}=..." for k in overrides)
        warnings.warn(
            f"{owner}({keywords}) is deprecated and will be removed in the next release: "
            f"pass thresholds=HealthThresholds({keywords})", FutureWarning, stacklevel=3,
        )
    return dataclasses.replace(thresholds, **overrides)


def _check_sections(sections: object) -> tuple[str, ...]:
    if isinstance(sections, str):
        sections = (sections,)
    if not isinstance(sections, Sequence):
        raise TypeError(f"sections must be a sequence of {list(SECTIONS)}, got {sections!r}")
    return tuple(check_choice(f"sections[{i}]", s, SECTIONS) for i, s in enumerate(sections))


#: This process's callbacks by token, for the state that ``ddp_spawn`` workers send back
#: (weak: a callback no longer used is forgotten).
_AWAITING: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: Key of the state in the spawn launcher's extra results (and the launcher attribute
#: holding the callbacks that send theirs).
_SPAWN_KEY = "lightning_attn"


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
        include: fnmatch patterns of the block names to watch (``None``: every block).
        exclude: fnmatch patterns of block names to leave out.
        log_every_n_steps: ``None`` (default) follows ``Trainer(log_every_n_steps=...)``: the
            points then share the module's own logging rows; ``0`` never.
        histogram_every_n_steps: mask / router-weight histograms and the heads' layer x
            head heatmaps (TensorBoard); ``None`` (default) is ten times the scalar interval;
            ``0`` never.
        thresholds: every health threshold in one object
            (:class:`~lightning_attn.core.HealthThresholds`; on the command line
            ``--diagnostics.thresholds.std_threshold 0.05``).
        on_problem: ``"warn"`` (once per block and kind, rank zero), ``"raise"``
            (:class:`~lightning_attn.core.AttentionProblemError` on every process),
            ``"stop"`` (warn, then ``trainer.should_stop`` on every process at the same
            step) or ``"ignore"``.
        sections: the statistics to log: any of ``"router"``, ``"mask"``, ``"param"``,
            ``"heads"``.
        num_images: images of the first validation / test batch in the attention-map grid,
            with each block's mask over them (a ViT's: its class token's attention over the
            patches); ``0``: no maps.
        overlay_alpha: opacity of the masks over the images.
        summary: print the ``rich`` summary table at the end of each training epoch.
        eval_statistics: also log one point per validation / test run
            (``val/attn/...``, ``test/attn/...``).
        log_statistics: write the statistics to the loggers (``False``: only warnings and
            the table).
        adapters: adapters (:func:`~lightning_attn.blocks.attention_adapter`) for attention
            modules of your own, for this callback only; tried before the registered and the
            built-in ones.
        writers: :class:`~lightning_attn.callbacks.DiagnosticsWriter` subclasses for logger
            backends of your own, for this callback only.

    The threshold fields used to be keyword arguments of their own (``std_threshold=...``);
    they are still accepted, with a ``FutureWarning``, until the next release.

    Every statistic goes to every logger. Those that a callback or a scheduler of the Trainer
    monitors (``EarlyStopping(monitor="attn/<block>/mask/std")``, ``ModelCheckpoint``,
    ``ReduceLROnPlateau``) go to ``trainer.callback_metrics`` as well; all of the latest
    training point are in :attr:`last_stats`. Training points are read in batches of up to
    :data:`READ_EVERY_N_STEPS` steps (:meth:`read_points`), each point as it ends when it
    must act at its step.

    Several in one Trainer (the presets, say) must differ in what they watch: ``include``,
    ``exclude``, ``sections`` or ``adapters`` (their ``state_key``, under which a checkpoint
    keeps each one's state). Two that differ only in thresholds or ``on_problem`` are one
    callback too many: Lightning refuses them ("more than one stateful callback").

    Example::

        trainer = Trainer(log_every_n_steps=50, callbacks=[AttentionDiagnostics()])
    """

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        thresholds: HealthThresholds = HealthThresholds(),  # noqa: B008 - frozen, shared
        on_problem: OnProblem = "warn",
        sections: Sequence[Section] = SECTIONS,
        num_images: int = 8,
        overlay_alpha: float = 0.5,
        summary: bool = True,
        eval_statistics: bool = True,
        log_statistics: bool = True,
        adapters: Sequence[AttentionAdapter] = (),
        writers: Sequence[type[DiagnosticsWriter]] = (),
        **deprecated: Any,
    ) -> None:
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        self._schedule = LoggingSchedule(log_every_n_steps, histogram_every_n_steps)
        self.thresholds = _thresholds_of(type(self).__name__, thresholds, deprecated)
        self._on_problem = ProblemReporter(on_problem).on_problem  # checked
        self.sections = _check_sections(sections)
        self.num_images = check_int("num_images", num_images, 0)
        self.overlay_alpha = check_fraction("overlay_alpha", overlay_alpha)
        self.summary = check_bool("summary", summary)
        self.eval_statistics = check_bool("eval_statistics", eval_statistics)
        self.log_statistics = check_bool("log_statistics", log_statistics)
        self.adapters = check_adapters(adapters)
        self.writers = check_writers(writers)
        #: Finds this instance when its state comes back from ``ddp_spawn`` workers.
        self._token = uuid.uuid4().hex
        _AWAITING[self._token] = self
        self._init_runtime()
        self._new_run()

    def _new_run(self) -> None:
        """Forget the previous fit's run: its id, points, warnings and log directories."""
        # The statistics and problems of the latest training point read (host floats only).
        self._last_stats: GlobalStats | None = None
        # its measurements: (its batch's, where its blocks start and stop in them)
        self._last_measured: tuple[Measured, int, int] | list[Problem] | None = None
        #: Identifies the run (one fit) across resumes and the evaluations of its
        #: checkpoints (kept in checkpoints; the report groups runs by it).
        self.run_id: str | None = None
        self._reporter = ProblemReporter(self.on_problem)
        self._num_points = 0
        self._layout_dirs: list[str] = []
        self._missing_warned: set[str] = set()
        self._contract_warned: set[str] = set()

    def _init_runtime(self) -> None:
        bins = HISTOGRAM_BINS if self._schedule.histogram_every_n_steps != 0 else 0
        self._collector = StatisticsCollector(
            RecordingConfig(self.thresholds.saturation_low, self.thresholds.saturation_high, bins)
        )
        self._output: DiagnosticsOutput | None = None
        self._module_ref: weakref.ref | None = None
        self._point: tuple[bool, bool] | None = None  # (scalars, histograms) being recorded
        self._point_batch: int | None = None  # points read at once (set by the first)
        self._eval_phase: str | None = None  # the evaluation point being recorded
        self._checkpoint_step: int | None = None  # of the checkpoint this call loaded
        self._eval_step: int | None = None  # where this validate / test call logs
        self._capturing = False
        #: The checkpoint this stage restored from, and why this callback's state in it was
        #: not used (``None``: it was).
        self._checkpoint: str | None = None
        self._state_refused: str | None = None
        self._averaged: set[str] = set()  # blocks of an averaged copy (an EMA submodule)

    # -- identity and options --------------------------------------------------------------
    @property
    def on_problem(self) -> str:
        return self._on_problem

    @property
    def log_every_n_steps(self) -> int | None:
        return self._schedule.log_every_n_steps

    @property
    def block_names(self) -> list[str]:
        """Qualified names of the blocks being watched."""
        return list(self._collector.blocks)

    @property
    def last_stats(self) -> GlobalStats | None:
        """The statistics of the latest training point (host floats only; reads the points
        not read yet first)."""
        self.read_points()
        return self._last_stats

    @property
    def last_problems(self) -> list[Problem]:
        """The problems of the latest training point (made from its measurements when
        asked for)."""
        self.read_points()
        measured = self._last_measured
        if measured is None:
            return []
        if isinstance(measured, list):  # as a ddp_spawn worker sent them
            return list(measured)
        batch, start, stop = measured  # the point's blocks among its batch's
        return problems_of(batch.window(start, stop), self._last_stats.step)

    @property
    def num_points(self) -> int:
        """Training logging points measured so far (continues across a resume)."""
        self.read_points()
        return self._num_points

    @property
    def state_key(self) -> str:
        # Keyed on what the callback watches and logs, not on its thresholds (as
        # EarlyStopping keys on what it monitors): a resumed run may change a threshold.
        watched: dict[str, Any] = {
            "sections": self.sections, "include": self.include, "exclude": self.exclude}
        if self.adapters:  # absent otherwise: the keys of earlier checkpoints stay valid
            watched["adapters"] = tuple(_adapter_key(a) for a in self.adapters)
        return self._generate_state_key(**watched)

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the checkpoint's states are restored: a fit is a new run unless its
        # checkpoint brings this callback's state (load_state_dict then restores it).
        if stage == "fit":
            self._new_run()
        self._checkpoint, self._state_refused = None, None
        self._checkpoint_step = None  # on_load_checkpoint, after setup, sets this call's
        self._point_batch = None  # the Trainer's schedule and monitors may differ
        _return_state_from_spawn(trainer, self)
        self._output = DiagnosticsOutput(trainer, self.writers)
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
        blocks, unmatched = find_attention_blocks(pl_module, self.include, self.exclude,
                                                  third_party=True, adapters=self.adapters)
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
        self._warn_unseen(pl_module, blocks)
        self._collector.bind(blocks, pl_module.device)
        # An averaged copy's blocks (an EMA as a submodule) run where the user runs the copy:
        # watched in every phase, not expected in training points.
        copies = tuple(f"{name}." for name in averaged_copies(pl_module))
        self._averaged = {name for name in blocks if name.startswith(copies)}
        self._module_ref = weakref.ref(pl_module)

    def _warn_unseen(self, pl_module: pl.LightningModule, blocks: dict) -> None:
        # Every attention module the diagnostics cannot measure, by class, with why (modules
        # left out by include / exclude are left out on purpose).
        def ignored(name: str) -> bool:
            name = ".".join(p for p in name.split(".") if p != "_orig_mod")
            return (self.include is not None and not any(fnmatchcase(name, p)
                                                         for p in self.include)) or any(
                fnmatchcase(name, p) for p in self.exclude)

        watched = [getattr(b, "module", b) for b in blocks.values()]
        for cls, (why, names) in unseen_attention(pl_module, watched, ignored).items():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            rank_zero_warn(
                f"UnsupportedAttentionWarning: {cls} ({names[0]!r}{more}) is attention the "
                f"diagnostics do not measure: {why}", category=UnsupportedAttentionWarning,
            )

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's callback states are restored (some strategies restore
        # after on_fit_start): a resumed fit, and an evaluation of a checkpoint, carry the
        # run_id of the fit that wrote it.
        self._bind(trainer, pl_module)
        self._ensure_run(trainer)

    def _ensure_run(self, trainer: pl.Trainer) -> None:
        """The run's id: restored, a peer's (every diagnostics callback of the Trainer logs
        into the same run) or new; a new one after a checkpoint is said, once."""
        if self.run_id is not None:
            return
        peers = [cb for cb in trainer.callbacks if isinstance(cb, AttentionDiagnostics)]
        self.run_id = next((p.run_id for p in peers if p.run_id), None) or uuid.uuid4().hex
        if self._checkpoint is None:
            return
        why = self._state_refused or "it holds an earlier release's state, without a run_id"
        restarted = "resumed" if trainer.state.fn == "fit" else "evaluating"
        rank_zero_warn(
            f"DiagnosticsStateWarning: {type(self).__name__}: {restarted} from checkpoint "
            f"{self._checkpoint!r}, but {why}: this is a new run, run_id {self.run_id} (the "
            "report shows it apart from the run that wrote the checkpoint; its warnings "
            "start afresh)",
            category=DiagnosticsStateWarning,
        )
        self._checkpoint = None  # said once

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.read_points()  # the training points before this validation, in order
        self._start(trainer, pl_module)
        self._collector.set_phase("val")
        if trainer.state.fn == "validate":
            self._start_evaluation(trainer, "val")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)
        self._collector.set_phase("test")
        self._start_evaluation(trainer, "test")

    def _weights_step(self, trainer: pl.Trainer) -> int | None:
        """The step of the weights a ``validate``/``test`` call evaluates: its checkpoint's,
        else the Trainer's own after training steps, else unknown (``None``: a new Trainer
        given a model trained elsewhere, or not at all)."""
        if getattr(trainer, "ckpt_path", None) is not None and self._checkpoint_step is not None:
            return self._checkpoint_step
        step = LoggingSchedule.step(trainer)
        return step if step > 0 else None

    def _start_evaluation(self, trainer: pl.Trainer, phase: str) -> None:
        weights = self._weights_step(trainer)
        logged = LoggingSchedule.step(trainer)  # where Lightning logs the module's metrics
        self._eval_step = logged if weights is None else weights
        self._write_config(trainer)
        if self._collector.blocks and self._output is not None:
            ckpt = getattr(trainer, "ckpt_path", None)
            self._output.json(EVALUATION_TAG, {
                "fn": str(getattr(trainer.state.fn, "value", trainer.state.fn)),
                "phase": phase, "run_id": self.run_id,
                "ckpt_path": None if ckpt is None else str(ckpt),
                "step": weights, "logged_step": logged,
            }, self._eval_step)

    def _logging_step(self, trainer: pl.Trainer) -> int:
        """The step an evaluation point is logged at (see :meth:`_start_evaluation`)."""
        if trainer.state.fn in ("validate", "test") and self._eval_step is not None:
            return self._eval_step
        return LoggingSchedule.step(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collector.set_phase("predict")

    def _back_to_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collector.set_phase("train")
        if trainer.state.fn in ("validate", "test"):
            self._eval_step = None

    on_validation_end = on_test_end = on_predict_end = _back_to_training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_run(trainer)
        self._write_config(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.read_points()

    def _write_config(self, trainer: pl.Trainer) -> None:
        """The chart layout and the run's configuration, once per log directory."""
        output = self._output
        if not self._collector.blocks or output is None or not output.rich_writers:
            return
        dirs = [getattr(w.logger, "log_dir", None) or "" for w in output.rich_writers]
        if all(d in self._layout_dirs for d in dirs):
            return  # resumed into a run that already has its layout and configuration
        if self.log_statistics:
            output.layout(chart_layout(self._collector.infos, self.sections))
        output.json(CONFIG_TAG, self._config_document(trainer), self._logging_step(trainer))
        self._layout_dirs += [d for d in dirs if d not in self._layout_dirs]

    def _config_document(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What the report needs to judge the run as the callback did, and to join it with
        the runs it continues or evaluates."""
        ckpt = getattr(trainer, "ckpt_path", None)
        return {
            "version": __version__,
            "callback": type(self).__name__,
            "run_id": self.run_id,
            "fn": str(getattr(trainer.state.fn, "value", trainer.state.fn)),
            "ckpt_path": None if ckpt is None else str(ckpt),
            "thresholds": dataclasses.asdict(self.thresholds),
            "sections": list(self.sections),
            "on_problem": self.on_problem,
            "log_every_n_steps": self._schedule.interval(trainer),
            "histogram_every_n_steps": self._schedule.histogram_interval(trainer),
            "blocks": [info.to_json() for info in self._collector.infos],
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
            self._collector.open("train", histograms)
        else:  # the last point kept its hold for a point at this step: none, so let go
            self._collector.release()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._point is not None:  # the masks the forward held back: reduced, let go
            self._collector.settle()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._point is not None:
            self._collector.record_gradients(optimizer)

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
        (scalars, histograms), self._point = self._point, None
        # the collective now (every process at this step); read with the batch's others
        # the blocks stay held for the next step only when it logs too: a step that logs
        # nothing never pays for letting go
        self._collector.finish_later(trainer, LoggingSchedule.step(trainer),
                                     (scalars, histograms, trainer.current_epoch),
                                     linger=self._schedule.interval(trainer) == 1)
        if self._point_batch is None:
            self._point_batch = self._batch_size(trainer)
        if self._collector.num_later >= self._point_batch:
            self.read_points()

    def _batch_size(self, trainer: pl.Trainer) -> int:
        """Points read at once: those of :data:`READ_EVERY_N_STEPS` steps; one where a
        problem must act at its step (``on_problem`` ``"raise"`` / ``"stop"``), where a
        callback or scheduler monitors one of the statistics, or where the Trainer has
        another diagnostics callback."""
        interval = self._schedule.interval(trainer)
        monitored = any(name.startswith(f"{PREFIX}/") for name in monitored_metrics(trainer))
        # several of these callbacks would write their batches one after the other, each
        # going back to the batch's first step: the log would leave step order
        peers = sum(isinstance(cb, AttentionDiagnostics) for cb in trainer.callbacks) > 1
        if self.on_problem in ("raise", "stop") or monitored or peers or interval <= 0:
            return 1
        return max(1, READ_EVERY_N_STEPS // interval)

    def read_points(self) -> None:
        """Read, judge and write the training points finished so far (the callback does this
        every :data:`READ_EVERY_N_STEPS` steps, at the end of each epoch, before validation
        and before a checkpoint is saved; reading :attr:`last_stats` does it too). Local:
        the points were combined over the processes when they finished."""
        if not self._collector.num_later:
            return
        for batch in self._collector.read_later():
            size = len(batch.points[0].names)
            # the rules on every point's blocks at once, each block at its point's step
            measured = measure_point(batch.columns, np.repeat(np.asarray(batch.steps), size),
                                     self.thresholds, sections=self.sections)
            bad = measured.bad_by_window(size)
            # what breaks the recording contract, looked for point by point only if anywhere
            breached = bool(breaches(batch.columns, self.sections))
            index = {name: b for b, name in enumerate(batch.points[0].names)}
            for p, (point, step, tag) in enumerate(
                    zip(batch.points, batch.steps, batch.tags, strict=True)):
                self._write_point(point.stats(step, "train"), (measured, p * size, size, index),
                                  bad.get(p, []), breached, *tag)

    def _write_point(self, stats: GlobalStats, judged: tuple, bad: list[tuple[int, str]],
                     breached: bool, scalars: bool, histograms: bool, epoch: int) -> None:
        """One training point's warnings, problems and output. ``judged``: the batch's
        measurements, where this point's blocks start in them, how many, and their index by
        name; ``bad``: this point's bad measurements ``(index in the batch, kind)``;
        ``epoch``: the point's."""
        measured, start, size, index = judged
        self._warn_missing(stats)
        if breached:
            self._warn_contract(stats)
        reporter = self._reporter
        if reporter.active:  # a problem being reported may have cleared
            reporter.clear([(block, kind) for block, kind in reporter.active_keys()
                            if block in index and measured.clear_at(start + index[block], kind)])
        # words only for the problems a warning says (those not being reported already);
        # every problem of the point when asked for (last_problems)
        names = stats.point().names
        fresh_keys = set(reporter.fresh_keys([(names[i - start], kind) for i, kind in bad]))
        fresh = [measured.problem_at(i, kind, stats.step) for i, kind in bad
                 if (names[i - start], kind) in fresh_keys]
        self._last_stats, self._last_measured = stats, (measured, start, start + size)
        output = self._output
        heads = head_record(stats) if "heads" in self.sections and (scalars or histograms) else {}
        if scalars:
            self._num_points += 1
            if self.log_statistics:
                output.scalars(ScalarBatch(*scalar_columns(stats, self.sections)), stats.step,
                               epoch)
                if heads:  # the per-head values behind the heads' scalars (heatmaps, report)
                    output.json(HEADS_TAG, heads, stats.step)
        if histograms and heads and output.rich_writers:  # the images of the point
            output.image(HEADS_MAP_TAG, head_heatmaps(
                list(heads), [h["head_entropy"] for h in heads.values()],
                [h["head_max_logit"] for h in heads.values()]), stats.step)
        if histograms:
            point = stats.point()
            output.histograms(
                {
                    histogram_tag(block, name): counts
                    for b, block in enumerate(point.names)
                    for name, counts in point.histograms(b).items()
                    if ("router" if name == "router" else "mask") in self.sections
                },
                stats.step,
            )
        self._report(output.trainer, fresh)

    def _report(self, trainer: pl.Trainer, problems: list[Problem]) -> None:
        if self.on_problem == "ignore":
            return
        fresh = self._reporter.fresh(problems)
        if fresh:  # one record per point, written before a "raise" can interrupt
            self._output.json(PROBLEMS_TAG, [p.to_json() for p in fresh], fresh[0].step)
        self._reporter.report(problems)
        if fresh and self.on_problem == "stop":
            trainer.should_stop = True  # same problems on every process: same step

    def _warn_missing(self, stats: GlobalStats) -> None:
        point = stats.point()
        for b in np.flatnonzero(point.forwards == 0).tolist():  # usually none
            name = point.names[b]
            if name in self._missing_warned or name in self._averaged:
                continue
            self._missing_warned.add(name)
            rank_zero_warn(
                f"MissingStatisticsWarning: attention block {name!r} recorded no statistics "
                "during the logging step at "
                f"step {stats.step}: it did not run in that step, or it ran somewhere its "
                "recording cannot reach (torch.jit, torch.export, an ONNX or TensorRT engine, "
                "a forward that does not call self.record(...)). Exclude it "
                "(exclude=[...]) if it is not meant to run in training.",
                category=MissingStatisticsWarning,
            )

    def _warn_contract(self, stats: GlobalStats) -> None:
        """Once per block: what it recorded outside ``record()``'s contract (judged on the
        host from the point's extremes: no sync in the forward)."""
        for name, seen in breaches(stats.point(), self.sections).items():
            if name in self._contract_warned:
                continue
            self._contract_warned.add(name)
            where = "" if stats.phase == "train" else f" in {stats.phase}"
            rank_zero_warn(
                f"RecordingContractWarning: attention block {name!r} recorded "
                f"{'; '.join(seen)} at step {stats.step}{where}. record() takes masks in "
                "[0, 1] and router weights on the simplex (softmax probabilities: rows "
                "summing to 1); these statistics mean little, and the histograms leave out "
                "the values outside [0, 1]. Record the gate's output after its sigmoid / "
                "softmax, not its logits (an adapter: convert=... to weights).",
                category=RecordingContractWarning,
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A batch whose LightningModule.on_train_batch_start returned -1 ends the epoch
        # without on_train_batch_end: close its point, so nothing else is recorded.
        if self._point is not None:
            self._point = None
            self._collector.close("train")
        self._collector.release()  # the last point's hold: the epoch's own hooks may run forwards
        self.read_points()
        if self.summary and trainer.is_global_zero and self._collector.blocks:
            self._print_summary(trainer)

    def _print_summary(self, trainer: pl.Trainer) -> None:
        console = Console()
        stats, epoch = self._last_stats, trainer.current_epoch
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
                sections=self.sections,
            )
        )

    # -- validation and test: one point per run, maps from the first batch ------------------
    def _stage(self, trainer: pl.Trainer) -> str | None:
        """The evaluation phase being run (``None`` in a sanity check, or with no block)."""
        if trainer.sanity_checking or not self._collector.blocks:
            return None
        stage = trainer.state.stage
        return _EVAL_PHASES.get(getattr(stage, "value", stage) or "", "val")

    def _eval_epoch_start(self, trainer: pl.Trainer) -> None:
        phase = self._stage(trainer)
        if (
            phase is not None and self.eval_statistics and self.sections
            and self.log_statistics
        ):
            self._collector.open(phase)
            self._eval_phase = phase

    def _eval_batch_start(self, trainer: pl.Trainer, batch_idx: int, dataloader_idx: int) -> None:
        if self.num_images and self._stage(trainer) and batch_idx == 0 and dataloader_idx == 0:
            for block in self._collector.blocks.values():
                block.start_capture(self)
            self._capturing = True

    def _eval_batch_end(self, trainer: pl.Trainer, batch: Any) -> None:
        if self._eval_phase is not None:  # the parameters the evaluation runs with
            self._collector.snapshot_parameters(self._eval_phase)
        if not self._capturing:
            return
        images = _images_of(batch)
        maps = {}
        for name, block in self._collector.blocks.items():
            query = getattr(block, "captured_query_attention", None)  # attention heads
            if block.captured_map is not None:
                maps[name] = block.captured_map[: self.num_images].detach().cpu()
            elif query is not None and images is not None:
                # a ViT's class token over its image's patches (None: no such layout)
                found = token_map(query[: self.num_images].cpu(), tuple(images.shape[-2:]))
                if found is not None:
                    maps[name] = found
        self._stop_capture()
        stage = self._stage(trainer)
        if not maps or not trainer.is_global_zero or not self._output.rich_writers:
            return
        if images is not None and images.shape[0] != next(iter(maps.values())).shape[0]:
            images = images[: self.num_images]
        grid = render_maps(images, maps, self.overlay_alpha)
        self._output.image(maps_tag(stage), grid, self._logging_step(trainer))

    def _stop_capture(self) -> None:
        if self._capturing:
            for block in self._collector.blocks.values():
                block.stop_capture(self)
        self._capturing = False

    def _eval_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase, self._eval_phase = self._eval_phase, None
        if phase is None:
            return
        stats = self._collector.finish(trainer, self._logging_step(trainer), phase)
        self._warn_contract(stats)
        self._output.scalars(ScalarBatch(*scalar_columns(stats, self.sections)), stats.step)

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
        try:  # the points finished before the end (or the exception), if they can be
            self.read_points()
        except Exception as err:  # never instead of the error being handled, nor the cleanup
            rank_zero_warn(f"{type(self).__name__}: the last training points could not be "
                           f"written ({type(err).__name__}: {err})")
        finally:
            self._point, self._eval_phase = None, None
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
        self.read_points()  # a checkpoint holds the state after every point before it
        return {
            "version": __version__,
            "reported": self._reporter.state_dict(),
            "num_points": self._num_points,
            "layout_dirs": list(self._layout_dirs),
            "run_id": self.run_id,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Before load_state_dict, which Lightning calls only if the checkpoint holds state
        # under this callback's key: the checkpoint decides the run, and an evaluation of it
        # is drawn at its step.
        self._checkpoint_step = LoggingSchedule.checkpoint_step(checkpoint)
        self.run_id = None
        self._checkpoint = str(trainer.ckpt_path)
        states = checkpoint.get("callbacks") or {}
        ours = {c.__qualname__ for c in (AttentionDiagnostics, *_subclasses(AttentionDiagnostics))}
        others = sorted(k for k in states if isinstance(k, str) and k.split("{")[0] in ours
                        and k != self.state_key)
        self._state_refused = "it holds no state of this callback" + (
            f" (only of {', '.join(others)}: include, exclude, sections and adapters must "
            "match to continue a run)" if others else
            " (it was written without it)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a run; a state this version cannot read is left out, and said
        (:class:`~lightning_attn.core.DiagnosticsStateWarning` when the run starts)."""
        try:
            reporter, num_points, layout_dirs, run_id = _read_state(state_dict)
        except (TypeError, ValueError) as err:
            self._state_refused = f"its {type(self).__name__} state is unreadable ({err})"
            return
        self._reporter.reported, self._reporter.active = reporter
        self._num_points, self._layout_dirs, self.run_id = num_points, layout_dirs, run_id
        self._state_refused = None

    def __getstate__(self) -> dict[str, Any]:
        # Configuration and history travel (ddp_spawn); modules, tensors and writers do not.
        self.read_points()  # the history complete: every finished point in it
        state = self.__dict__.copy()
        for key in ("_collector", "_output", "_module_ref", "_point", "_eval_phase",
                    "_capturing", "_checkpoint", "_state_refused", "_averaged",
                    "_checkpoint_step", "_eval_step"):
            state.pop(key, None)
        if "_last_measured" in state:  # the rules' readings hold functions: the problems
            state["_last_measured"] = self.last_problems
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- ddp_spawn: the run's state back to the main process ----------------------------
    def _spawn_state(self) -> dict[str, Any]:
        return {"state": self.state_dict(), "last_stats": self._last_stats,
                "last_problems": list(self.last_problems),
                "missing_warned": set(self._missing_warned)}

    def _restore_spawned(self, spawned: dict[str, Any]) -> None:
        self.load_state_dict(spawned["state"])
        self._last_stats, self._last_measured = spawned["last_stats"], spawned["last_problems"]
        self._missing_warned = spawned["missing_warned"]


#: What may differ between two callbacks that watch the same (their state_key aside).
_SETTINGS = ("thresholds", "on_problem", "log_every_n_steps", "num_images", "summary",
             "eval_statistics", "log_statistics", "writers")


def _alike(first: AttentionDiagnostics, second: AttentionDiagnostics) -> ValueError:
    name = type(first).__name__
    differ = [s for s in _SETTINGS if getattr(first, s) != getattr(second, s)]
    return ValueError(
        f"callbacks has two {name} that watch the same blocks and statistics "
        f"(sections={list(first.sections)}, include={first.include}, exclude="
        f"{list(first.exclude)}); a checkpoint could not tell their states apart. Tell them "
        "apart by what they watch: include=/exclude= (other blocks), sections= (other "
        "statistics) or adapters=; or keep one callback"
        + (f" (they differ only in {', '.join(differ)})" if differ else
           " (they are identical: one is enough)")
    )


def check_distinct(callbacks: Sequence[Callback]) -> None:
    """A ``ValueError`` with the hint how to tell them apart if two diagnostics callbacks of
    ``callbacks`` share a ``state_key`` (Lightning refuses such a pair when it builds the
    Trainer, with a generic message that points at this class's documentation)."""
    seen: dict[str, AttentionDiagnostics] = {}
    for cb in callbacks:
        if isinstance(cb, AttentionDiagnostics):
            first = seen.setdefault(cb.state_key, cb)
            if first is not cb:
                raise _alike(first, cb)


class _SpawnedState:
    """The run's state of every diagnostics callback of a ``ddp_spawn`` worker; unpickled in
    the main process, it hands each state to the callback it came from."""

    def __init__(self, states: dict[str, dict[str, Any]]) -> None:
        self.states = states

    def __reduce__(self) -> tuple:
        return (_receive_spawned, (self.states,))


def _receive_spawned(states: dict[str, dict[str, Any]]) -> None:
    for token, spawned in states.items():
        callback = _AWAITING.get(token)
        if callback is not None:
            callback._restore_spawned(spawned)


def _return_state_from_spawn(trainer: pl.Trainer, callback: AttentionDiagnostics) -> None:
    """Under ``ddp_spawn`` / ``ddp_fork`` the fit runs in worker processes, and the main
    process gets back what the launcher's ``get_extra_results`` returns (its documented
    hook for extra results). The worker's launcher adds the callbacks' state to it; when
    the main process reads it, :class:`_SpawnedState` restores each callback there."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        return
    callbacks = launcher.__dict__.get(_SPAWN_KEY)
    if callbacks is None:
        callbacks = launcher.__dict__[_SPAWN_KEY] = {}
        extra_results = launcher.get_extra_results

        def get_extra_results(trainer: pl.Trainer) -> dict[str, Any]:
            extra = extra_results(trainer)
            extra[_SPAWN_KEY] = _SpawnedState(
                {token: cb._spawn_state() for token, cb in callbacks.items()})
            return extra

        launcher.get_extra_results = get_extra_results
    callbacks[callback._token] = callback


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _adapter_key(adapter: AttentionAdapter) -> str:
    target = adapter.target
    name = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
    return f"{name}{sorted(adapter.masks)}" + (f"+{adapter.router}" if adapter.router else "")


def _read_state(state: Any) -> tuple[tuple[dict, set], int, list[str], str | None]:
    """The parts of a checkpointed state, checked: a ``ValueError`` naming the field that
    is not what this version (or an earlier release) wrote."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a {type(state).__name__}, not a mapping")
    reporter = ProblemReporter.read_state(state.get("reported", {}))
    num_points = state.get("num_points", 0)
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 0:
        raise ValueError(f"num_points is {num_points!r}, not a count")
    layout_dirs = state.get("layout_dirs", [])
    if not isinstance(layout_dirs, (list, tuple)) or not all(
            isinstance(d, str) for d in layout_dirs):
        raise ValueError(f"layout_dirs is {layout_dirs!r}, not a list of folders")
    run_id = state.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id is {run_id!r}, not a run's id")
    return reporter, num_points, list(layout_dirs), run_id
