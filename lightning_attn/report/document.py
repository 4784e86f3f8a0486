"""What a report holds: runs read and judged, figures drawn, metrics summed up.

:func:`build_report` turns :class:`~.reading.RunLog` objects into a :class:`Report`; the
page writers (:mod:`.page`) only lay it out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)

from ..core.tags import HEADS_MAP_TAG, is_attention_tag
from .experiments import step_unknown
from .figures import COMPARISONS, block_figure, comparison_figure, metrics_figure
from .images import shown_image
from .reading import ImageRecord, ReportError, RunLog, Series, progress_bar
from .series import RunTags, parse_tags
from .verdicts import RunHealth, judge_run

__all__ = [
    "CALLBACK_HINT",
    "FigureFile",
    "MetricSpec",
    "MetricSummary",
    "Report",
    "ReportTable",
    "RunReport",
    "build_report",
]

CALLBACK_HINT = (
    "add AttentionDiagnostics from lightning_attn.callbacks to the Trainer's callbacks "
    "(Trainer(callbacks=[AttentionDiagnostics()]) or `lightning-attn fit`, which adds it)"
)
_LOWER_IS_BETTER = re.compile(r"loss|err|nll|perplexity|mse|mae|rmse|time", re.I)


@dataclass(frozen=True)
class FigureFile:
    """A PNG of the report: its file name in the output folder, a title and the bytes."""

    filename: str
    title: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class MetricSpec:
    """A scalar to sum up: ``"val/acc"`` (best = highest), ``"val/loss"`` (best = lowest:
    names with loss, err, nll, ...), or an explicit ``"name:max"`` / ``"name:min"``."""

    name: str
    mode: str

    @classmethod
    def parse(cls, text: str) -> MetricSpec:
        name, sep, mode = text.rpartition(":")
        if sep and mode in ("min", "max") and name:
            return cls(name, mode)
        if not text:
            raise ReportError("--metric must be a scalar tag such as val/acc, got ''")
        return cls(text, "min" if _LOWER_IS_BETTER.search(text) else "max")


@dataclass(frozen=True)
class MetricSummary:
    """Final and best value of one metric in one run (``None``: the run does not log it)."""

    final: float | None = None
    final_step: int | None = None
    best: float | None = None
    best_step: int | None = None

    @classmethod
    def of(cls, series: Series | None, mode: str) -> MetricSummary:
        """From every point of ``series``, also one kept as an envelope (its extremes are
        exact); the earliest step of the best value on a tie."""
        if series is None or not len(series):
            return cls()
        best = series.extreme(mode)
        if best is None:
            return cls(series.last, series.last_step)
        return cls(series.last, series.last_step, *best)


@dataclass(frozen=True)
class ReportTable:
    """An extra table on the page (e.g. a benchmark's result): cells are plain text."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    note: str = ""


@dataclass
class RunReport:
    """One run on the page."""

    log: RunLog
    tags: RunTags
    health: RunHealth
    block_figures: dict[str, FigureFile] = field(default_factory=dict)
    attention_map: FigureFile | None = None
    heads_map: FigureFile | None = None  # the last layer x head heatmaps of its heads
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    drawing_notes: list[str] = field(default_factory=list)  # what could not be drawn

    @property
    def name(self) -> str:
        return self.log.name

    @property
    def has_attention(self) -> bool:
        return bool(self.tags.blocks)

    @property
    def steps(self) -> tuple[int, int] | None:
        logged = [s for s in self.log.scalars.values() if len(s)]
        if not logged:
            return None
        return min(s.first_step for s in logged), max(s.last_step for s in logged)

    def notes(self) -> list[str]:
        return (list(self.log.notes) + list(self.tags.notes) + list(self.health.notes)
                + list(self.drawing_notes))

    @property
    def absence(self) -> str:
        """What the page says about a run without attention statistics."""
        if self.has_attention:
            return ""
        return (
            "No attention statistics in this run (no attn/ tags): a model without attention "
            f"blocks, such as a baseline; otherwise {CALLBACK_HINT}."
        )


@dataclass
class Report:
    """Everything on the page."""

    title: str
    generated: str
    runs: list[RunReport]
    metrics: list[MetricSpec]
    metrics_figure: FigureFile | None = None
    comparisons: list[FigureFile] = field(default_factory=list)
    #: runs left out of the comparisons: no training statistics (e.g. a baseline)
    not_compared: list[str] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)

    def figures(self) -> list[FigureFile]:
        """Every figure, in page order."""
        out = [f for f in (self.metrics_figure,) if f is not None] + list(self.comparisons)
        for run in self.runs:
            out += [f for f in (run.attention_map, run.heads_map) if f is not None]
            out += list(run.block_figures.values())
        return out


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


