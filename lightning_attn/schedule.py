"""The one place that decides, from the Trainer's counters, which training batches are measured.

The rule is Lightning's own (``_LoggerConnector.should_update_logs``): a batch belongs to a
logging point when ``(batches_that_stepped + 1) % log_every_n_steps == 0``, where
``batches_that_stepped`` counts optimizer steps taken so far, and the point is logged at step
``batches_that_stepped`` — the step of the module's own ``self.log`` values of that batch.
With gradient accumulation every micro-batch of that optimizer step satisfies the rule, so a
point covers *all* micro-batches of the optimizer step (the effective batch) and is finished
on the micro-batch that steps the optimizer. With manual optimization every batch counts as
one step, as in Lightning's logging.

Unlike Lightning we do not add a point when ``trainer.should_stop`` is set, so a run of ``S``
optimizer steps has exactly ``S // log_every_n_steps`` points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from .core.validation import check_int

__all__ = ["LoggingSchedule"]


class LoggingSchedule:
    """Which training batches feed a logging point (scalars) or a histogram point.

    Args:
        log_every_n_steps: interval in optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``; ``0`` never.
        histogram_every_n_steps: interval of histogram points; ``None`` is ten times the
            scalar interval; ``0`` never.
    """

    def __init__(
        self, log_every_n_steps: int | None = None, histogram_every_n_steps: int | None = None
    ) -> None:
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps",
                                                             log_every_n_steps, 0)
        )
        self.histogram_every_n_steps = (
            None if histogram_every_n_steps is None
            else check_int("histogram_every_n_steps", histogram_every_n_steps, 0)
        )

    def interval(self, trainer: pl.Trainer) -> int:
        """The scalar interval in force for ``trainer``."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return int(trainer.log_every_n_steps)

    def histogram_interval(self, trainer: pl.Trainer) -> int:
        """The histogram interval in force for ``trainer`` (``0``: no histograms)."""
        if self.histogram_every_n_steps is not None:
            return self.histogram_every_n_steps
        return 10 * self.interval(trainer)

    @staticmethod
    def step(trainer: pl.Trainer) -> int:
        """The step a point of the current batch is logged at (Lightning's logging step)."""
        return trainer.fit_loop.epoch_loop._batches_that_stepped

    def decide(self, trainer: pl.Trainer) -> tuple[bool, bool]:
        """``(scalars, histograms)`` for the training batch about to run.

        Call in ``on_train_batch_start``. Sanity checking and validation never count. The
        answer depends on counters only, so it is the same on every process.
        """
        if trainer.sanity_checking or not trainer.training:
            return False, False
        step = self.step(trainer) + 1
        every, hist_every = self.interval(trainer), self.histogram_interval(trainer)
        return (every > 0 and step % every == 0, hist_every > 0 and step % hist_every == 0)

    @staticmethod
    def checkpoint_step(checkpoint: Mapping[str, Any]) -> int | None:
        """The step of the weights in a Lightning ``checkpoint``: where the fit logged its
        points about them, ``None`` in a checkpoint without Lightning's counters.

        Weights after ``k`` optimizer steps were validated at step ``k - 1`` (Lightning
        counts the step of a batch after its hooks and validation), and a checkpoint's
        ``global_step`` is ``k`` whenever it was saved. Its loop counter
        (``_batches_that_stepped``) says ``k - 1`` or ``k`` depending on when it was saved,
        and is used only with several optimizer steps per batch (``global_step`` then counts
        them all). An evaluation of the checkpoint is logged at this step, where the fit
        logged these weights, not at the evaluating Trainer's own counter (0 in a new
        Trainer: ``validate``/``test`` restore the weights, not the loops)."""
        optimizer_steps = checkpoint.get("global_step")
        if not isinstance(optimizer_steps, int) or optimizer_steps < 0:
            return None
        try:
            epoch_loop = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
            batches = int(epoch_loop["_batches_that_stepped"])
        except (KeyError, TypeError, ValueError):
            batches = optimizer_steps
        if optimizer_steps - batches in (0, 1):  # one optimizer step per batch
            return max(optimizer_steps - 1, 0)
        return batches

    @staticmethod
    def steps_optimizer(trainer: pl.Trainer) -> bool:
        """Whether the current training batch ends an optimizer step (not accumulating)."""
        return not trainer.fit_loop._should_accumulate()
