"""Reading runs: TensorBoard event files (or CSVLogger's ``metrics.csv``) -> :class:`RunLog`.

A *run* is a directory that directly holds event files, as in TensorBoard (``--logdir``
shows one run per such directory); a LOGDIR may hold several (``runs/dsa/version_0``,
``runs/dsa/version_1``). The files of a run are read in name order (their names start with
the creation time) as one stream, as TensorBoard reads them. A LOGDIR with no event file
anywhere falls back to the ``metrics.csv`` files of CSVLogger (scalars only).

Reading streams: records are read by chunks (:mod:`.records`: every CRC checked, with numpy),
decoded one at a time, and each scalar goes into its tag's :class:`~.curves.Series`, which
keeps at most :data:`~.curves.CURVE_POINTS` points (an envelope beyond): memory is bounded
by what the page shows, not by the length of the run. Images are kept as references to
their bytes in the file (:class:`~.records.FileSlice`), read only when drawn. The verdicts
need every point: :func:`replay` reads a run's scalars again, point by point, in step order
(:mod:`.verdicts`). A ``rich`` progress bar runs over the bytes.

A file that cannot be opened, or whose records stop before its end (a truncated or corrupt
file), is named in :attr:`RunLog.notes`; the records before the damage are kept, as
TensorBoard keeps them.

A folder may hold several runs: two writers at once (two event files), or one logger reused
by a sweep or by ``trainer.validate`` before ``fit`` (one file). Each run starts with its
``attn/config`` record (each evaluation call also writes an ``attn/evaluation`` record), which
carries its ``run_id``; every event belongs to the run whose record came last before it in
its file (the events before a file's first record, to that record's run). Each such piece
is read into its own series (and judged while read), with the byte ranges it came from for
:func:`replay`; a folder with more than one ``run_id`` keeps them apart in
:attr:`RunLog.parts`.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import os
import re
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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
from .curves import CURVE_POINTS, FLUSH_POINTS, Series, SeriesBuilder
from .records import RECORD_HEADER, FileSlice, RecordReader, big_event_summary

__all__ = [
    "ImageRecord",
    "LogStream",
    "ReportError",
    "RunLog",
    "RunSource",
    "Series",
    "find_runs",
    "merge_logs",
    "read_runs",
    "replay",
]

CSV_NAME = "metrics.csv"
_VERSION_DIR = re.compile(r"version_\d+")
#: Points buffered over all tags before they are folded into their series.
_PENDING_POINTS = 8 * FLUSH_POINTS


class ReportError(Exception):
    """A problem with the report's input, shown as one line (no traceback) by the command."""


@dataclass(frozen=True)
class ImageRecord:
    """One image event: its step, size and encoded bytes (PNG as written by TensorBoard),
    kept in the event file (``data``, a :class:`~.records.FileSlice`) until drawn."""

    step: int
    width: int
    height: int
    data: FileSlice | bytes

    @property
    def encoded(self) -> bytes:
        return self.data if isinstance(self.data, bytes) else self.data.read()

    @property
    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.length

    def open(self):
        """A binary file object over the encoded bytes (a decoder reads as it goes)."""
        import io

        return io.BytesIO(self.data) if isinstance(self.data, bytes) else self.data.open()


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


@dataclass(frozen=True)
class LogStream:
    """What one run was read from: ``(path, start, end)`` byte ranges of its files, in
    order (a run sharing a file with another holds only its own ranges), whether its
    scalars came in step order (:func:`replay` reads them again), and its first and last
    steps (the smallest and largest).

    In step order means: the diagnostics' scalars in step order, and the others in step
    order. The diagnostics write a batch of training points together, a few dozen steps
    after the first (``AttentionDiagnostics`` reads its points in batches), so they may
    come after the module's own scalars of later steps."""

    kind: str
    files: tuple[tuple[Path, int, int], ...]
    ordered: bool = True
    first_step: int | None = None
    last_step: int | None = None

    @property
    def size(self) -> int:
        return sum(end - start for _, start, end in self.files)


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
        streams: what was read, for :func:`replay` (several for runs joined into one).
        watched: what a :class:`PointWatcher` made of the run while it was read.
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
    streams: list[LogStream] = field(default_factory=list)
    #: what a :class:`PointWatcher` made of the points while they were read (its ``finish``)
    watched: Any = None
    parts: list[RunLog] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether every series holds every point (else :func:`replay` gives them)."""
        return all(s.exact for s in self.scalars.values())

    @property
    def has_diagnostics(self) -> bool:
        """Whether it holds any of the diagnostics' scalars or images."""
        return any(is_attention_tag(tag) for tag in (*self.scalars, *self.images))


