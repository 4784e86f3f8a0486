"""Reading runs: TensorBoard event files (or CSVLogger's ``metrics.csv``) -> :class:`RunLog`.

A *run* is a directory that directly holds event files, as in TensorBoard (``--logdir``
shows one run per such directory); a LOGDIR may hold several (``runs/dsa/version_0``,
``runs/dsa/version_1``). The files of a run are read in name order (their names start with
the creation time) into one tensorboard ``EventAccumulator``, so restarts are handled as
TensorBoard handles them. A LOGDIR with no event file anywhere falls back to the
``metrics.csv`` files of CSVLogger (scalars only).

Event files are read once, through tensorboard's own record reader and ``EventAccumulator``,
with a ``rich`` progress bar over their bytes (the reader checks a CRC per record in pure
Python: about 3 MB/s). A file that cannot be opened, or whose records stop before its end
(a truncated or corrupt file), is named in :attr:`RunLog.notes`; the records before the
damage are kept, as TensorBoard keeps them.

A folder may hold several runs: two writers at once (two event files), or one logger reused
by a sweep or by ``trainer.validate`` before ``fit`` (one file). Each run starts with its
``attn/config`` record, which carries its ``run_id``; every event belongs to the run whose
record came last before it in its file (the events before a file's first record, to that
record's run). A folder with more than one ``run_id`` keeps them apart in
:attr:`RunLog.parts`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from ..core.tags import CONFIG_TAG, EVALUATION_TAG, is_attention_tag

__all__ = [
    "ImageRecord",
    "ReportError",
    "RunLog",
    "RunSource",
    "Series",
    "find_runs",
    "read_runs",
]

#: ``size_guidance`` of the accumulator: 0 keeps every event (histograms are not shown).
SIZE_GUIDANCE = {
    "scalars": 0, "images": 0, "tensors": 0, "histograms": 1, "compressedHistograms": 1,
    "audio": 1,
}
_RECORD_FRAMING = 16  # TFRecord: 8-byte length, 4-byte length CRC, data, 4-byte data CRC
CSV_NAME = "metrics.csv"
_VERSION_DIR = re.compile(r"version_\d+")


class ReportError(Exception):
    """A problem with the report's input, shown as one line (no traceback) by the command."""


@dataclass
class Series:
    """One scalar tag over the steps: ``steps`` ascending, one value per step."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float:
        return self.values[-1]


@dataclass(frozen=True)
class ImageRecord:
    """One image event: its step and its encoded bytes (PNG as written by TensorBoard)."""

    step: int
    encoded: bytes
    width: int
    height: int


@dataclass(frozen=True)
class RunSource:
    """Where a run's data is: a directory with event files, or a ``metrics.csv``."""

    name: str
    path: Path
    kind: str  # "tensorboard" or "csv"
    files: tuple[Path, ...]
    notes: tuple[str, ...] = ()  # what was skipped while finding it

    @property
    def size(self) -> int:
        total = 0
        for f in self.files:
            try:
                total += f.stat().st_size
            except OSError:
                pass
        return total


