"""Writing to the Trainer's loggers: scalars to all of them, the rest to TensorBoard only.

The custom-scalars layout is written once per TensorBoard run. Several callbacks may log into
the same run (say a ``MaskHealthMonitor`` and a ``RouterEntropyMonitor``); TensorBoard shows
only one layout per run, so callbacks *register* their charts at ``on_train_start`` and the
merged layout is written by whichever logs first.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from .statistics import GlobalStats
from .tags import histogram_tag

__all__ = [
    "log_scalars",
    "register_layout",
    "tensorboard_loggers",
    "warn_no_tensorboard",
    "write_histograms",
    "write_pending_layouts",
]


class _PendingLayout:
    def __init__(self) -> None:
        self.layout: dict[str, dict[str, list]] = {}
        self.written = False


# One entry per SummaryWriter; dies with the writer.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The Trainer's TensorBoard loggers (``.experiment`` is a ``SummaryWriter``)."""
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def warn_no_tensorboard(trainer: pl.Trainer, owner: str, what: str) -> None:
    """One rank-zero info message when there is no TensorBoard logger to take ``what``."""
    if not tensorboard_loggers(trainer):
        rank_zero_info(
            f"{owner}: the Trainer has no TensorBoardLogger, so it writes no {what} "
            "(scalars still go to every logger; warnings and the summary still work)"
        )


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` to every logger of the Trainer (CSV included).

    Each logger gets ``logger.log_metrics(metrics, step=step)``, except a plain
    ``TensorBoardLogger`` (``log_metrics`` not overridden): it gets the same tags, prefix and
    step as one event with many values, since one ``add_scalar`` per tag costs a queue
    hand-off each (about 3 ms for 20 tags with the default ``max_queue``).
    """
    if not metrics:
        return
    for logger in trainer.loggers:
        if _plain_tensorboard(logger):
            _log_tensorboard_scalars(logger, metrics, step)
        else:
            logger.log_metrics(dict(metrics), step=step)


def _plain_tensorboard(logger: object) -> bool:
    return (
        isinstance(logger, TensorBoardLogger)
        and type(logger).log_metrics is TensorBoardLogger.log_metrics
        and isinstance(logger.experiment, SummaryWriter)
    )


@rank_zero_only
def _log_tensorboard_scalars(
    logger: TensorBoardLogger, metrics: Mapping[str, float], step: int
) -> None:
    prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
    summary = Summary(
        value=[Summary.Value(tag=prefix + k, simple_value=float(v)) for k, v in metrics.items()]
    )
    logger.experiment._get_file_writer().add_summary(summary, step)


def register_layout(trainer: pl.Trainer, layout: Mapping[str, dict[str, list]]) -> list[str]:
    """Add charts to the pending layout of each TensorBoard run; returns the runs' log dirs."""
    dirs = []
    if not trainer.is_global_zero or not layout:
        return dirs
    for logger in tensorboard_loggers(trainer):
        writer = logger.experiment
        pending = _LAYOUTS.setdefault(writer, _PendingLayout())
        for category, charts in layout.items():
            pending.layout.setdefault(category, {}).update(charts)
        pending.written = False
        dirs.append(logger.log_dir)
    return dirs


def write_pending_layouts(trainer: pl.Trainer) -> None:
    """Write the merged layout of each TensorBoard run that has not had it yet."""
    if not trainer.is_global_zero:
        return
    for logger in tensorboard_loggers(trainer):
        writer = logger.experiment
        pending = _LAYOUTS.get(writer)
        if pending is not None and not pending.written and pending.layout:
            writer.add_custom_scalars(pending.layout)
            pending.written = True


def write_histograms(trainer: pl.Trainer, stats: GlobalStats) -> None:
    """Histograms of mask values and router weights (finite values in ``[0, 1]``)."""
    if not trainer.is_global_zero:
        return
    writers = [lg.experiment for lg in tensorboard_loggers(trainer)]
    if not writers:
        return
    for block, bs in stats.blocks.items():
        for name, counts in bs.histograms.items():
            num = sum(counts)
            if num <= 0:
                continue
            bins = len(counts)
            limits = [(i + 1) / bins for i in range(bins)]
            centers = [(i + 0.5) / bins for i in range(bins)]
            nonzero = [i for i, c in enumerate(counts) if c > 0]
            for writer in writers:
                writer.add_histogram_raw(
                    histogram_tag(block, name),
                    min=nonzero[0] / bins,
                    max=(nonzero[-1] + 1) / bins,
                    num=int(num),
                    sum=sum(c * x for c, x in zip(counts, centers, strict=True)),
                    sum_squares=sum(c * x * x for c, x in zip(counts, centers, strict=True)),
                    bucket_limits=limits,
                    bucket_counts=counts,
                    global_step=stats.step,
                )
