"""The one place that decides, from the Trainer's counters, which training batches are measured.

The rule is Lightning's own (``_LoggerConnector.should_update_logs``): a batch belongs to a
logging point when ``(batches_that_stepped + 1) % log_every_n_steps == 0``, where
``batches_that_stepped`` counts optimizer steps taken so far. With gradient accumulation every
micro-batch of that optimizer step satisfies the rule, so the statistics of a logging point
cover *all* micro-batches of the optimizer step (the effective batch), and the point is
finished on the micro-batch that steps the optimizer: one point per optimizer step.

Unlike Lightning we do not add a point when ``trainer.should_stop`` is set, so a run of
``S`` optimizer steps has exactly ``S // log_every_n_steps`` points.
"""

from __future__ import annotations

import lightning.pytorch as pl

from ._checks import check_interval

__all__ = ["LoggingSchedule"]


class LoggingSchedule:
    """Which training batches feed a logging point (scalars) or a histogram point.

    Args:
        log_every_n_steps: interval in optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``; ``0`` never.
        histogram_every_n_steps: interval of histogram points; ``0`` (default) never.
    """

    def __init__(self, log_every_n_steps: int | None = None, histogram_every_n_steps: int = 0):
        self.log_every_n_steps = check_interval("log_every_n_steps", log_every_n_steps, True)
        self.histogram_every_n_steps = check_interval(
            "histogram_every_n_steps", histogram_every_n_steps
        )

    def interval(self, trainer: pl.Trainer) -> int:
        """The scalar interval in force for ``trainer``."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return int(trainer.log_every_n_steps)

    def decide(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        """``(scalars, histograms)`` for the training batch about to run.

        Call in ``on_train_batch_start``. Sanity checking and validation never count. The
        answer depends on counters only, so it is the same on every process.
        """
        if trainer.sanity_checking or not trainer.training:
            return False, False
        step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
        every = self.interval(trainer)
        hist_every = self.histogram_every_n_steps or 0
        return (every > 0 and step % every == 0, hist_every > 0 and step % hist_every == 0)

    @staticmethod
    def steps_optimizer(trainer: pl.Trainer) -> bool:
        """Whether the current training batch ends an optimizer step (not accumulating)."""
        return not trainer.fit_loop._should_accumulate()