@dataclass
class RunLog:
    """Everything read from one run.

    Attributes:
        name: label of the run on the page.
        path: its directory (or file).
        kind: ``"tensorboard"`` or ``"csv"``.
        scalars: tag -> :class:`Series`, in the order the tags first appeared.
        images: tag -> image events in step order.
        texts: tag -> ``(step, text)`` in step order (``add_text``'s ``/text_summary``
            suffix removed).
        notes: what went wrong while reading (skipped or damaged files), one line each.
        parts: the runs of a folder that holds several ``run_id`` s (each a
            :class:`RunLog` of its own); empty when it holds one.
    """

    name: str
    path: Path
    kind: str
    scalars: dict[str, Series] = field(default_factory=dict)
    images: dict[str, list[ImageRecord]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parts: list[RunLog] = field(default_factory=list)


def merge_logs(name: str, logs: Sequence[RunLog], notes: Sequence[str] = ()) -> RunLog:
    """One run from several, in order: a later run's value wins on a shared step."""
    first = logs[0]
    out = RunLog(name, first.path, first.kind, notes=list(notes))
    for log in logs:
        for tag, series in log.scalars.items():
            merged = dict(zip(out.scalars[tag].steps, out.scalars[tag].values, strict=True)
                          ) if tag in out.scalars else {}
            merged.update(zip(series.steps, series.values, strict=True))
            steps = sorted(merged)
            out.scalars[tag] = Series(steps, [merged[s] for s in steps])
        for tag, images in log.images.items():
            out.images[tag] = sorted(out.images.get(tag, []) + images, key=lambda r: r.step)
        for tag, texts in log.texts.items():
            out.texts[tag] = sorted(out.texts.get(tag, []) + texts, key=lambda t: t[0])
        out.notes += [n for n in log.notes if n not in out.notes]
    return out


def _is_event_file(name: str) -> bool:
    return "tfevents" in name  # tensorboard's own test (io_wrapper.IsSummaryEventsFile)


def _regular(path: Path, skipped: list[tuple[Path, str]]) -> bool:
    """Whether ``path`` is a regular file; a FIFO, socket or device named like a log would
    block or never end when read, so it is skipped and named."""
    try:
        mode = os.stat(path).st_mode  # never blocks, even on a FIFO
    except OSError as err:
        skipped.append((path, f"skipped {str(path)!r}: {err.strerror or err}"))
        return False
    if not stat.S_ISREG(mode):
        skipped.append((path, f"skipped {str(path)!r}: not a regular file (a FIFO, socket or "
                              "device)"))
        return False
    return True


def _base_name(logdir: Path) -> str:
    path = logdir if logdir.is_dir() else logdir.parent
    name = path.resolve().name or str(path)
    if _VERSION_DIR.fullmatch(name) and path.resolve().parent.name:
        return f"{path.resolve().parent.name}/{name}"
    return name


def find_runs(logdir: str | os.PathLike, name: str | None = None) -> list[RunSource]:
    """The runs under ``logdir`` (a directory, an event file or a ``metrics.csv``).

    Every directory holding event files is one run; with no event file anywhere under
    ``logdir``, every directory holding a ``metrics.csv`` is one. Runs are named
    ``name`` (default: the directory's name, with its parent for ``version_N``), followed by
    their path below ``logdir`` when there are several.

    Raises:
        ReportError: ``logdir`` does not exist, or holds neither event files nor a CSV.
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"LOGDIR {str(root)!r} does not exist")
    base = name or _base_name(root)
    skipped: list[tuple[Path, str]] = []
    if root.exists() and not root.is_dir() and not _regular(root, skipped):
        raise ReportError(skipped[0][1].replace("skipped", "LOGDIR", 1))
    if root.is_file():
        if _is_event_file(root.name):
            return [RunSource(base, root, "tensorboard", (root,))]
        if root.name.endswith(".csv"):
            return [RunSource(base, root, "csv", (root,))]
        raise ReportError(
            f"LOGDIR {str(root)!r} is a file but neither an event file "
            f"(events.out.tfevents.*) nor a {CSV_NAME}"
        )
    events: dict[Path, list[Path]] = {}
    tables: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        found = sorted(here / f for f in filenames
                       if _is_event_file(f) and _regular(here / f, skipped))
        if found:
            events[here] = found
        if CSV_NAME in filenames and _regular(here / CSV_NAME, skipped):
            tables[here] = here / CSV_NAME
    if events:
        kind, dirs = "tensorboard", {d: tuple(fs) for d, fs in events.items()}
    elif tables:
        kind, dirs = "csv", {d: (f,) for d, f in tables.items()}
    else:
        raise ReportError(
            f"LOGDIR {str(root)!r} holds no TensorBoard event files (events.out.tfevents.*) "
            f"and no {CSV_NAME}: point it at a logger's directory (e.g. runs/dsa/version_0)"
            + (f" ({'; '.join(text for _, text in skipped)})" if skipped else "")
        )
    runs = []
    for d in sorted(dirs):
        rel = d.relative_to(root).as_posix()
        label = base if len(dirs) == 1 or rel == "." else f"{base}/{rel}"
        runs.append(RunSource(label, d, kind, dirs[d]))
    # Each skipped file is named in the run of its own or nearest enclosing directory.
    for path, text in skipped:
        owner = max((r for r in runs if path.parent.is_relative_to(r.path)),
                    key=lambda r: len(r.path.parts), default=runs[0])
        runs[runs.index(owner)] = dataclasses.replace(owner, notes=owner.notes + (text,))
    return runs


# -- event files -------------------------------------------------------------------------------
class _EventRecords:
    """The events of several files in order, for an ``EventAccumulator`` (its ``Load()``).

    Advances ``advance(bytes)`` after each record and notes each file that cannot be opened
    or whose records end before the file does.
    """

    def __init__(self, files: Sequence[Path], advance: Callable[[int], None], notes: list[str]):
        self.files = files
        self.advance = advance
        self.notes = notes
        self.used = False
        self.current = 0  # index of the file being read

    def Load(self) -> Iterator:  # noqa: N802 - the accumulator's loader protocol
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2

        self.used = True
        for index, path in enumerate(self.files):
            self.current = index
            try:
                size = path.stat().st_size
            except OSError as err:
                self.notes.append(f"skipped unreadable event file {str(path)!r} ({err})")
                continue
            done = 0
            events = 0
            try:
                for record in RawEventFileLoader(str(path)).Load():
                    event = event_pb2.Event.FromString(record)
                    done += len(record) + _RECORD_FRAMING
                    events += 1
                    self.advance(len(record) + _RECORD_FRAMING)
                    yield event
            except Exception as err:  # any reader or decode failure: name the file, go on
                detail = f"{type(err).__name__}: {err}"
            else:
                detail = "truncated or corrupt record"
            if done < size:
                self.advance(size - done)
                if events == 0:
                    self.notes.append(
                        f"skipped unreadable event file {str(path)!r} ({detail})"
                    )
                else:
                    self.notes.append(
                        f"event file {str(path)!r} is damaged at byte {done} of {size} "
                        f"({detail}); kept the {events} events before it"
                    )


def _strip_text_suffix(tag: str) -> str:
    return tag[: -len("/text_summary")] if tag.endswith("/text_summary") else tag


#: The tags of the records that name their run (the configuration of a fit or evaluation,
#: and each evaluation call's record), as TensorBoard's text plugin writes them.
_RUN_TEXTS = (f"{CONFIG_TAG}/text_summary", f"{EVALUATION_TAG}/text_summary")


def _run_id_of(event) -> str | None:
    """The ``run_id`` of an ``attn/config`` or ``attn/evaluation`` record, else ``None``."""
    for value in event.summary.value:
        if value.tag not in _RUN_TEXTS or not value.tensor.string_val:
            continue
        try:
            doc = json.loads(value.tensor.string_val[0].decode("utf-8", "replace"))
        except ValueError:
            return None
        run_id = doc.get("run_id") if isinstance(doc, dict) else None
        return run_id if isinstance(run_id, str) and run_id else None
    return None


def _read_events(source: RunSource, advance: Callable[[int], None]) -> RunLog:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunLog(source.name, source.path, source.kind, notes=list(source.notes))
    directory = source.path if source.path.is_dir() else source.path.parent
    records = _EventRecords(source.files, advance, run.notes)
    # Our loader instead of the accumulator's own: the same files and reader, plus progress,
    # a note for each damaged file, and one accumulator per (file, run_id). Should a
    # tensorboard release rename the accumulator's event method, one accumulator reads the
    # directory itself (same data, one run, no progress).
    accumulators: dict[tuple[int, str | None], EventAccumulator] = {}
    if hasattr(EventAccumulator, "_ProcessEvent"):
        current: dict[int, str | None] = {}
        for event in records.Load():
            found = _run_id_of(event) if event.HasField("summary") else None
            if found is not None:
                current[records.current] = found
            key = (records.current, current.get(records.current))
            if key not in accumulators:
                accumulators[key] = EventAccumulator(str(directory),
                                                     size_guidance=SIZE_GUIDANCE)
            accumulators[key]._ProcessEvent(event)
    else:
        acc = accumulators[(0, None)] = EventAccumulator(str(directory),
                                                         size_guidance=SIZE_GUIDANCE)
        acc.Reload()
    if not records.used:
        advance(source.size)
    return _runs_apart(run, {key: _log_of(acc, run.name, source)
                             for key, acc in accumulators.items()})


def _runs_apart(run: RunLog, logs: dict[tuple[int, str | None], RunLog]) -> RunLog:
    """The folder's run from its (file, run_id) pieces: all of them merged, in order, and
    each run apart in ``parts`` when there are several run_ids."""
    by_run: dict[str | None, list[RunLog]] = {}
    files_of: dict[str | None, set[int]] = {}
    for (index, run_id), log in logs.items():
        if run_id is None:  # the file's events before its first record: that record's run
            run_id = next((r for i, r in logs if i == index and r is not None), None)
        by_run.setdefault(run_id, []).append(log)
        files_of.setdefault(run_id, set()).add(index)
    # A piece without diagnostics (a user's own SummaryWriter, or the configuration alone
    # of an earlier release's second callback) is no run: it joins its neighbour.
    order = list(by_run)
    empty = [r for r in order if not any(is_attention_tag(tag) for log in by_run[r]
                                         for tag in (*log.scalars, *log.images))]
    if len(empty) < len(order):
        for r in empty:
            i = order.index(r)
            into = next(o for o in order[i + 1:] + order[:i][::-1] if o not in empty)
            piece = by_run.pop(r)  # kept in event order: before a later run, after an earlier
            by_run[into] = piece + by_run[into] if order.index(into) > i else by_run[into] + piece
            files_of[into] |= files_of.pop(r)
    merged = merge_logs(run.name, list(logs.values()) or [run], run.notes)
    if len(by_run) > 1:
        files = len(set().union(*files_of.values()))
        listed = ", ".join(r if r is not None else "a writer without attn/config"
                           for r in by_run)
        note = (f"this folder holds {len(by_run)} runs ({listed}; written to {files} event "
                f"file{'s' if files > 1 else ''}): shown apart")
        merged.parts = [
            merge_logs(f"{run.name} [run {r[:8] if r else 'without id'}]", parts,
                       [*run.notes, note])
            for r, parts in by_run.items()
        ]
    return merged


def _log_of(acc, name: str, source: RunSource) -> RunLog:
    """What one accumulator holds, as a :class:`RunLog`."""
    from tensorboard.util import tensor_util

    run = RunLog(name, source.path, source.kind)
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        points: dict[int, float] = {}
        for e in acc.Scalars(tag):
            points[int(e.step)] = float(e.value)  # a repeated step: the later value wins
        steps = sorted(points)
        run.scalars[tag] = Series(steps, [points[s] for s in steps])
    for tag in tags.get("images", []):
        run.images[tag] = sorted(
            (
                ImageRecord(int(e.step), bytes(e.encoded_image_string), e.width, e.height)
                for e in acc.Images(tag)
            ),
            key=lambda r: r.step,
        )
    for tag in tags.get("tensors", []):
        try:
            plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        except (KeyError, AttributeError):
            plugin = ""
        if plugin != "text":
            continue
        texts = []
        for e in acc.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            for item in array.reshape(-1).tolist():
                texts.append(
                    (int(e.step), item.decode("utf-8", "replace") if isinstance(item, bytes)
                     else str(item))
                )
        run.texts[_strip_text_suffix(tag)] = sorted(texts, key=lambda t: t[0])
    return run


# -- CSV -------------------------------------------------------------------------------------
def _counted_lines(handle, advance: Callable[[int], None]) -> Iterator[str]:
    for line in handle:
        advance(len(line.encode("utf-8")))
        yield line


def _read_csv(source: RunSource, advance: Callable[[int], None]) -> RunLog:
    run = RunLog(source.name, source.path, source.kind, notes=list(source.notes))
    (path,) = source.files
    columns: dict[str, dict[int, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(_counted_lines(handle, advance))
            if reader.fieldnames is None or "step" not in reader.fieldnames:
                run.notes.append(f"skipped {str(path)!r}: no 'step' column (not CSVLogger's)")
                return run
            for row in reader:
                try:
                    step = int(float(row["step"]))
                except (TypeError, ValueError):
                    continue
                for tag, text in row.items():
                    if tag in (None, "step", "epoch") or text in (None, ""):
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        continue
                    columns.setdefault(tag, {})[step] = value
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        run.notes.append(f"skipped unreadable {str(path)!r} ({type(err).__name__}: {err})")
        return run
    for tag in sorted(columns, key=natural_key):
        points = columns[tag]
        steps = sorted(points)
        run.scalars[tag] = Series(steps, [points[s] for s in steps])
    return run


def natural_key(text: str) -> tuple:
    """Sort key that puts ``stages.2`` before ``stages.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


# -- all runs --------------------------------------------------------------------------------
def progress_bar(enabled: bool, *columns: ProgressColumn) -> Progress:
    """A transient ``rich`` bar on stderr, only on a terminal (no blank lines in CI logs)."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True,
                    disable=not (enabled and console.is_terminal))


def read_runs(sources: Iterable[RunSource], progress: bool = True) -> list[RunLog]:
    """Read every run, with one ``rich`` progress bar over all their bytes."""
    sources = list(sources)
    total = sum(s.size for s in sources)
    bar = progress_bar(
        progress, TextColumn("[progress.description]{task.description}"), BarColumn(),
        DownloadColumn(), TimeRemainingColumn(),
    )
    runs = []
    with bar:
        task = bar.add_task("reading logs", total=max(total, 1))
        for source in sources:
            bar.update(task, description=f"reading {source.name}")

            def advance(n: int) -> None:
                bar.advance(task, n)

            read = _read_events if source.kind == "tensorboard" else _read_csv
            runs.append(read(source, advance))
    return runs
