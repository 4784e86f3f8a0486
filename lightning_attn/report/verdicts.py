"""Thresholds, warnings and a one-line verdict per block, by the callbacks' own health rules.

* Thresholds: the run's ``attn/config`` text (``{"thresholds": {...}}``) when it has one,
  else :class:`HealthThresholds` defaults (said on the page).
* Warnings: exactly the ``attn/problems`` texts the callback wrote; for a run without them
  (CSV logs, older callbacks, ``on_problem="ignore"``) :func:`find_problems` is run on every
  logged training point and the first problem of each ``(block, kind)`` is kept, as the
  callback's reporter does.
* Verdict: :func:`find_problems` at the block's last logged training point, plus the
  warnings given before.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..callbacks.health import PROBLEM_KINDS, HealthThresholds, Problem, find_problems
from .reading import RunLog
from .series import RunTags
from .statistics import stats_from_scalars, training_points

__all__ = [
    "VERDICTS",
    "RunHealth",
    "Verdict",
    "judge_run",
    "split_remedy",
    "thresholds_from_config",
    "verdict_phrase",
]

#: Problem kind -> (verdict phrase, the quantity its value measures).
VERDICTS: dict[str, tuple[str, str]] = {
    "mask_collapse": ("collapsed", "mask std"),
    "mask_saturation": ("saturated", "saturated share"),
    "router_collapse": ("router collapsed onto one branch", "normalised entropy"),
    "router_indifference": ("router ignoring its input", "normalised entropy"),
    "dead_branch": ("dead branch", "branch weight"),
    "nonfinite": ("non-finite values", "quantities"),
    "parameter_drift": ("drifting parameter", "parameter"),
}
SECTIONS = ("mask", "router", "param")


def verdict_phrase(kind: str) -> str:
    """Short phrase for a problem kind (``"collapsed"``, ``"dead branch"``, ...); a kind this
    version does not know gets its title from ``PROBLEM_KINDS`` or its name."""
    if kind in VERDICTS:
        return VERDICTS[kind][0]
    if kind in PROBLEM_KINDS:
        return PROBLEM_KINDS[kind].title
    return kind.replace("_", " ")


def split_remedy(message: str) -> tuple[str, str]:
    """``(what happened, what to try)`` of a problem message (``"... Try: ...".``)."""
    text, sep, remedy = message.partition(" Try: ")
    return (text, remedy.rstrip(".")) if sep else (message, "")


def _num(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def describe(p: Problem) -> str:
    """``"mask std 0.0031 < 0.02"``: the problem's value against its threshold."""
    quantity = VERDICTS.get(p.kind, ("", "value"))[1]
    if p.kind == "parameter_drift":
        # which parameter is in the message only ("learnable alpha_h = 1.02 outside [0, 1]")
        named = re.search(r"learnable (\w+) = ", p.message)
        quantity = named.group(1) if named else quantity
    if p.kind == "nonfinite":
        return f"NaN or Inf in {_num(p.value)} {quantity}"
    relation = "<" if p.value < p.threshold else ">"
    return f"{quantity} {_num(p.value)} {relation} {_num(p.threshold)}"


@dataclass(frozen=True)
class Verdict:
    """The verdict on one block.

    Attributes:
        status: ``"healthy"``, ``"problem"`` (problems at the last point), ``"recovered"``
            (warned before, fine at the last point) or ``"no data"``.
        text: the one-line verdict.
        kinds: the problem kinds at the last point.
        step: the last training step with statistics of the block.
    """

    block: str
    status: str
    text: str
    kinds: tuple[str, ...] = ()
    step: int | None = None


@dataclass
class RunHealth:
    """Thresholds, warnings and verdicts of one run (see the module docstring)."""

    thresholds: HealthThresholds
    thresholds_source: str
    warnings: list[Problem]
    warnings_source: str
    verdicts: dict[str, Verdict]
    notes: list[str] = field(default_factory=list)

    def block_warnings(self, block: str) -> list[Problem]:
        return [p for p in self.warnings if p.block == block]


