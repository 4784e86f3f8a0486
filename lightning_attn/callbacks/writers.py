"""The one seam between the diagnostics and the Trainer's loggers.

:class:`DiagnosticsOutput` is all the callbacks talk to. Each logger of the Trainer gets a
:class:`DiagnosticsWriter`: the base one writes scalars with the logger's own
``log_metrics``; :class:`TensorBoardWriter` also writes histograms, images, texts and the
chart layout (and a point's scalars as one event: :meth:`TensorBoardWriter.scalars`). Every
point's scalars (training logging steps and evaluation runs alike) are written at
Lightning's step number (the one the module's own ``self.log`` values of that
batch or epoch get). Those that a callback or a learning-rate scheduler of the Trainer
monitors (``EarlyStopping``, ``ModelCheckpoint``, ``ReduceLROnPlateau``: their ``monitor``)
are put into ``trainer.callback_metrics`` too, not all of them: each would be a tensor made
and freed at every point, and ``ModelCheckpoint`` deep-copies the whole dict at every check,
costs that would grow with the number of modules (Lightning's own monitors,
``LearningRateMonitor`` and ``DeviceStatsMonitor``, put nothing there). They are not sent through
``LightningModule.log``: the values are already reduced over the global batch, and that path
would cost about a millisecond per value (Lightning moves its whole result object on every
call) and reduce them again.

Another logger backend is one file::

    class MyWriter(DiagnosticsWriter):
        logger_type = MyLogger
        def image(self, tag, image, step): self.logger.experiment.log_image(tag, image, step)

    AttentionDiagnostics(writers=[MyWriter])    # this callback
    register_writer(MyWriter)                   # every callback of the process (undo: .remove())
"""

from __future__ import annotations

import json
import struct
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import google_crc32c
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

__all__ = [
    "DEFAULT_WRITERS",
    "DiagnosticsOutput",
    "DiagnosticsWriter",
    "ScalarBatch",
    "ScalarEvents",
    "TensorBoardWriter",
    "WriterRegistration",
    "check_writers",
    "checksum_records_in_c",
    "json_text",
    "monitored_metrics",
    "register_writer",
    "writer_for",
]


class ScalarBatch(Mapping):
    """A point's scalars: their tags and one array of values (``(n,)`` float64), readable as
    a ``Mapping`` of tag -> value as well (made when first read so). Writers that can take
    the arrays (TensorBoard, ``callback_metrics``) never build the mapping. ``extra``: values
    kept as they are (a point's ``epoch``, an int in a CSV row)."""

    __slots__ = ("_dict", "extra", "tags", "values")

    def __init__(self, tags: Sequence[str], values: np.ndarray,
                 extra: Mapping[str, Any] | None = None) -> None:
        self.tags = list(tags)
        self.values = np.asarray(values, dtype=np.float64)
        self.extra = dict(extra or {})
        self._dict: dict[str, Any] | None = None

    @classmethod
    def of(cls, metrics: Mapping[str, float]) -> ScalarBatch:
        if isinstance(metrics, ScalarBatch):
            return metrics
        return cls(list(metrics), np.asarray([float(v) for v in metrics.values()]))

    def _mapping(self) -> dict[str, Any]:
        if self._dict is None:
            self._dict = dict(zip(self.tags, self.values.tolist(), strict=True))
            self._dict.update(self.extra)
        return self._dict

    def __getitem__(self, tag: str) -> Any:
        return self._mapping()[tag]

    def __iter__(self):
        return iter([*self.tags, *self.extra])

    def __len__(self) -> int:
        return len(self.tags) + len(self.extra)

    def with_value(self, tag: str, value: Any) -> ScalarBatch:
        """This batch and one more value kept as it is (a point's ``epoch``)."""
        return ScalarBatch(self.tags, self.values, {**self.extra, tag: value})

    def all_tags(self) -> list[str]:
        return [*self.tags, *self.extra]

    def all_values(self) -> list[float]:
        return [*self.values.tolist(), *map(float, self.extra.values())]