def merge_logs(name: str, logs: Sequence[RunLog], notes: Sequence[str] = ()) -> RunLog:
    """One run from several, in order: a later run's value wins on a shared step. What one of
    them made of its points while read (``watched``) stays when the others hold no
    diagnostics (an hparams event before a run's configuration); else the run is judged
    again from its streams."""
    first = logs[0]
    out = RunLog(name, first.path, first.kind, notes=list(notes))
    for log in logs:
        for tag, series in log.scalars.items():
            out.scalars[tag] = out.scalars[tag].joined(series) if tag in out.scalars else series
        out.streams += log.streams
        for tag, images in log.images.items():
            out.images[tag] = sorted(out.images.get(tag, []) + images, key=lambda r: r.step)
        for tag, texts in log.texts.items():
            out.texts[tag] = sorted(out.texts.get(tag, []) + texts, key=lambda t: t[0])
        out.notes += [n for n in log.notes if n not in out.notes]
    judged = [log for log in logs if log.has_diagnostics]
    if len(judged) == 1 and len(logs) > 1:
        out.streams = [_joined_stream([log.streams for log in logs])]
    out.watched = judged[0].watched if len(judged) == 1 and len(out.streams) == 1 else None
    return out


def _joined_stream(streams: Sequence[Sequence[LogStream]]) -> LogStream:
    """One stream of the ranges of several pieces in read order (adjacent ranges of a file
    joined); in step order when each was and each piece's steps follow the previous one's."""
    flat = [s for group in streams for s in group]
    ranges: list[tuple[Path, int, int]] = []
    for path, start, end in (r for s in flat for r in s.files):
        if ranges and ranges[-1][0] == path and ranges[-1][2] == start:
            ranges[-1] = (path, ranges[-1][1], end)
        else:
            ranges.append((path, start, end))
    ordered = all(s.ordered for s in flat) and all(
        a.last_step is None or b.first_step is None or a.last_step <= b.first_step
        for a, b in zip(flat, flat[1:], strict=False))
    return LogStream(flat[0].kind, tuple(ranges), ordered)


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
def _strip_text_suffix(tag: str) -> str:
    return tag[: -len("/text_summary")] if tag.endswith("/text_summary") else tag


def _damage_note(path: Path, reader: RecordReader, events: int, detail: str) -> str:
    if events == 0:
        return f"skipped unreadable event file {str(path)!r} ({detail})"
    return (f"event file {str(path)!r} is damaged at byte {reader.done} of {reader.size} "
            f"({detail}); kept the {events} events before it")


def _texts(tensor) -> list[str]:
    from tensorboard.util import tensor_util

    array_ = tensor_util.make_ndarray(tensor)
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in array_.reshape(-1).tolist()]


class PointWatcher(Protocol):
    """Sees a run's texts and points as they are first read (:func:`read_runs`'s ``watch``):
    ``point(step, {tag: value})`` once a step's scalars are complete (the next step began),
    in the order of the file; ``text`` as each text is read; ``finish`` at the end."""

    def text(self, tag: str, step: int, text: str) -> None: ...

    def point(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, run: RunLog) -> None: ...


