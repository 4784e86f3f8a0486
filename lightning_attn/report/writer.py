"""``write_report``: LOGDIRs in, ``report.html``, ``report.md`` and the PNG figures out."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .curves import CURVE_POINTS
from .document import MetricSpec, Report, ReportTable, build_report
from .experiments import group_experiments
from .page import PAGE_BYTES, render_html, render_markdown
from .reading import ReportError, RunLog, RunSource, find_runs, read_runs
from .verdicts import StreamJudge

__all__ = ["ReportFiles", "load_runs", "write_report"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote, and the report itself."""

    html: Path
    markdown: Path
    figures: tuple[Path, ...]
    report: Report

    @property
    def notes(self) -> list[str]:
        """Everything the report had to say about its input (skipped files, ...)."""
        return [f"{run.name}: {note}" for run in self.report.runs for note in run.notes()]


def _named(logdirs: Sequence[PathLike] | Mapping[str, PathLike]) -> list[tuple[str | None, Path]]:
    if isinstance(logdirs, Mapping):
        return [(str(name), Path(path)) for name, path in logdirs.items()]
    if isinstance(logdirs, (str, os.PathLike)):
        logdirs = [logdirs]
    return [(None, Path(path)) for path in logdirs]


def load_runs(
    logdirs: Sequence[PathLike] | Mapping[str, PathLike], progress: bool = True,
    curve_points: int = CURVE_POINTS,
) -> list[RunLog]:
    """Read every run under ``logdirs`` (paths, or ``{name: path}`` to name the runs) and
    group each LOGDIR's runs by experiment (:mod:`.experiments`: a resumed run joined to its
    parent, evaluations attached to the training run they evaluated). A series of more than
    ``curve_points`` points is kept as an envelope (:mod:`.curves`).

    Raises:
        ReportError: a LOGDIR does not exist, holds no event file nor ``metrics.csv``, or
            nothing in it could be read.
        ValueError: ``curve_points`` is below 8.
    """
    if not isinstance(curve_points, int) or curve_points < 8:
        raise ValueError(f"curve_points must be an int of at least 8, got {curve_points!r}")
    per_logdir: list[list[RunSource]] = [find_runs(path, name) for name, path in _named(logdirs)]
    if not any(per_logdir):
        raise ReportError("no LOGDIR given")
    seen: dict[str, int] = {}
    for sources in per_logdir:
        for i, s in enumerate(sources):  # two LOGDIRs named alike (a/dsa, b/dsa) stay apart
            seen[s.name] = seen.get(s.name, 0) + 1
            if seen[s.name] > 1:
                sources[i] = RunSource(f"{s.name} ({seen[s.name]})", s.path, s.kind, s.files)
    read = read_runs([s for sources in per_logdir for s in sources], progress=progress,
                     limit=curve_points, watch=StreamJudge)
    for run in read:
        if not run.scalars and not run.images and not run.texts:
            detail = "; ".join(run.notes) or "its files hold no scalar"
            raise ReportError(f"nothing readable in {str(run.path)!r}: {detail}")
    runs, start = [], 0
    for sources in per_logdir:
        runs += group_experiments(read[start:start + len(sources)])
        start += len(sources)
    return runs


def write_report(
    logdirs: Sequence[PathLike] | Mapping[str, PathLike] | PathLike,
    output: PathLike,
    metrics: Sequence[str | MetricSpec] = (),
    title: str | None = None,
    tables: Sequence[ReportTable] = (),
    progress: bool = True,
    page_limit: int = PAGE_BYTES,
    curve_points: int = CURVE_POINTS,
) -> ReportFiles:
    """Read runs, judge them and write the report.

    Args:
        logdirs: a run's directory (or several, or ``{name: directory}``): each directory
            under it that holds TensorBoard event files is a run (else each that holds
            CSVLogger's ``metrics.csv``).
        output: folder for ``report.html`` (self-contained), ``report.md`` and the PNGs;
            created if missing, files of the same names overwritten.
        metrics: scalars to sum up per run (final and best value), e.g. ``"val/acc"``;
            ``"name:min"`` / ``"name:max"`` say which way is better.
        title: page title (default: the run names).
        tables: extra tables for the summary (e.g. a benchmark's results).
        progress: ``rich`` progress bars while reading and drawing.
        page_limit: the most bytes of ``report.html`` (figures shrunk, then linked, to stay
            under it; see :mod:`.page`).
        curve_points: the most points kept per series (an envelope beyond, see
            :mod:`.curves`).

    Returns:
        The paths written and the :class:`Report`.

    Raises:
        ReportError: bad input (missing LOGDIR, no event file, no ``attn/`` tag, unknown
            metric, ``output`` is a file).
        ValueError: ``page_limit`` is below 100 kB or ``curve_points`` below 8.

    Example::

        from lightning_attn.report import write_report
        files = write_report({"baseline": "runs/baseline", "DSA": "runs/dsa"}, "report",
                             metrics=["val/acc"])
        print(files.html)
    """
    if not isinstance(page_limit, int) or page_limit < 100_000:
        raise ValueError(f"page_limit must be an int of at least 100000 bytes, got "
                         f"{page_limit!r}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--output {str(out)!r} is a file, not a folder")
    runs = load_runs(logdirs, progress=progress, curve_points=curve_points)
    report = build_report(runs, metrics, title, tables, progress=progress)
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = []
        for fig in report.figures():
            path = out / fig.filename
            path.write_bytes(fig.png)
            figures.append(path)
        html_path = out / "report.html"
        html_path.write_text(render_html(report, page_limit), encoding="utf-8",
                             errors="backslashreplace")
        md_path = out / "report.md"
        md_path.write_text(render_markdown(report), encoding="utf-8", errors="backslashreplace")
    except OSError as err:
        raise ReportError(f"cannot write the report to {str(out)!r}: {err}") from err
    return ReportFiles(html_path, md_path, tuple(figures), report)
