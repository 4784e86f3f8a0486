"""Reporting problems: each ``(block, kind)`` once, the same way on every process.

The rules themselves are declared in :mod:`lightning_attn.core.problems`; this module only
decides what a callback does with a problem it found: warn on rank zero, raise everywhere,
stop training everywhere, or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

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

    def load_state_dict(self, state: dict) -> None:
        if "reported" in state and isinstance(state["reported"], dict):
            self.reported = {str(k): int(v) for k, v in state["reported"].items()}
            self.active = {str(k) for k in state.get("active", [])}
        else:  # a checkpoint of an earlier release: key -> step, every key still active
            self.reported = {str(k): int(v) for k, v in state.items()}
            self.active = set(self.reported)
