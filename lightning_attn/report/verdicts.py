"""Thresholds, warnings and a verdict per block, by the core's own rules
(:mod:`lightning_attn.core.problems`).

* Thresholds: the run's ``attn/config`` text (``{"thresholds": {...}}``) when it has one,
  else :class:`HealthThresholds` defaults (said on the page).
* Warnings: exactly the ``attn/problems`` records the callback wrote; for a run without them
  (CSV logs, older callbacks, ``on_problem="ignore"``) the rules run on every logged point
  and the first problem of each ``(block, kind)`` is kept, as the callback's reporter does.
* Verdict (:func:`lightning_attn.core.problems.verdict`): the measurements of every logged
  training point and the warnings given, with a recovery margin so that noise around a
  threshold does not flip it. A run with no training point (an evaluation of a checkpoint)
  is judged on its evaluation points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.problems import (
    PROBLEM_KINDS,
    HealthThresholds,
    Measurement,
    Problem,
    Verdict,
    find_problems,
    measure,
    verdict,
)
from ..core.statistics import SECTIONS
from .reading import RunLog
from .series import RunTags
from .statistics import points, stats_from_scalars

__all__ = ["RunHealth", "judge_run", "thresholds_from_config"]


@dataclass
class RunHealth:
    """Thresholds, warnings and verdicts of one run (see the module docstring).

    ``phase``: the points the verdicts were judged on (``"train"``, or an evaluation
    phase for a run without training points).
    """

    thresholds: HealthThresholds
    thresholds_source: str
    warnings: list[Problem]
    warnings_source: str
    verdicts: dict[str, Verdict]
    notes: list[str] = field(default_factory=list)
    phase: str = "train"

    def block_warnings(self, block: str) -> list[Problem]:
        return [p for p in self.warnings if p.block == block]


def thresholds_from_config(
    config: Mapping[str, Any] | None,
) -> tuple[HealthThresholds, str, list[str]]:
    """``(thresholds, where they come from, notes)`` from an ``attn/config`` document."""
    given = (config or {}).get("thresholds")
    if not isinstance(given, Mapping):
        why = "the run has no attn/config" if config is None else "attn/config has none"
        return HealthThresholds(), f"defaults ({why})", []
    try:
        thresholds, notes = HealthThresholds.from_json(given)
    except (TypeError, ValueError) as err:
        return (HealthThresholds(), "defaults (the run's were invalid)",
                [f"the run's thresholds are invalid ({err}); defaults used"])
    return thresholds, "the run's attn/config", notes


def _logged_problems(tags: RunTags, notes: list[str]) -> list[Problem] | None:
    """The callback's own warnings, or ``None`` when the run does not carry them."""
    config = tags.config or {}
    if tags.problems is None and (not config or config.get("on_problem") == "ignore"):
        return None
    out = []
    for doc in tags.problems or []:
        try:
            out.append(Problem.from_json(doc))
        except (KeyError, TypeError, ValueError):
            notes.append(f"an attn/problems entry lacks a field or has a bad value: {doc}")
    return out


def _judged_phase(tags: RunTags) -> str:
    """``"train"``, unless the run is an evaluation (``validate`` / ``test`` of a checkpoint,
    or an older run with evaluation points only): then its evaluation points are judged. A
    fit that logged no training point yet keeps "no data"."""
    fn = (tags.config or {}).get("fn")
    if tags.train or not tags.blocks or fn not in (None, "validate", "test"):
        return "train"
    return next(p for p in ("test", "val", *tags.blocks) if p in tags.blocks)


def judge_run(run: RunLog, tags: RunTags) -> RunHealth:
    """Thresholds, warnings and the verdict of each block of ``run``."""
    thresholds, source, notes = thresholds_from_config(tags.config)
    sections = (tags.config or {}).get("sections")
    sections = frozenset(sections if isinstance(sections, list) else SECTIONS)
    infos = tags.infos()
    phase = _judged_phase(tags)
    if phase != "train":
        notes.append(f"an evaluation run: the verdicts judge its {phase} points (the callback "
                     "warns about training points only)")

    # The rules on every logged point (every measurement decides the verdict; the first
    # problem of each (block, kind) gives the warnings when the run did not log its own).
    first: dict[tuple[str, str], Problem] = {}
    history: dict[str, list[tuple[int, dict[str, Measurement]]]] = {}
    for step, scalars in points(run, phase):
        stats = stats_from_scalars(step, scalars, infos, phase)
        measured = measure(stats, thresholds, tuple(PROBLEM_KINDS), sections)
        for block in stats.blocks:
            history.setdefault(block, []).append(
                (step, {k: m for (b, k), m in measured.items() if b == block}))
        for p in find_problems(stats, thresholds, tuple(PROBLEM_KINDS), sections):
            first.setdefault((p.block, p.kind), p)

    logged = _logged_problems(tags, notes) if phase == "train" else None
    if logged is not None:
        warnings, warnings_source = logged, "logged by the callback (attn/problems)"
    else:
        warnings = list(first.values())
        warnings_source = (
            "recomputed from the logged statistics with the thresholds above (the run has "
            "no attn/problems)"
        )
    order = {b: i for i, b in enumerate(tags.block_names())}
    warnings.sort(key=lambda p: (p.step, order.get(p.block, len(order)), p.kind))
    verdicts = {}
    for block in tags.block_names():
        warned: dict[str, int] = {}
        for p in warnings:  # in step order: a kind warned again (after it cleared) keeps
            if p.block == block:  # its latest warning, which a recovery must outlast
                warned[p.kind] = p.step
        verdicts[block] = verdict(block, history.get(block, []), warned)
    return RunHealth(thresholds, source, warnings, warnings_source, verdicts, notes, phase)
