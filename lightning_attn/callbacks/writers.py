"""The one seam between the diagnostics and the Trainer's loggers.

:class:`DiagnosticsOutput` is all the callbacks talk to. Scalars go through Lightning
(``LightningModule.log``) to every logger, into ``trainer.callback_metrics`` (so
``EarlyStopping``/``ModelCheckpoint`` can monitor them) and onto the same step, and CSV row,
as the module's own ``self.log`` values. Everything else (histograms, images, texts, the
chart layout) goes to a :class:`DiagnosticsWriter` per logger that can show it:
:class:`TensorBoardWriter` for ``TensorBoardLogger``. Another logger backend is one file::

    class MyWriter(DiagnosticsWriter):
        logger_type = MyLogger
        def image(self, tag, image, step): self.logger.experiment.log_image(tag, image, step)

    register_writer(MyWriter)
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

__all__ = [
    "DiagnosticsOutput",
    "DiagnosticsWriter",
    "TensorBoardWriter",
    "register_writer",
]


class DiagnosticsWriter:
    """How one logger backend shows histograms, images, texts and the chart layout.

    Each method does nothing by default: a backend implements what it can show. Methods run
    on global rank zero only.
    """

    logger_type: ClassVar[type[Logger]] = Logger

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        """Charts grouping the tags (format of ``SummaryWriter.add_custom_scalars``)."""

    def histogram(self, tag: str, counts: Sequence[float], step: int) -> None:
        """Counts of ``len(counts)`` equal bins over ``[0, 1]``."""

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``(3, H, W)`` float image in ``[0, 1]``."""

    def text(self, tag: str, text: str, step: int) -> None:
        """A text (here: a JSON document)."""


class TensorBoardWriter(DiagnosticsWriter):
    """Histograms, images, texts and the custom-scalars layout to a ``TensorBoardLogger``."""

    logger_type = TensorBoardLogger
    # The merged layout of each SummaryWriter: TensorBoard shows one layout per run, and
    # several callbacks may log into the same run.
    _layouts: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @property
    def _writer(self):
        return self.logger.experiment

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        merged = self._layouts.setdefault(self._writer, {})
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


_WRITERS: list[type[DiagnosticsWriter]] = [TensorBoardWriter]


def register_writer(writer: type[DiagnosticsWriter]) -> None:
    """Use ``writer`` for every logger that is an instance of ``writer.logger_type``."""
    if not (isinstance(writer, type) and issubclass(writer, DiagnosticsWriter)):
        raise TypeError(f"writer must be a DiagnosticsWriter subclass, got {writer!r}")
    if writer not in _WRITERS:
        _WRITERS.append(writer)


class DiagnosticsOutput:
    """Where one callback's output goes, for one Trainer.

    Args:
        trainer: the Trainer (its loggers, rank and counters).
        follows_trainer: whether the callback logs on the Trainer's own logging steps.
            Then scalars go through ``LightningModule.log`` and share the module's rows.
            Otherwise Lightning would flush them at its own steps (stale or missing), so they
            are written to the loggers directly at the same step number Lightning uses, and
            put into ``trainer.callback_metrics`` for monitoring callbacks.
    """

    def __init__(self, trainer: pl.Trainer, follows_trainer: bool = True) -> None:
        self.trainer = trainer
        self.follows_trainer = follows_trainer
        self.writers: list[DiagnosticsWriter] = []
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                self.writers += [w(logger) for w in _WRITERS if isinstance(logger, w.logger_type)]

    # -- scalars -----------------------------------------------------------------------------
    def scalars(
        self, pl_module: pl.LightningModule, metrics: Mapping[str, float], epoch_level: bool
    ) -> None:
        """Scalars of a training logging step (``epoch_level=False``) or of an evaluation
        epoch (``True``), identical on every process (already reduced)."""
        if not metrics:
            return
        # CPU tensors: logging Python floats would copy each to the GPU and read it back.
        values = torch.tensor(list(metrics.values()), dtype=torch.float64)
        if epoch_level or self.follows_trainer:
            for name, value in zip(metrics, values, strict=True):
                pl_module.log(
                    name, value, on_step=not epoch_level, on_epoch=epoch_level,
                    sync_dist=False, batch_size=1,
                )
            return
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        row = {**metrics, "epoch": self.trainer.current_epoch}
        for logger in self.trainer.loggers:
            logger.log_metrics(row, step=step)
        self.trainer.callback_metrics.update(dict(zip(metrics, values, strict=True)))

    # -- everything else: each backend writer, rank zero ---------------------------------
    def histograms(self, tagged_counts: Mapping[str, Sequence[float]], step: int) -> None:
        for writer in self.writers:
            for tag, counts in tagged_counts.items():
                writer.histogram(tag, counts, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for writer in self.writers:
            writer.image(tag, image, step)

    def json(self, tag: str, document: Mapping[str, Any], step: int) -> None:
        text = json.dumps(document, sort_keys=True, default=str)
        for writer in self.writers:
            writer.text(tag, text, step)

    def layout(self, layout: Mapping[str, dict[str, list]]) -> None:
        if layout:
            for writer in self.writers:
                writer.layout(layout)

    @property
    def shows_images(self) -> bool:
        """Whether some logger shows images (TensorBoard by default)."""
        return any(type(w).image is not DiagnosticsWriter.image for w in self.writers) or (
            not self.trainer.is_global_zero
        )