class _Collector:
    """What one run's records hold, gathered as they are read (scalars into their series,
    and, for a watcher, into points)."""

    def __init__(self, run: RunLog, limit: int) -> None:
        self.run = run
        self.limit = limit
        self.builders: dict[str, SeriesBuilder] = {}
        self.pending = 0
        self.plugins: dict[str, str] = {}
        self.ordered = True
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.watcher: PointWatcher | None = None
        self.point: dict[str, float] = {}
        self._ours: dict[str, bool] = {}  # tag -> whether the diagnostics logged it
        self._last: dict[bool, int] = {}  # the last step of each family of tags
        self._point_step: int | None = None  # of the diagnostics' point being gathered

    def series(self, tag: str) -> Series:
        """The series being built for ``tag`` (a watcher pins points on it)."""
        return self.builders[tag].series

    def scalars(self, step: int, found: list[tuple[str, float]]) -> None:
        """The scalars of one event or row."""
        if found[-1][0] == "epoch":  # Lightning's and the diagnostics' (last): not a metric
            found = found[:-1]
            if not found:
                return
        builders = self.builders
        for tag, value in found:
            b = builders.get(tag)
            if b is None:
                b = builders[tag] = SeriesBuilder(self.limit)
            b.steps.append(step)
            b.values.append(value)
        # in step order within each family (see LogStream); the watcher's points are the
        # diagnostics'
        families = self._families(found)
        for ours in families:
            last = self._last.get(ours)
            if last is not None and step < last:
                self.ordered = False
            self._last[ours] = step
        if True in families and self.watcher is not None:
            if self._point_step is not None and step != self._point_step:
                self.watcher.point(self._point_step, self.point)
                self.point = {}
            self.point.update(found if len(families) == 1 else (
                (tag, v) for tag, v in found if is_attention_tag(tag)))
            self._point_step = step
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        self.pending += len(found)
        if self.pending >= _PENDING_POINTS:
            for b in builders.values():
                b.flush()
            self.pending = 0

    def _families(self, found: list[tuple[str, float]]) -> set[bool]:
        """Whether the diagnostics logged ``found``'s tags, as a set: one logger call is
        one family, which its first and last tags tell (both when they differ)."""
        ours, edges = self._ours, set()
        for tag, _ in (found[0], found[-1]):
            known = ours.get(tag)
            if known is None:
                known = ours[tag] = is_attention_tag(tag)
            edges.add(known)
        return edges

    def text(self, tag: str, step: int, texts: list[str]) -> None:
        tag = _strip_text_suffix(tag)
        self.run.texts.setdefault(tag, []).extend((step, t) for t in texts)
        if self.watcher is not None:
            for t in texts:
                self.watcher.text(tag, step, t)

    def finish(self) -> None:
        if self.watcher is not None and self.point:
            self.watcher.point(self._point_step, self.point)
        for tag, b in self.builders.items():
            self.run.scalars[tag] = b.finish()
        for tag in self.run.images:
            self.run.images[tag].sort(key=lambda r: r.step)
        for tag in self.run.texts:
            self.run.texts[tag].sort(key=lambda t: t[0])
        if self.watcher is not None:
            self.watcher.finish(self.run)


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


class _Pieces:
    """The runs of one folder as its files are read: a :class:`_Collector` per (file,
    ``run_id``) piece, switched at each record that names a run, with the byte ranges each
    piece came from."""

    def __init__(self, source: RunSource, limit: int, watch: Watch | None) -> None:
        self.source, self.limit, self.watch = source, limit, watch
        self.collectors: dict[tuple[int, str | None], _Collector] = {}
        self.ranges: dict[tuple[int, str | None], list[tuple[Path, int, int]]] = {}
        self.plugins: dict[str, str] = {}  # shared: a tag's plugin is named once per file set
        self.notes: list[str] = []
        self.index, self.path, self.key, self.start = -1, Path(), (0, None), 0

    @property
    def out(self) -> _Collector:
        """The collector of the piece being read (made on its first event or byte)."""
        found = self.collectors.get(self.key)
        if found is None:
            run = RunLog(self.source.name, self.source.path, self.source.kind)
            found = self.collectors[self.key] = _Collector(run, self.limit)
            found.plugins = self.plugins
            found.watcher = self.watch(found) if self.watch is not None else None
        return found

    def begin(self, index: int, path: Path) -> None:
        self.index, self.path, self.key, self.start = index, path, (index, None), 0

    def switch(self, run_id: str, at: int) -> None:
        """A record naming ``run_id`` starts at byte ``at``: later events are its run's."""
        if (self.index, run_id) != self.key:
            self.end(at)
            self.key, self.start = (self.index, run_id), at

    def end(self, at: int) -> None:
        if at > self.start:
            self.ranges.setdefault(self.key, []).append((self.path, self.start, at))
            _ = self.out  # a piece of bytes is a piece, with events or without

    def finish(self) -> dict[tuple[int, str | None], RunLog]:
        logs = {}
        for key, out in self.collectors.items():
            out.finish()
            out.run.streams.append(LogStream("tensorboard", tuple(self.ranges.get(key, ())),
                                             out.ordered, out.first_step, out.last_step))
            logs[key] = out.run
        return logs


