"""TemperatureSchedule: anneal the gate temperature of attention blocks during training.

Dynamic convolution anneals its softmax temperature from high to 1 over the first epochs, so
that every branch gets trained before the attention sharpens. This callback does the same for
every block with a temperature (:class:`~lightning_attn.blocks.DynamicSpatialAttention`, or any
block with a ``set_temperature(value)`` method): a high ``T`` keeps DSA's gate
``sigmoid(wlogit / T)`` away from 0 and 1 (no saturation, gradient everywhere) while the
branches learn, then the gate sharpens to ``end``.

How the value travels, and why it is safe:

- The value is a function of the Trainer's counters alone (``global_step`` or
  ``current_epoch``), so every DDP process computes the same one, and a resumed run (whose
  counters come from the checkpoint) continues the curve where it stopped.
- It is written *in place* into the tensor the forward already reads (the buffer ``T``, or
  ``t_raw`` of a learnable temperature) through ``block.set_temperature``: a compiled graph
  sees a changed input, never a new constant, so nothing recompiles.
- The diagnostics read ``block.attention_parameters()``, which returns that tensor: the
  scheduled values are the ``attn/<block>/param/temperature`` trajectory and the report's.
- While the schedule holds a learnable temperature, its gradient is dropped after each
  backward: the optimizer neither moves it nor builds moments for it (no gradient norm is
  logged for it until the hand-off). With ``handoff="learnable"`` the optimizer takes it
  over from ``end``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..blocks.discovery import find_attention_blocks
from ..core.tensor_checks import check_float32_temperature
from ..core.validation import check_choice, check_int, check_patterns, check_positive_float

__all__ = ["HANDOFFS", "INTERVALS", "MODES", "TemperatureSchedule"]

Mode = Literal["linear", "cosine", "exponential"]
Interval = Literal["step", "epoch"]
Handoff = Literal["fixed", "learnable"]
#: The schedule's shapes, the counters it follows, and what happens after it.
MODES: tuple[str, ...] = ("linear", "cosine", "exponential")
INTERVALS: tuple[str, ...] = ("step", "epoch")
HANDOFFS: tuple[str, ...] = ("fixed", "learnable")

#: The block attribute naming the schedule that holds it (a weak reference, dropped from
#: copies like the recording state): two schedules writing one temperature is an error.
_OWNER = "_attn_schedule_owner"


def _owner(block: nn.Module) -> TemperatureSchedule | None:
    ref = block.__dict__.get(_OWNER)
    return ref() if ref is not None else None


def _temperature_value(name: str, value: object) -> float:
    return check_float32_temperature(check_positive_float(name, value), name)


def _has_temperature(block: nn.Module) -> bool:
    return callable(getattr(block, "set_temperature", None)) and (
        "temperature" in block.attention_parameters()
    )


class TemperatureSchedule(Callback):
    """Set the temperature of attention blocks by a schedule: ``start`` -> ``end``.

    With ``n`` the Trainer's ``global_step`` (``interval="step"``: optimizer steps taken) or
    ``current_epoch`` (``interval="epoch"``) and ``t = min(n / duration, 1)``:

    - ``"linear"``: ``start + (end - start) * t``
    - ``"cosine"``: ``end + (start - end) * (1 + cos(pi * t)) / 2``
    - ``"exponential"``: ``start * (end / start) ** t`` (geometric: equal ratios per step)

    The value for ``n`` is written before the batch's forward (and before the sanity check
    and the first batch of a run or a resumed run). After ``duration`` the temperature stays
    at ``end`` (``handoff="fixed"``, the schedule keeps holding it) or is handed to the
    optimizer from ``end`` (``handoff="learnable"``: needs ``learnable_temperature=True``).

    Args:
        start: temperature at ``n = 0`` (``> 0``; above the block's ``eps`` if learnable).
        end: temperature from ``n = duration`` on (``> 0``).
        duration: steps or epochs from ``start`` to ``end`` (``>= 1``).
        interval: ``"step"`` (optimizer steps) or ``"epoch"``.
        mode: ``"linear"``, ``"cosine"`` or ``"exponential"``.
        handoff: after the schedule: ``"fixed"`` at ``end`` or ``"learnable"``.
        include, exclude: fnmatch patterns on the blocks' qualified names (as the diagnostics
            name them, e.g. ``net.features.attn2.block``); ``None`` includes every block with
            a temperature.

    A learnable temperature held above the diagnostics' ``temperature_max`` (20) counts as a
    drift there: start at or below it, or raise the threshold.

    Example::

        Trainer(callbacks=[TemperatureSchedule(start=4.0, end=1.0, duration=2,
                                               interval="epoch"), AttentionDiagnostics()])
    """

    def __init__(
        self,
        start: float = 4.0,
        end: float = 1.0,
        duration: int = 2,
        interval: Interval = "epoch",
        mode: Mode = "cosine",
        handoff: Handoff = "fixed",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self.start = _temperature_value("start", start)
        self.end = _temperature_value("end", end)
        self.duration = check_int("duration", duration, 1)
        self.interval = check_choice("interval", interval, INTERVALS)
        self.mode = check_choice("mode", mode, MODES)
        self.handoff = check_choice("handoff", handoff, HANDOFFS)
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        #: The counter and value last written (``None`` before the first write).
        self.last_count: int | None = None
        self.last_value: float | None = None
        self._blocks: dict[str, nn.Module] = {}

    # -- the schedule ----------------------------------------------------------------------
    def value_at(self, count: int) -> float:
        """The temperature at counter value ``count`` (steps or epochs, ``>= 0``)."""
        count = check_int("count", count, 0)
        t = min(count / self.duration, 1.0)
        if self.mode == "linear":
            return self.start + (self.end - self.start) * t
        if self.mode == "cosine":
            return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * t)) / 2.0
        return self.start * (self.end / self.start) ** t

    def count(self, trainer: pl.Trainer) -> int:
        """The counter the schedule follows: ``global_step`` or ``current_epoch``."""
        return int(trainer.global_step if self.interval == "step" else trainer.current_epoch)

    def holds(self, count: int) -> bool:
        """Whether the schedule sets the temperature at ``count`` (always with
        ``handoff="fixed"``; up to and including ``duration`` with ``"learnable"``)."""
        return self.handoff == "fixed" or count <= self.duration

    @property
    def block_names(self) -> list[str]:
        """Qualified names of the blocks being scheduled (after the fit has started)."""
        return list(self._blocks)

    @property
    def state_key(self) -> str:
        # Keyed on the blocks it schedules: two schedules on disjoint blocks keep their states.
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # -- binding ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's setup: the blocks exist on their device.
        self._bind(pl_module)

    def _bind(self, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        found, _ = find_attention_blocks(pl_module)
        candidates = {n: b for n, b in found.items() if _has_temperature(b)}
        blocks, unmatched = find_attention_blocks(pl_module, self.include, self.exclude)
        blocks = {n: b for n, b in blocks.items() if n in candidates}
        for pattern in unmatched:
            rank_zero_warn(f"{owner}: pattern {pattern!r} matches no attention block")
        if not blocks:
            raise ValueError(
                f"{owner} found no attention block with a temperature (DynamicSpatialAttention"
                f" or a block with set_temperature) in {type(pl_module).__name__}"
                + (f" matching include={list(self.include)}" if self.include else "")
                + (f" and exclude={list(self.exclude)}" if self.exclude else "")
                + (f"; blocks with a temperature: {sorted(candidates)}" if candidates else "")
            )
        fixed = [n for n, b in blocks.items() if not self._learnable(b)]
        if self.handoff == "learnable" and fixed:
            raise ValueError(
                f"{owner}(handoff='learnable') hands the temperature to the optimizer, but "
                f"these blocks have a fixed one: {fixed}; construct them with "
                "learnable_temperature=True, or use handoff='fixed'"
            )
        for name, block in blocks.items():
            eps = float(getattr(block, "eps", 0.0)) if self._learnable(block) else 0.0
            low = min(self.start, self.end)
            if low <= eps:
                raise ValueError(
                    f"{owner}: start={self.start} and end={self.end} must exceed eps={eps} of "
                    f"block {name!r}: its learnable T = softplus(t_raw) + eps is always above "
                    "eps"
                )
            other = _owner(block)
            if other is not None and other is not self and other._blocks:
                raise ValueError(
                    f"block {name!r} is already scheduled by another {owner}; give each "
                    "schedule its own blocks (include=/exclude= patterns)"
                )
        self._release()
        self._blocks = dict(blocks)
        for block in blocks.values():
            block.__dict__[_OWNER] = weakref.ref(self)

    @staticmethod
    def _learnable(block: nn.Module) -> bool:
        return "temperature" in block.trainable_attention_parameters()

    def _release(self) -> None:
        for block in self._blocks.values():
            if _owner(block) is self:
                del block.__dict__[_OWNER]
        self._blocks = {}

    # -- writing ---------------------------------------------------------------------------
    def _apply(self, trainer: pl.Trainer) -> None:
        count = self.count(trainer)
        if not self._blocks or not self.holds(count):
            return
        value = self.value_at(count)
        for block in self._blocks.values():
            block.set_temperature(value)  # in place: no new tensor, no recompilation
        self.last_count, self.last_value = count, value

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)  # the loops are restored by now: the resumed value

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A held learnable temperature is not the optimizer's: drop its gradient, so that
        # it is neither stepped nor decayed, and no optimizer state builds up for it.
        if not self._blocks or not self.holds(self.count(trainer)):
            return
        for block in self._blocks.values():
            param = block.trainable_attention_parameters().get("temperature")
            if param is not None:
                param.grad = None

    # -- cleanup, checkpointing ------------------------------------------------------------
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    def state_dict(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "duration": self.duration,
            "interval": self.interval, "mode": self.mode, "handoff": self.handoff,
            "last_count": self.last_count, "last_value": self.last_value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict.get(k) for k in ("start", "end", "duration", "interval", "mode",
                                                 "handoff")}
        current = {k: getattr(self, k) for k in saved}
        changed = {k: (saved[k], current[k]) for k in saved if saved[k] != current[k]}
        if changed:  # a resumed run may change its schedule: say so, follow the new one
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's schedule differs from this one "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                + "; the new schedule applies from the resumed step"
            )
        self.last_count = state_dict.get("last_count")
        self.last_value = state_dict.get("last_value")

    def __getstate__(self) -> dict[str, Any]:
        # Configuration travels (ddp_spawn); the bound blocks do not.
        state = self.__dict__.copy()
        state["_blocks"] = {}
        return state