class _Names:
    """Unique file names."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        base = "--".join(slug(p) for p in parts)
        name, i = f"{base}.png", 2
        while name in self.used:
            name, i = f"{base}-{i}.png", i + 1
        self.used.add(name)
        return name


_HEADS_CAPTION = (
    "attn/heads_map at step {}: one row per attention module, in module order, one column "
    "per head; left, each head's normalised entropy (0: one key per query, 1: uniform), right, "
    "its max logit; grey: no such head.")


def _shown(run: RunReport, image: ImageRecord, tag: str, filename: str, what: str,
           caption: str) -> FigureFile | None:
    """The figure of a logged image, or ``None`` with a drawing note saying why not."""
    png, why = shown_image(image)
    if png is None:
        run.drawing_notes.append(f"{tag} at step {image.step} not shown: {why}")
        return None
    return FigureFile(filename, f"{run.name}: {what}", png, caption)


def _map_caption(tags: RunTags, tag: str, step: int) -> str:
    blocks = tags.block_names()
    order = ", ".join(blocks) if blocks else "one per block"
    return (
        f"{tag} at step {step}: one row per image; column 0 is the input, then each block's "
        f"mask over it, in module order ({order})."
    )


def build_report(
    logs: Sequence[RunLog],
    metrics: Sequence[str | MetricSpec] = (),
    title: str | None = None,
    tables: Sequence[ReportTable] = (),
    progress: bool = True,
) -> Report:
    """Judge every run and draw every figure.

    Raises:
        ReportError: no run has any ``attn/`` tag, or a metric is logged by no run.
    """
    specs = [m if isinstance(m, MetricSpec) else MetricSpec.parse(m) for m in metrics]
    runs = []
    bar = progress_bar(progress, TextColumn("[progress.description]{task.description}"),
                       BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with bar:
        # runs kept as envelopes are read again (the verdicts read every point)
        task = bar.add_task("judging", total=max(sum(
            stream.size for log in logs if not log.exact for stream in log.streams), 1))
        for log in logs:
            bar.update(task, description=f"judging {log.name}")
            tags = parse_tags(log)
            runs.append(RunReport(log, tags, judge_run(
                log, tags, lambda n: bar.advance(task, n))))
    if not any(run.has_attention for run in runs):
        names = ", ".join(repr(str(r.log.path)) for r in runs)
        raise ReportError(f"no attn/ tags in {names}: {CALLBACK_HINT}")
    for spec in specs:
        if not any(spec.name in run.log.scalars for run in runs):
            known = sorted({t for r in runs for t in r.log.scalars if not is_attention_tag(t)})
            raise ReportError(
                f"--metric {spec.name!r} is logged by no run; scalars logged: "
                f"{', '.join(known) if known else 'none besides attn/ tags'}"
            )
    for run in runs:
        run.metrics = {s.name: MetricSummary.of(run.log.scalars.get(s.name), s.mode)
                       for s in specs}

    names = _Names()
    report = Report(
        title=title or _default_title(runs),
        generated=datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        runs=runs,
        metrics=specs,
        tables=list(tables),
    )
    total = sum(len(r.tags.block_names()) for r in runs) + len(COMPARISONS) + 1
    bar = progress_bar(progress, TextColumn("{task.description}"), BarColumn(),
                       MofNCompleteColumn())
    with bar:
        task = bar.add_task("drawing figures", total=total)
        if specs:
            png = metrics_figure(
                [s.name for s in specs], [(r.name, r.log.scalars) for r in runs],
                unplaced={r.name for r in runs if step_unknown(r.log)},
            )
            if png is not None:
                report.metrics_figure = FigureFile(names("metrics"), "metrics", png)
        bar.advance(task)
        compared = [r for r in runs if r.tags.train]
        report.not_compared = [r.name for r in runs if not r.tags.train]
        if len(compared) > 1:
            columns = [(r.name, r.tags.train, r.health.thresholds) for r in compared]
            for comparison in COMPARISONS:
                png = comparison_figure(comparison, columns)
                if png is not None:
                    report.comparisons.append(
                        FigureFile(names("compare", comparison.title), comparison.title, png)
                    )
                bar.advance(task)
        else:
            bar.advance(task, len(COMPARISONS))
        for run in runs:
            found = run.tags.last_map()
            if found is not None:
                tag, image = found
                run.attention_map = _shown(run, image, tag, names(run.name, "attention-maps"),
                                           "attention maps", _map_caption(run.tags, tag,
                                                                          image.step))
            if run.tags.heads_maps:
                image = run.tags.heads_maps[-1]
                run.heads_map = _shown(run, image, HEADS_MAP_TAG, names(run.name, "heads"),
                                       "attention heads", _HEADS_CAPTION.format(image.step))
            for block in run.tags.block_names():
                stages = {s: b[block] for s, b in run.tags.blocks.items() if block in b}
                png = block_figure(
                    f"{run.name} · {block}" if len(runs) > 1 else block, stages,
                    run.health.thresholds, run.health.block_warnings(block),
                    lambda k, b=block, t=run.tags: t.branch_label(b, k),
                    run.tags.infos().get(block), step_unknown=step_unknown(run.log),
                )
                if png is not None:
                    run.block_figures[block] = FigureFile(names(run.name, block), block, png)
                bar.advance(task)
    return report


def _default_title(runs: Sequence[RunReport]) -> str:
    if len(runs) == 1:
        return f"Attention report: {runs[0].name}"
    return "Attention report: " + " vs ".join(r.name for r in runs)