def _read_event_file(path: Path, pieces: _Pieces, advance: Callable[[int], None]) -> int:
    """Read one event file into its pieces; returns the bytes of whole records read."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2

    try:
        reader = RecordReader(path, advance)
    except OSError as err:
        pieces.notes.append(f"skipped unreadable event file {str(path)!r} ({err})")
        return 0
    events, detail = 0, None
    from_string = event_pb2.Event.FromString
    records = reader.records()
    try:
        for record in records:
            out = pieces.out
            run = out.run
            if record.data is None:  # too big to hold: walked in the file
                step, values = big_event_summary(str(path), record.offset, record.length)
                found = []
                for v in values:
                    if v.metadata is not None and v.tag not in out.plugins:
                        meta = summary_pb2.SummaryMetadata.FromString(v.metadata)
                        out.plugins[v.tag] = meta.plugin_data.plugin_name
                    if v.simple_value is not None:
                        found.append((v.tag, v.simple_value))
                    elif v.image is not None:
                        width, height, data = v.image
                        run.images.setdefault(v.tag, []).append(
                            ImageRecord(step, width, height, data))
                    elif v.tensor is not None and out.plugins.get(v.tag) == "text":
                        out.text(v.tag, step, _texts(tensor_pb2.TensorProto.FromString(v.tensor)))
                    elif v.skipped:
                        run.notes.append(f"{v.tag} at step {step} in {str(path)!r}: skipped "
                                         f"{v.skipped}")
                if found:
                    out.scalars(step, found)
                events += 1
                continue
            event = from_string(record.data)
            events += 1
            if not event.HasField("summary"):
                continue
            run_id = _run_id_of(event)
            if run_id is not None:
                pieces.switch(run_id, record.offset - RECORD_HEADER)
                out = pieces.out
                run = out.run
            step = event.step
            found = []
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    found.append((v.tag, v.simple_value))
                    continue
                tag = v.tag
                if tag not in out.plugins and v.HasField("metadata"):
                    out.plugins[tag] = v.metadata.plugin_data.plugin_name
                if kind == "image":
                    image = v.image
                    encoded = image.encoded_image_string
                    at = record.data.find(encoded)
                    run.images.setdefault(tag, []).append(ImageRecord(
                        step, image.width, image.height,
                        FileSlice(str(path), record.offset + at, len(encoded))))
                elif kind == "tensor" and out.plugins.get(tag) == "text":
                    out.text(tag, step, _texts(v.tensor))
            if found:
                out.scalars(step, found)
    except Exception as err:  # any decode failure: name the file, keep what came before
        detail = f"{type(err).__name__}: {err}"
        advance(reader.size - reader.counted)
    finally:
        records.close()
    if detail is None and reader.damage is not None:
        detail = reader.damage
    if detail is not None:
        pieces.notes.append(_damage_note(path, reader, events, detail))
    return reader.done


Watch = Callable[[_Collector], PointWatcher | None]


def _read_events(source: RunSource, advance: Callable[[int], None], limit: int,
                 watch: Watch | None = None) -> RunLog:
    pieces = _Pieces(source, limit, watch)
    for index, path in enumerate(source.files):
        pieces.begin(index, path)
        pieces.end(_read_event_file(path, pieces, advance))
    logs = pieces.finish()
    notes = [*source.notes, *pieces.notes]
    if not logs:
        return RunLog(source.name, source.path, source.kind, notes=notes)
    return _runs_apart(source.name, notes, logs)


def _runs_apart(name: str, notes: list[str],
                logs: dict[tuple[int, str | None], RunLog]) -> RunLog:
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
    empty = [r for r in order if not any(log.has_diagnostics for log in by_run[r])]
    if len(empty) < len(order):
        for r in empty:
            i = order.index(r)
            into = next(o for o in order[i + 1:] + order[:i][::-1] if o not in empty)
            piece = by_run.pop(r)  # kept in event order: before a later run, after an earlier
            by_run[into] = piece + by_run[into] if order.index(into) > i else by_run[into] + piece
            files_of[into] |= files_of.pop(r)
    merged = merge_logs(name, list(logs.values()), notes)
    if len(by_run) > 1:
        files = len(set().union(*files_of.values()))
        listed = ", ".join(r if r is not None else "a writer without attn/config"
                           for r in by_run)
        note = (f"this folder holds {len(by_run)} runs ({listed}; written to {files} event "
                f"file{'s' if files > 1 else ''}): shown apart")
        merged.parts = [
            merge_logs(f"{name} [run {r[:8] if r else 'without id'}]", parts, [*notes, note])
            for r, parts in by_run.items()
        ]
    return merged


# -- CSV -------------------------------------------------------------------------------------
def _counted_lines(handle, advance: Callable[[int], None]) -> Iterator[str]:
    for line in handle:
        advance(len(line.encode("utf-8")))
        yield line


def _csv_rows(path: Path, advance: Callable[[int], None],
              notes: list[str]) -> Iterator[tuple[int, list[tuple[str, float]]]]:
    """``(step, [(column, value), ...])`` of each row with a step and at least one number."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(_counted_lines(handle, advance))
            if reader.fieldnames is None or "step" not in reader.fieldnames:
                notes.append(f"skipped {str(path)!r}: no 'step' column (not CSVLogger's)")
                return
            for row in reader:
                try:
                    step = int(float(row["step"]))
                except (TypeError, ValueError):
                    continue
                values = []
                for tag, text in row.items():
                    if tag in (None, "step", "epoch") or text in (None, ""):
                        continue
                    try:
                        values.append((tag, float(text)))
                    except ValueError:
                        continue
                yield step, values
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        notes.append(f"skipped unreadable {str(path)!r} ({type(err).__name__}: {err})")


