"""Reporting problems: each ``(block, kind)`` once, the same way on every process.

The rules themselves are declared in :mod:`lightning_attn.core.problems`; this module only
decides what a callback does with a problem it found: warn on rank zero, raise everywhere,
stop training everywhere, or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lightning.pytorch.utilities import rank_zero_warn

from ..core.categories import AttentionProblemError
from ..core.problems import PROBLEM_KINDS, Problem
from ..core.validation import check_choice

__all__ = ["ON_PROBLEM", "ProblemReporter"]

#: What a callback does with a problem: warn once, raise, stop training, or nothing.
ON_PROBLEM: tuple[str, ...] = ("warn", "raise", "stop", "ignore")


class ProblemReporter:
    """Reports each ``(block, kind)`` once while it lasts, the same way on every process.

    A problem is warned about when it appears; it is not warned about again until its
    statistic has been *clear* (past the threshold by the recovery margin, see
    :class:`~lightning_attn.core.Measurement`) and the problem comes back: a mask that is
    flat at initialisation and collapses again later is warned about twice, noise around a
    threshold once.

    Args:
        on_problem: ``"warn"`` (rank-zero warning of the kind's category), ``"raise"``
            (:class:`AttentionProblemError` on every process), ``"stop"`` (the warning; the
            caller then stops training on every process at the same step) or ``"ignore"``.
    """

    def __init__(self, on_problem: str = "warn") -> None:
        self.on_problem = check_choice("on_problem", on_problem, ON_PROBLEM)
        #: ``"<block>|<kind>"`` -> step of its first report (kept in checkpoints).
        self.reported: dict[str, int] = {}
        #: The keys reported and not clear since (kept in checkpoints).
        self.active: set[str] = set()

    @staticmethod
    def key(block: str, kind: str) -> str:
        return f"{block}|{kind}"

    def active_keys(self) -> list[tuple[str, str]]:
        """The ``(block, kind)`` pairs being reported (not clear since)."""
        return [tuple(key.rsplit("|", 1)) for key in self.active]

    def fresh_keys(self, keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The ``(block, kind)`` pairs not being reported already."""
        return [(block, kind) for block, kind in keys
                if self.key(block, kind) not in self.active]

    def fresh(self, problems: Iterable[Problem]) -> list[Problem]:
        """The problems not being reported already."""
        return [p for p in problems if self.key(p.block, p.kind) not in self.active]

    def clear(self, keys: Iterable[tuple[str, str]]) -> None:
        """``(block, kind)`` pairs whose statistic is clear: a later problem warns again."""
        self.active -= {self.key(block, kind) for block, kind in keys}

    def report(self, problems: Iterable[Problem]) -> list[Problem]:
        """Warn about / raise for the problems not being reported already; returns those.

        The decision depends on the problems alone (identical on every process after the
        reduction), so every process raises, or stops, at the same step.
        """
        new = []
        for p in self.fresh(problems):
            key = self.key(p.block, p.kind)
            self.reported.setdefault(key, p.step)
            self.active.add(key)
            new.append(p)
            category = PROBLEM_KINDS[p.kind].category
            if self.on_problem in ("warn", "stop"):
                # The category's name in the text: Lightning prints its own warnings
                # (any path with "lightning" in it) without their category.
                rank_zero_warn(f"{category.__name__}: {p.message}", category=category)
            elif self.on_problem == "raise":
                raise AttentionProblemError(p.message, p.block, p.kind, p.step)
        return new

    def state_dict(self) -> dict[str, object]:
        return {"reported": dict(self.reported), "active": sorted(self.active)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s (or an earlier release's ``{key: step}``); a state
        of another shape is a ``ValueError`` saying what is wrong, and changes nothing."""
        self.reported, self.active = self.read_state(state)

    @staticmethod
    def read_state(state: object) -> tuple[dict[str, int], set[str]]:
        """``(reported, active)`` of a checkpointed state, checked (see
        :meth:`load_state_dict`)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"reported is a {type(state).__name__}, not a mapping")
        current = "reported" in state and isinstance(state["reported"], Mapping)
        # An earlier release kept key -> step only, every key still active.
        reported = state["reported"] if current else state
        active = state.get("active", []) if current else list(reported)
        for key, step in reported.items():
            if not isinstance(key, str) or "|" not in key or not isinstance(step, int) or (
                    isinstance(step, bool)):
                raise ValueError(f"reported holds {key!r}: {step!r}, not 'block|kind': step")
        if not isinstance(active, (list, tuple, set)) or not all(k in reported for k in active):
            raise ValueError(f"reported's active keys {active!r} are not all reported keys")
        return dict(reported), set(active)