class DiagnosticsWriter:
    """How one logger backend shows scalars, histograms, images, texts and the chart layout.

    Scalars go to the logger's ``log_metrics``; every other method does nothing by default:
    a backend implements what it can show. Methods run on global rank zero only.
    """

    logger_type: ClassVar[type[Logger]] = Logger

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Values at ``step`` (Lightning's step numbers)."""
        self.logger.log_metrics(dict(metrics), step=step)

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        """Charts grouping the tags (format of ``SummaryWriter.add_custom_scalars``)."""

    def histogram(self, tag: str, counts: Sequence[float], step: int) -> None:
        """Counts of ``len(counts)`` equal bins over ``[0, 1]``."""

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``(3, H, W)`` float image in ``[0, 1]``."""

    def text(self, tag: str, text: str, step: int) -> None:
        """A text (here: a JSON document)."""


def _masked_crc32c(data: bytes) -> int:
    # TFRecord's masked CRC-32C (what TensorBoard's masked_crc32c computes), in C.
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def checksum_records_in_c(file_writer: Any) -> bool:
    """Have the record writer of a ``SummaryWriter``'s file writer checksum its records in C:
    the same bytes. TensorBoard computes each record's CRC-32C in pure Python, about a
    microsecond a byte (2 ms for a point of 60 scalars at every step), in its writer thread
    but holding the interpreter's lock, so the training loop waits for it. Applied to this
    run's file only (an instance attribute; another file, or the one a ``reopen()`` makes,
    is untouched until a point is written to it); ``False`` where it cannot apply (no C
    implementation of google-crc32c, or a TensorBoard whose writer is laid out otherwise:
    its own checksums then run as they are)."""
    if google_crc32c.implementation != "c":
        return False
    try:  # FileWriter -> EventFileWriter -> _AsyncWriter -> RecordWriter -> the file
        records = file_writer.event_writer._async_writer._writer
        records._writer.write  # noqa: B018 - the file it writes to, checked now
    except AttributeError:
        return False
    if getattr(records.write, "checksums_in_c", False):
        return True

    def write(data: bytes) -> None:  # RecordWriter.write, with the C checksum
        header = struct.pack("<Q", len(data))
        records._writer.write(header + struct.pack("<I", _masked_crc32c(header)) + data
                              + struct.pack("<I", _masked_crc32c(data)))

    write.checksums_in_c = True
    records.write = write
    return True


class TensorBoardWriter(DiagnosticsWriter):
    """Histograms, images, texts and the custom-scalars layout to a ``TensorBoardLogger``."""

    logger_type = TensorBoardLogger
    #: Attribute of the SummaryWriter holding its merged layout: TensorBoard shows one layout
    #: per run, and several callbacks may log into the same run, so the layout lives with the
    #: run's writer (not in this class, and not in a module table).
    LAYOUT_ATTRIBUTE: ClassVar[str] = "_lightning_attn_layout"

    @property
    def _writer(self):
        return self.logger.experiment

    def __init__(self, logger: Logger) -> None:
        super().__init__(logger)
        self._events: ScalarEvents | None = None  # the last point's tags'

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """What ``log_metrics(metrics, step)`` writes, as one event instead of one per value:
        0.20 ms instead of 3.85 ms for 50 values (``benchmarks/logging_cost.py``, 2-core CPU,
        idle), serialized without protobuf (:class:`ScalarEvents`: the event of 1,800 values
        took 0.7 ms to refill and serialize). The writers' private reach-ins (the logger's
        prefix, the ``SummaryWriter``'s file writer and its queue of records; listed in
        ``tests/test_private_apis.py``); ``tests/callbacks/test_writers.py`` fails if
        Lightning or TensorBoard changes what they write."""
        if type(self.logger).log_metrics is not TensorBoardLogger.log_metrics:
            super().scalars(metrics, step)  # a subclass that changed how it logs
            return
        # A run logs the same tags at every point: its event's layout is made once.
        batch = ScalarBatch.of(metrics)
        tags = batch.all_tags()
        if self._events is None or self._events.tags != tags:
            logger = self.logger
            prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
            self._events = ScalarEvents(tags, prefix)
        values = batch.values if not batch.extra else np.asarray(batch.all_values())
        file_writer = self.logger.experiment._get_file_writer()
        checksum_records_in_c(file_writer)
        # FileWriter.add_summary -> add_event: the wall time now, the step as an int
        file_writer.event_writer._async_writer.write(
            self._events.event(values, int(step), time.time()))

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        merged = self._writer.__dict__.setdefault(self.LAYOUT_ATTRIBUTE, {})
        for category, charts in layout.items():
            merged.setdefault(category, {}).update(charts)
        self._writer.add_custom_scalars(merged)

    def histogram(self, tag: str, counts: Sequence[float], step: int) -> None:
        num = sum(counts)
        if num <= 0:
            return
        bins = len(counts)
        centers = [(i + 0.5) / bins for i in range(bins)]
        nonzero = [i for i, c in enumerate(counts) if c > 0]
        self._writer.add_histogram_raw(
            tag,
            min=nonzero[0] / bins,
            max=(nonzero[-1] + 1) / bins,
            num=int(num),
            sum=sum(c * x for c, x in zip(counts, centers, strict=True)),
            sum_squares=sum(c * x * x for c, x in zip(counts, centers, strict=True)),
            bucket_limits=[(i + 1) / bins for i in range(bins)],
            bucket_counts=list(counts),
            global_step=step,
        )

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self._writer.add_image(tag, image, global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # an int64 as protobuf writes it (two's complement)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ScalarEvents:
    """The TensorBoard events of one scalar per tag (``tags``, each after ``prefix``), as
    ``SummaryWriter.add_summary`` serializes them, byte for byte, made without protobuf: the
    tags' bytes are laid out once, and each point writes its values (as float32) into them.

    The layout (``tensorboard/compat/proto``): ``Event`` = ``wall_time`` (field 1, double),
    ``step`` (field 2, varint; left out when 0), ``summary`` (field 5); ``Summary`` = one
    ``value`` (field 1) per tag, each ``tag`` (field 1) and ``simple_value`` (field 2,
    float; written even when 0, being in a oneof)."""

    def __init__(self, tags: Sequence[str], prefix: str = "") -> None:
        self.tags = list(tags)
        parts, where, size = [], [], 0
        for tag in self.tags:
            name = (prefix + tag).encode("utf-8")
            inner = b"\x0a" + _varint(len(name)) + name + b"\x15"
            head = b"\x0a" + _varint(len(inner) + 4) + inner
            parts += [head, bytes(4)]
            size += len(head)
            where.append(size)
            size += 4
        self._template = bytearray(b"".join(parts))
        self._bytes = np.frombuffer(self._template, dtype=np.uint8)  # a view: written in
        self._where = (np.asarray(where, dtype=np.int64)[:, None] + np.arange(4)).reshape(-1)

    def event(self, values: np.ndarray, step: int, wall_time: float) -> bytes:
        """The serialized event of ``values`` (one per tag) at ``step``."""
        with np.errstate(over="ignore"):  # beyond float32: inf, as protobuf's cast
            floats = np.asarray(values, dtype=np.float64).astype("<f4")
        self._bytes[self._where] = floats.view(np.uint8)
        summary = bytes(self._template)
        return b"".join((b"\x09", struct.pack("<d", wall_time),
                         b"\x10" + _varint(step) if step else b"",
                         b"\x2a", _varint(len(summary)), summary))


def json_text(document: Mapping[str, Any]) -> str:
    """``document`` as the text of a text event: pretty-printed JSON with every line indented
    four spaces. TensorBoard's Text tab renders Markdown, which shows those lines as one code
    block, key per line (compact JSON would be one paragraph); JSON allows the leading
    whitespace, so the text stays one document for ``json.loads`` and the report."""
    return textwrap.indent(json.dumps(document, sort_keys=True, indent=2, default=str), "    ")


#: The writers every callback knows (immutable): a backend of your own goes in
#: ``AttentionDiagnostics(writers=[...])`` or :func:`register_writer`.
DEFAULT_WRITERS: tuple[type[DiagnosticsWriter], ...] = (TensorBoardWriter,)
#: Writers registered for the whole process (each with the handle that undoes it).
_registered: list[type[DiagnosticsWriter]] = []


class WriterRegistration:
    """What :func:`register_writer` returns: :meth:`remove` undoes it (also ``with ...:``)."""

    def __init__(self, writer: type[DiagnosticsWriter]) -> None:
        self.writer = writer

    def remove(self) -> None:
        if self.writer in _registered:
            _registered.remove(self.writer)

    def __enter__(self) -> WriterRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def check_writers(writers: Iterable[object]) -> tuple[type[DiagnosticsWriter], ...]:
    """``writers`` as a tuple, each a :class:`DiagnosticsWriter` subclass, or a
    ``TypeError``."""
    writers = tuple(writers)
    for writer in writers:
        if not (isinstance(writer, type) and issubclass(writer, DiagnosticsWriter)):
            raise TypeError(f"writers must be DiagnosticsWriter subclasses, got {writer!r}")
    return writers


def register_writer(writer: type[DiagnosticsWriter]) -> WriterRegistration:
    """Use ``writer`` for every logger that is an instance of ``writer.logger_type``, in every
    callback of this process (the most specific writer wins); returns the handle that undoes
    it."""
    if check_writers((writer,))[0] not in _registered:
        _registered.append(writer)
    return WriterRegistration(writer)


def writer_for(
    logger: Logger, writers: Sequence[type[DiagnosticsWriter]] = ()
) -> DiagnosticsWriter:
    """The most specific writer for ``logger`` among ``writers``, the registered ones and
    :data:`DEFAULT_WRITERS` (on a tie the first of them, so ``writers`` win), else the base
    writer (scalars only)."""
    best: type[DiagnosticsWriter] | None = None
    for w in (*check_writers(writers), *_registered, *DEFAULT_WRITERS):
        if not isinstance(logger, w.logger_type):
            continue
        if best is None or (issubclass(w.logger_type, best.logger_type)
                            and w.logger_type is not best.logger_type):
            best = w
    return (best or DiagnosticsWriter)(logger)


def monitored_metrics(trainer: pl.Trainer) -> frozenset[str]:
    """The metric names ``trainer`` reads from ``callback_metrics``: the ``monitor`` of each
    callback (``EarlyStopping``, ``ModelCheckpoint`` and those that follow their
    convention) and of each learning-rate scheduler (``ReduceLROnPlateau``'s)."""
    names = {getattr(callback, "monitor", None) for callback in trainer.callbacks}
    names |= {config.monitor for config in trainer.lr_scheduler_configs}
    return frozenset(name for name in names if isinstance(name, str))


class DiagnosticsOutput:
    """Where one callback's output goes, for one Trainer (a writer per logger, rank zero;
    the monitored scalars to ``trainer.callback_metrics``, every rank)."""

    def __init__(
        self, trainer: pl.Trainer, writers: Sequence[type[DiagnosticsWriter]] = ()
    ) -> None:
        self.trainer = trainer
        self.writers: list[DiagnosticsWriter] = []
        if trainer.is_global_zero:
            self.writers = [writer_for(logger, writers) for logger in trainer.loggers]
        #: found at the first point of each stage, when every callback and scheduler is there
        self._monitored: frozenset[str] | None = None

    @property
    def rich_writers(self) -> list[DiagnosticsWriter]:
        """The writers that show more than scalars."""
        return [w for w in self.writers if type(w) is not DiagnosticsWriter]

    # -- scalars -----------------------------------------------------------------------------
    def scalars(self, metrics: Mapping[str, float], step: int, epoch: int | None = None) -> None:
        """A point's scalars at ``step``, identical on every process (already reduced): to
        every logger (rank zero) and the monitored ones to ``trainer.callback_metrics``
        (every process: ``EarlyStopping`` and ``ModelCheckpoint`` read them on every
        rank). ``epoch``: the point's (``None``: the Trainer's now)."""
        if not metrics:
            return
        batch = ScalarBatch.of(metrics)
        # an epoch column, as Lightning's own rows have
        row = batch.with_value("epoch", self.trainer.current_epoch if epoch is None else epoch)
        for writer in self.writers:
            writer.scalars(row, step)
        if self._monitored is None:
            self._monitored = monitored_metrics(self.trainer)
        # the few monitored tags found in C (list.index), not a loop over every tag
        found = [batch.tags.index(name) for name in self._monitored if name in batch.tags]
        if found:
            tags, values = [batch.tags[i] for i in found], batch.values[found]
            # CPU tensors, as Lightning keeps its own (made in one call, split into 0-d
            # views; a new buffer per point: a monitor keeps the tensor of its best score).
            published = torch.from_numpy(values).unbind()  # fancy indexing copied them
            self.trainer.callback_metrics.update(zip(tags, published, strict=True))

    # -- everything else: each backend writer, rank zero ---------------------------------
    def histograms(self, tagged_counts: Mapping[str, Sequence[float]], step: int) -> None:
        for writer in self.rich_writers:
            for tag, counts in tagged_counts.items():
                writer.histogram(tag, counts, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for writer in self.rich_writers:
            writer.image(tag, image, step)

    def json(self, tag: str, document: Mapping[str, Any], step: int) -> None:
        text = json_text(document)
        for writer in self.rich_writers:
            writer.text(tag, text, step)

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        if layout:
            for writer in self.rich_writers:
                writer.layout(layout)