def _read_csv(source: RunSource, advance: Callable[[int], None], limit: int,
              watch: Watch | None = None) -> RunLog:
    run = RunLog(source.name, source.path, source.kind, notes=list(source.notes))
    (path,) = source.files
    out = _Collector(run, limit)
    out.watcher = watch(out) if watch is not None else None
    for step, values in _csv_rows(path, advance, run.notes):
        if values:
            out.scalars(step, values)
    out.finish()
    run.scalars = {tag: run.scalars[tag] for tag in sorted(run.scalars, key=natural_key)}
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    run.streams.append(LogStream("csv", ((path, 0, size),), out.ordered, out.first_step,
                                 out.last_step))
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


def read_runs(sources: Iterable[RunSource], progress: bool = True,
              limit: int = CURVE_POINTS, watch: Watch | None = None) -> list[RunLog]:
    """Read every run, with one ``rich`` progress bar over all their bytes; each series keeps
    at most ``limit`` points (:class:`~.curves.Series`). ``watch(collector)`` may give a
    :class:`PointWatcher` for each run (:mod:`.verdicts` judges the points as they come)."""
    sources = list(sources)
    total = sum(s.size for s in sources)
    bar = _bytes_bar(progress)
    runs = []
    with bar:
        task = bar.add_task("reading logs", total=max(total, 1))
        for source in sources:
            bar.update(task, description=f"reading {source.name}")

            def advance(n: int) -> None:
                bar.advance(task, n)

            read = _read_events if source.kind == "tensorboard" else _read_csv
            runs.append(read(source, advance, limit, watch))
    return runs


def _bytes_bar(progress: bool) -> Progress:
    return progress_bar(
        progress, TextColumn("[progress.description]{task.description}"), BarColumn(),
        DownloadColumn(), TimeRemainingColumn(),
    )


# -- replay: every scalar again, point by point in step order ---------------------------------
Point = tuple[int, dict[str, float]]


def _event_scalars(path: Path, start: int, end: int, wanted: Callable[[str], bool],
                   advance: Callable[[int], None]) -> Iterator[tuple[int, list[tuple[str, float]]]]:
    """``(step, [(tag, value), ...])`` of each event with a wanted scalar, from byte
    ``start`` to ``end`` (a range the first reading kept). CRCs were checked by the first
    reading."""
    from tensorboard.compat.proto import event_pb2

    from_string = event_pb2.Event.FromString
    chosen: dict[str, bool] = {}
    for record in RecordReader(path, advance, end=end, verify=False, start=start).records():
        if record.data is None:
            step, values = big_event_summary(str(path), record.offset, record.length)
            found = [(v.tag, v.simple_value) for v in values
                     if v.simple_value is not None and wanted(v.tag)]
            if found:
                yield step, found
            continue
        event = from_string(record.data)
        if not event.HasField("summary"):
            continue
        found = []
        for v in event.summary.value:
            if v.WhichOneof("value") == "simple_value":
                tag = v.tag
                keep = chosen.get(tag)
                if keep is None:
                    keep = chosen[tag] = wanted(tag)
                if keep:
                    found.append((tag, v.simple_value))
        if found:
            yield event.step, found