def thresholds_from_config(
    config: Mapping[str, Any] | None,
) -> tuple[HealthThresholds, str, list[str]]:
    """``(thresholds, where they come from, notes)`` from an ``attn/config`` document."""
    defaults = HealthThresholds()
    given = (config or {}).get("thresholds")
    if not isinstance(given, Mapping):
        why = "the run has no attn/config" if config is None else "attn/config has none"
        return defaults, f"defaults ({why})", []
    known = {f.name for f in dataclasses.fields(HealthThresholds)}
    notes = []
    unknown = sorted(set(given) - known)
    if unknown:
        notes.append(f"thresholds unknown to this version, ignored: {', '.join(unknown)}")
    try:
        thresholds = HealthThresholds(**{k: v for k, v in given.items() if k in known})
    except (TypeError, ValueError) as err:
        notes.append(f"the run's thresholds are invalid ({err}); defaults used")
        return defaults, "defaults (the run's were invalid)", notes
    return thresholds, "the run's attn/config", notes


def _problem_from_json(doc: Mapping[str, Any]) -> Problem:
    return Problem(
        block=str(doc["block"]), kind=str(doc["kind"]), value=float(doc["value"]),
        threshold=float(doc["threshold"]), step=int(doc["step"]), message=str(doc["message"]),
    )


def _logged_problems(tags: RunTags, notes: list[str]) -> list[Problem] | None:
    """The callback's own warnings, or ``None`` when the run does not carry them."""
    config = tags.config or {}
    if tags.problems is None and (not config or config.get("on_problem") == "ignore"):
        return None
    out = []
    for doc in tags.problems or []:
        try:
            out.append(_problem_from_json(doc))
        except (KeyError, TypeError, ValueError):
            notes.append(f"an attn/problems entry lacks a field or has a bad value: {doc}")
    return out


def judge_run(run: RunLog, tags: RunTags) -> RunHealth:
    """Thresholds, warnings and the verdict of each block of ``run``."""
    thresholds, source, notes = thresholds_from_config(tags.config)
    sections = (tags.config or {}).get("sections")
    sections = frozenset(sections if isinstance(sections, list) else SECTIONS)
    trainable = {b: tags.trainable(b) for b in tags.train}

    # The health rules on every logged training point (the last one of each block decides
    # its verdict; all of them give the warnings when the run did not log its own).
    first: dict[tuple[str, str], Problem] = {}
    last_step: dict[str, int] = {}
    at_step: dict[int, list[Problem]] = {}
    for step, scalars in training_points(run):
        stats = stats_from_scalars(step, scalars, trainable)
        problems = find_problems(stats, thresholds, tuple(PROBLEM_KINDS), sections)
        at_step[step] = problems
        for block in stats.blocks:
            last_step[block] = step
        for p in problems:
            first.setdefault((p.block, p.kind), p)

    logged = _logged_problems(tags, notes)
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
        if block not in last_step:
            verdicts[block] = Verdict(block, "no data", "no training statistics logged")
            continue
        step = last_step[block]
        active = [p for p in at_step.get(step, []) if p.block == block]
        verdicts[block] = _verdict(block, step, active, [p for p in warnings if p.block == block])
    return RunHealth(thresholds, source, warnings, warnings_source, verdicts, notes)


def _verdict(
    block: str, step: int, active: Sequence[Problem], warned: Sequence[Problem]
) -> Verdict:
    since = {p.kind: p.step for p in warned}
    if active:
        parts = []
        for p in active:
            start = since.get(p.kind)
            when = f", since step {start}" if start is not None and start < step else ""
            parts.append(f"{verdict_phrase(p.kind)} ({describe(p)} at step {step}{when})")
        return Verdict(block, "problem", "; ".join(parts), tuple(p.kind for p in active), step)
    if warned:
        earlier = ", ".join(f"{verdict_phrase(p.kind)} at step {p.step}" for p in warned)
        return Verdict(
            block, "recovered", f"fine at the last step ({step}); warned earlier: {earlier}",
            (), step,
        )
    text = f"no problem at any logged step (up to step {step})"
    return Verdict(block, "healthy", text, (), step)
