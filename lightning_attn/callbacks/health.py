"""Reporting problems: each ``(block, kind)`` once, the same way on every process.

The rules themselves are declared in :mod:`lightning_attn.core.problems`; this module only
decides what a callback does with a problem it found: warn on rank zero, raise everywhere,
stop training everywhere, or nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.utilities import rank_zero_warn

from ..core.problems import PROBLEM_KINDS, Problem
from ..core.validation import check_choice
from ..core.warnings import AttentionProblemError

__all__ = ["ON_PROBLEM", "ProblemReporter"]

#: What a callback does with a problem: warn once, raise, stop training, or nothing.
ON_PROBLEM: tuple[str, ...] = ("warn", "raise", "stop", "ignore")


class ProblemReporter:
    """Reports each ``(block, kind)`` at most once, the same way on every process.

    Args:
        on_problem: ``"warn"`` (rank-zero warning of the kind's category), ``"raise"``
            (:class:`AttentionProblemError` on every process), ``"stop"`` (the warning; the
            caller then stops training on every process at the same step) or ``"ignore"``.
    """

    def __init__(self, on_problem: str = "warn") -> None:
        self.on_problem = check_choice("on_problem", on_problem, ON_PROBLEM)
        #: ``"<block>|<kind>"`` -> step of the first report (kept in checkpoints).
        self.reported: dict[str, int] = {}

    @staticmethod
    def key(block: str, kind: str) -> str:
        return f"{block}|{kind}"

    def fresh(self, problems: Iterable[Problem]) -> list[Problem]:
        """The problems not reported before."""
        return [p for p in problems if self.key(p.block, p.kind) not in self.reported]

    def report(self, problems: Iterable[Problem]) -> list[Problem]:
        """Warn about / raise for the problems not reported before; returns those.

        The decision depends on the problems alone (identical on every process after the
        reduction), so every process raises, or stops, at the same step.
        """
        new = []
        for p in self.fresh(problems):
            self.reported[self.key(p.block, p.kind)] = p.step
            new.append(p)
            if self.on_problem in ("warn", "stop"):
                rank_zero_warn(p.message, category=PROBLEM_KINDS[p.kind].category)
            elif self.on_problem == "raise":
                raise AttentionProblemError(p.message, p.block, p.kind, p.step)
        return new

    def state_dict(self) -> dict[str, int]:
        return dict(self.reported)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.reported = {str(k): int(v) for k, v in state.items()}