def _stream_rows(stream: LogStream, wanted: Callable[[str], bool],
                 advance: Callable[[int], None]) -> Iterator[tuple[int, list[tuple[str, float]]]]:
    if stream.kind == "csv":
        for path, _, _ in stream.files:
            for step, values in _csv_rows(path, advance, []):
                found = [(t, v) for t, v in values if wanted(t)]
                if found:
                    yield step, found
        return
    for path, start, end in stream.files:
        yield from _event_scalars(path, start, end, wanted, advance)


def grouped(rows: Iterable[tuple[int, Iterable[tuple[str, float]]]]) -> Iterator[Point]:
    """Rows in step order -> one point per step (a tag's later value wins)."""
    step, point = None, {}
    for s, values in rows:
        if s != step:
            if step is not None:
                yield step, point
            step, point = s, {}
        point.update(values)
    if step is not None:
        yield step, point


def sorted_points(names: Sequence[str], which: np.ndarray, steps: np.ndarray,
                  values: np.ndarray) -> Iterator[Point]:
    """Columns (for each entry: the index of its tag in ``names``, its step and value) ->
    points in step order; on a repeated step a tag's later entry wins."""
    order = np.lexsort((np.arange(len(steps)), steps))  # by step, then arrival
    return grouped((int(steps[i]), ((names[which[i]], float(values[i])),))
                   for i in order.tolist())


def _sorted(rows: Iterator[tuple[int, list[tuple[str, float]]]]) -> Iterator[Point]:
    """Rows in any order, held by columns and put in step order: memory grows with the
    stream, which is why this is the fallback."""
    index: dict[str, int] = {}
    tags, steps, values = array("q"), array("q"), array("d")
    for s, found in rows:
        for tag, v in found:
            tags.append(index.setdefault(tag, len(index)))
            steps.append(s)
            values.append(v)
    return sorted_points(list(index), np.frombuffer(tags, dtype=np.int64) if tags else
                         np.zeros(0, dtype=np.int64),
                         np.frombuffer(steps, dtype=np.int64) if steps else
                         np.zeros(0, dtype=np.int64),
                         np.frombuffer(values, dtype=np.float64) if values else np.zeros(0))


def replay(streams: Sequence[LogStream], wanted: Callable[[str], bool] = lambda tag: True,
           advance: Callable[[int], None] = lambda n: None,
           tags: Iterable[str] | None = None) -> Iterator[Point]:
    """Every point of the wanted scalars, ``(step, {tag: value})``, in step order.

    Several streams (the versions of one run) are merged by step; at a step logged by more
    than one, each tag takes the later stream's value, as when the run's series were joined.
    A stream read out of step order is held in memory by columns and sorted. One in step
    order family by family (:class:`LogStream`) is read once for each family whose tags are
    wanted, and the two merged: ``tags`` (those the streams hold, known from the first
    reading) says which are; ``None``: both.
    """
    def metric(tag: str) -> bool:  # Lightning's epoch counter is no metric (as in CSV)
        return tag != "epoch" and wanted(tag)

    families = (True, False) if tags is None else tuple(sorted(
        {is_attention_tag(t) for t in tags if metric(t)}, reverse=True))

    def family(ours: bool) -> Callable[[str], bool]:
        def chosen(tag: str) -> bool:
            return metric(tag) and is_attention_tag(tag) == ours
        return chosen

    def points(stream: LogStream) -> Iterator[Point]:
        if not stream.ordered:
            return _sorted(_stream_rows(stream, metric, advance))
        if len(families) < 2:
            return grouped(_stream_rows(stream, metric, advance))
        # the progress bar counts the first family's pass
        passes = [_stream_rows(stream, family(ours), advance if i == 0 else lambda n: None)
                  for i, ours in enumerate(families)]
        return grouped(heapq.merge(*passes, key=lambda row: row[0]))

    if len(streams) == 1:
        yield from points(streams[0])
        return
    merged = heapq.merge(*(((s, i, p) for s, p in points(stream))
                           for i, stream in enumerate(streams)),
                         key=lambda item: (item[0], item[1]))
    yield from grouped((s, p.items()) for s, _, p in merged)
