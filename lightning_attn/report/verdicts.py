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

Every point is judged, also in a run whose curves were kept as envelopes
(:mod:`.curves`): its scalars are read again point by point (:func:`~.reading.replay`).
What the verdict reads of each point is kept compactly (:class:`CompactHistory`: runs of
equal outcomes), not the measurements themselves. The same pass pins each warning's point
on the curves of its block, draws the derived curves (the saturated share) from every point,
and rebuilds the curves of a run joined from several versions in the joined step order.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ..core.problems import (
    PROBLEM_KINDS,
    HealthThresholds,
    Measured,
    Measurement,
    Problem,
    Verdict,
    measure_point,
    verdict,
)
from ..core.statistics import SECTIONS, Quantity, all_quantities
from ..core.tags import CONFIG_TAG, PROBLEMS_TAG
from .curves import Series, SeriesBuilder
from .reading import RunLog, replay
from .series import BlockSeries, RunTags
from .statistics import LoggedPlan, logged_columns, logged_plan, parse_tag, points

__all__ = ["CompactHistory", "RunHealth", "StreamJudge", "judge_run", "thresholds_from_config"]


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


# -- what the verdict reads of every point, kept compactly -------------------------------
_KINDS = tuple(PROBLEM_KINDS)
_ABSENT, _CLEAR, _NOT_CLEAR = 0, 1, 2
#: Stand-ins for the measurements before the last point: :func:`verdict` reads only whether
#: each kind was measured and whether it was clear there.
_SEEN = {
    _CLEAR: Measurement(float("nan"), float("nan"), False, True, "", ""),
    _NOT_CLEAR: Measurement(float("nan"), float("nan"), False, False, "", ""),
}


class _Outcomes(Mapping):
    """One point's outcome per kind, as :func:`verdict` reads it (``get(kind)``)."""

    __slots__ = ("codes",)

    def __init__(self, codes: tuple[int, ...]) -> None:
        self.codes = codes

    def __getitem__(self, kind: str) -> Measurement:
        code = self.codes[_KINDS.index(kind)] if kind in PROBLEM_KINDS else _ABSENT
        if code == _ABSENT:
            raise KeyError(kind)
        return _SEEN[code]

    def __iter__(self) -> Iterator[str]:
        return (k for k, c in zip(_KINDS, self.codes, strict=True) if c != _ABSENT)

    def __len__(self) -> int:
        return sum(c != _ABSENT for c in self.codes)


class _BlockMeasurements(Mapping):
    """kind -> :class:`Measurement` of block ``b`` of a judged batch, each made when read."""

    def __init__(self, measured: Measured, b: int) -> None:
        self._readings, self._b = measured.readings, b

    def __getitem__(self, kind: str) -> Measurement:
        r = self._readings.get(kind)
        if r is None or not r.applies[self._b]:
            raise KeyError(kind)
        return r.measurement(self._b)

    def __iter__(self):
        return iter([k for k, r in self._readings.items() if r.applies[self._b]])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CompactHistory(Sequence):
    """A block's ``(step, {kind: measurement})`` at every point, as :func:`verdict` takes it,
    in memory that grows with the changes, not the points: steps as runs of equal stride,
    outcomes (measured or not, clear or not) as runs of equal outcomes, and the last point's
    measurements whole."""

    def __init__(self) -> None:
        self._steps = array("q")  # start, stride, count of each run of steps
        self._outcomes: list[list] = []  # [codes, count]
        self._count = 0
        self._last: tuple[int, dict[str, Measurement]] | None = None

    def append(self, step: int, measured: Mapping[str, Measurement],
               codes: tuple[int, ...] | None = None) -> None:
        """``measured``: kind -> measurement of the point (kept whole for the last point
        only); ``codes``: its outcome per kind of :data:`_KINDS`, when already known."""
        if codes is None:
            codes = tuple(_ABSENT if (m := measured.get(k)) is None else
                          (_CLEAR if m.clear else _NOT_CLEAR) for k in _KINDS)
        if self._outcomes and self._outcomes[-1][0] == codes:
            self._outcomes[-1][1] += 1
        else:
            self._outcomes.append([codes, 1])
        s = self._steps
        if s and s[-1] == 1:
            s[-2] = step - s[-3]  # a run of one takes the stride to the next step
            s[-1] = 2
        elif s and step == s[-3] + s[-2] * s[-1]:
            s[-1] += 1
        else:
            s.extend((step, 0, 1))
        self._count += 1
        self._last = (step, measured)

    def __len__(self) -> int:
        return self._count

    def _step_at(self, i: int) -> int:
        s = self._steps
        for r in range(0, len(s), 3):
            if i < s[r + 2]:
                return s[r] + s[r + 1] * i
            i -= s[r + 2]
        raise IndexError(i)

    def _codes_at(self, i: int) -> tuple[int, ...]:
        for codes, count in self._outcomes:
            if i < count:
                return codes
            i -= count
        raise IndexError(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(i)
        if i == self._count - 1:
            return self._last
        return self._step_at(i), _Outcomes(self._codes_at(i))

    def __iter__(self) -> Iterator[tuple[int, Mapping[str, Measurement]]]:
        def steps() -> Iterator[int]:
            s = self._steps
            for r in range(0, len(s), 3):
                start, stride, count = s[r], s[r + 1], s[r + 2]
                yield from range(start, start + stride * count, stride) if stride else (
                    start for _ in range(count))

        def outcomes() -> Iterator[tuple[int, ...]]:
            for codes, count in self._outcomes:
                for _ in range(count):
                    yield codes

        for i, (step, codes) in enumerate(zip(steps(), outcomes(), strict=True)):
            yield (step, _Outcomes(codes)) if i < self._count - 1 else self._last


# -- one pass over every point --------------------------------------------------------------
@lru_cache(maxsize=1)
def _derived_quantities() -> tuple[Quantity, ...]:
    """The mask quantities drawn from others (the saturated share), not logged."""
    return tuple(q for q in all_quantities()
                 if q.group == "mask" and q.tag is None and q.derive is not None and q.inputs
                 and q.chart is not None)


#: Points judged at once: their columns made, and each rule read, in one call per batch.
JUDGE_BATCH = 256


def _no_pin(block: str, step: int, scalars: dict[str, float]) -> None:
    pass


@dataclass
class _Judge:
    """The health rules on each point of one phase, and what the curves need of it.

    Points are judged in batches (:data:`JUDGE_BATCH` points logging the same tags: the
    blocks of every point as the blocks of one, each block at its own step); read
    ``first`` and ``history`` after :meth:`flush`. ``pin(block, step, scalars)`` is told of
    each point the curves must keep: a warning's, logged or recomputed."""

    thresholds: HealthThresholds
    sections: frozenset[str]
    infos: Mapping[str, Any]
    phase: str
    logged_steps: set[tuple[str, int]] = field(default_factory=set)  # warnings given
    pin: Callable[[str, int, dict[str, float]], None] = _no_pin
    first: dict[tuple[str, str], Problem] = field(default_factory=dict)
    history: dict[str, CompactHistory] = field(default_factory=dict)
    _steps: list[int] = field(default_factory=list)
    _points: list[dict[str, float]] = field(default_factory=list)
    _plans: dict[tuple[str, ...], LoggedPlan] = field(default_factory=dict)

    def point(self, step: int, scalars: dict[str, float]) -> None:
        """Judge a point (with the next batch)."""
        if self._points and (len(self._points) >= JUDGE_BATCH
                             or scalars.keys() != self._points[-1].keys()):
            self.flush()
        self._steps.append(step)
        self._points.append(scalars)

    def flush(self) -> None:
        """Judge the points held."""
        if not self._points:
            return
        steps, points = self._steps, self._points
        self._steps, self._points = [], []
        tags = tuple(points[0])
        plan = self._plans.get(tags)
        if plan is None:
            plan = self._plans[tags] = logged_plan(tags, self.phase, self.infos)
        blocks = len(plan.names)
        if not blocks:
            return
        columns = logged_columns(plan, [list(p.values()) for p in points])
        measured = measure_point(columns, np.repeat(np.asarray(steps), blocks),
                                 self.thresholds, _KINDS, self.sections)
        # each block's outcome per kind from the readings' columns; a measurement in words
        # only for the last point of a block (when read) and for a first problem
        outcomes = np.full((len(_KINDS), len(columns.names)), _ABSENT)
        for i, kind in enumerate(_KINDS):
            r = measured.readings.get(kind)
            if r is not None:
                outcomes[i] = np.where(r.applies, np.where(r.clear, _CLEAR, _NOT_CLEAR),
                                       _ABSENT)
        histories = []
        for block in plan.names:
            history = self.history.get(block)
            if history is None:
                history = self.history[block] = CompactHistory()
            histories.append(history)
        pins: dict[tuple[str, int], int] = {}
        codes = iter(outcomes.T.tolist())
        for p, step in enumerate(steps):
            for b, (block, history) in enumerate(zip(plan.names, histories, strict=True)):
                history.append(step, _BlockMeasurements(measured, p * blocks + b),
                               tuple(next(codes)))
                if (block, step) in self.logged_steps:
                    pins[(block, step)] = p
        order = {kind: k for k, kind in enumerate(measured.readings)}
        bad = sorted((int(i), order[kind], kind) for kind, r in measured.readings.items()
                     for i in np.flatnonzero(r.bad))  # point, block, then kind order
        for i, _, kind in bad:
            p, block = i // blocks, plan.names[i % blocks]
            if (block, kind) not in self.first:
                self.first[(block, kind)] = measured.problem_at(i, kind, steps[p])
                pins[(block, steps[p])] = p
        for (block, step), p in pins.items():
            self.pin(block, step, points[p])


def _pin(series: Callable[[str], Series], derived: Mapping[tuple[str, str, str, str],
         SeriesBuilder], phase: str, block: str, step: int, scalars: dict[str, float]) -> None:
    """Keep a warning's point on every curve of its block: the logged ones (``series(tag)``)
    and the derived ones being drawn (``derived``)."""
    tags, groups = _routes(tuple(scalars))
    for tag, blk in tags.get(phase, ()):
        if blk == block:
            series(tag).pin(step, scalars[tag])
    for (stage, blk, mask), inputs in groups.items():
        if stage == phase and blk == block:
            here = {quantity: scalars[tag] for tag, quantity in inputs}
            for q in _derived_quantities():
                b = derived.get((stage, blk, mask, q.name))
                if b is not None and all(n in here for n in q.inputs):
                    b.series.pin(step, q.derive(here))


def _envelope_groups(tags: RunTags) -> dict[tuple[str, str, str], BlockSeries]:
    """``(stage, block, mask)`` of each mask whose derived curves have an input kept as an
    envelope (so they must be drawn from every point)."""
    out = {}
    for stage, blocks in tags.blocks.items():
        for name, bs in blocks.items():
            for mask, stats in bs.masks.items():
                if any(n in stats and not stats[n].exact
                       for q in _derived_quantities() for n in q.inputs):
                    out[(stage, name, mask)] = bs
    return out


def _to_rebuild(run: RunLog) -> set[str]:
    """The envelopes of a run joined from several versions, or read out of step order: their
    buckets may hold a value that a later one replaced, so they are built again."""
    if len(run.streams) > 1 or any(not s.ordered for s in run.streams) or any(
            not s.ordered for s in run.scalars.values()):
        return {tag for tag, s in run.scalars.items() if not s.exact}
    return set()


def _needs_replay(run: RunLog, tags: RunTags, phase: str) -> bool:
    judged = any(not s.exact for tag, s in run.scalars.items()
                 if (t := parse_tag(tag)) is not None and t.stage == phase)
    return judged or bool(_envelope_groups(tags)) or bool(_to_rebuild(run))


def _replayed(run: RunLog, tags: RunTags, judge: _Judge,
              advance: Callable[[int], None]) -> None:
    """Judge every point by reading the run again; complete its curves on the way: the
    derived ones drawn from every point, each warning's point pinned, and the envelopes of a
    run joined from several versions (or read out of step order) rebuilt in step order."""
    redo = _to_rebuild(run)
    builders = {tag: SeriesBuilder(run.scalars[tag].limit) for tag in redo}
    derived = _derived_quantities()
    groups = _envelope_groups(tags)
    derived_builders: dict[tuple[str, str, str, str], SeriesBuilder] = {}
    phases = {stage for stage, _, _ in groups} | {judge.phase}

    def wanted(tag: str) -> bool:
        parsed = parse_tag(tag)
        return tag in redo or (parsed is not None and parsed.stage in phases)

    def series(tag: str) -> Series:
        return builders[tag].series if tag in builders else run.scalars[tag]

    # where each tag's value goes: its phase, and the mask group of a derived curve
    routes: dict[str, tuple[str | None, tuple[str, str, str] | None, str]] = {}

    def route(tag: str) -> tuple[str | None, tuple[str, str, str] | None, str]:
        parsed = parse_tag(tag)
        if parsed is None:
            found = routes[tag] = (None, None, "")
        else:
            group = (parsed.stage, parsed.block, parsed.group)
            found = routes[tag] = (parsed.stage, group if group in groups else None,
                                   parsed.quantity)
        return found

    judge.pin = lambda block, step, scalars: _pin(series, derived_builders, judge.phase, block,
                                                  step, scalars)
    pending = 0
    for step, point in replay(run.streams, wanted, advance, run.scalars):
        judged: dict[str, float] = {}
        inputs: dict[tuple[str, str, str], dict[str, float]] = {}
        for tag, value in point.items():
            b = builders.get(tag)
            if b is not None:
                b.steps.append(step)
                b.values.append(value)
            stage, group, quantity = routes.get(tag) or route(tag)
            if stage == judge.phase:
                judged[tag] = value
            if group is not None:
                inputs.setdefault(group, {})[quantity] = value
        pending += len(point)
        if judged:
            judge.point(step, judged)
        for (stage, block, mask), values in inputs.items():
            for q in derived:
                if all(n in values for n in q.inputs):
                    b = derived_builders.get((stage, block, mask, q.name))
                    if b is None:
                        b = derived_builders[(stage, block, mask, q.name)] = SeriesBuilder(
                            groups[(stage, block, mask)].masks[mask][q.inputs[0]].limit)
                    b.steps.append(step)
                    b.values.append(q.derive(values))
        if pending >= 1 << 16:
            for b in (*builders.values(), *derived_builders.values()):
                b.flush()
            pending = 0
    judge.flush()
    for tag, b in builders.items():
        run.scalars[tag].assign(b.finish())
    for (stage, block, mask, name), b in derived_builders.items():
        tags.blocks[stage][block].masks[mask][name] = b.finish()


@lru_cache(maxsize=256)
def _routes(tags: tuple[str, ...]) -> tuple[dict[str, list[tuple[str, str]]],
                                            dict[tuple[str, str, str], list[tuple[str, str]]]]:
    """For a point's tags (the same at every point of a run): ``(phase -> [(tag, block)],
    (phase, block, mask) -> [(tag, quantity)])`` of the diagnostics among them."""
    phases: dict[str, list[tuple[str, str]]] = {}
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for tag in tags:
        parsed = parse_tag(tag)
        if parsed is None:
            continue
        phases.setdefault(parsed.stage, []).append((tag, parsed.block))
        if parsed.section == "mask":
            groups.setdefault((parsed.stage, parsed.block, parsed.group), []).append(
                (tag, parsed.quantity))
    return phases, groups


class StreamJudge:
    """Judges a run's points while they are first read (a :class:`~.reading.PointWatcher`),
    so that :func:`judge_run` need not read the run again: the usual run writes its
    ``attn/config`` first and its points in step order. Every phase is judged (which one the
    verdicts take is known at the end). Any doubt, and :func:`judge_run` reads the run again:
    a configuration met after the first point or changed, points out of step order (see
    :meth:`usable`)."""

    def __init__(self, collector) -> None:
        self.series = collector.series
        self.config: dict[str, Any] | None = None
        self.judges: dict[str, _Judge] = {}
        self.logged: set[tuple[str, int]] = set()  # (block, step) of attn/problems records
        self.derived: dict[tuple[str, str, str, str], SeriesBuilder] = {}
        self.limit = collector.limit
        self.valid = True
        self.last_step: int | None = None

    def text(self, tag: str, step: int, text: str) -> None:
        if tag not in (CONFIG_TAG, PROBLEMS_TAG):
            return
        try:
            doc = json.loads(text)
        except ValueError:
            return
        if tag == CONFIG_TAG:
            if not isinstance(doc, dict):
                return
            if self.judges and doc != self.config:
                self.valid = False  # the points before it were judged by another one
            self.config = doc
            return
        for problem in doc if isinstance(doc, list) else [doc]:  # a point's problems
            if isinstance(problem, dict) and isinstance(problem.get("block"), str) and (
                    isinstance(problem.get("step"), int)):
                self.logged.add((problem["block"], problem["step"]))

    def _judge(self, phase: str) -> _Judge:
        judge = self.judges.get(phase)
        if judge is None:
            thresholds, _, _ = thresholds_from_config(self.config)
            sections = (self.config or {}).get("sections")
            tags = RunTags(config=self.config)
            judge = self.judges[phase] = _Judge(
                thresholds, frozenset(sections if isinstance(sections, list) else SECTIONS),
                tags.infos(), phase, self.logged if phase == "train" else set(),
                lambda block, step, scalars: _pin(self.series, self.derived, phase, block,
                                                  step, scalars))
        return judge

    def point(self, step: int, values: dict[str, float]) -> None:
        if not self.valid:
            return
        if self.last_step is not None and step < self.last_step:
            self.valid = False
            return
        self.last_step = step
        phases, groups = _routes(tuple(values))
        for phase in phases:
            self._judge(phase).point(step, values)
            for (stage, block, mask), inputs in groups.items():
                if stage != phase:
                    continue
                here = {quantity: values[tag] for tag, quantity in inputs}
                for q in _derived_quantities():
                    if all(n in here for n in q.inputs):
                        key = (stage, block, mask, q.name)
                        b = self.derived.get(key)
                        if b is None:
                            b = self.derived[key] = SeriesBuilder(self.limit)
                        b.steps.append(step)
                        b.values.append(q.derive(here))

    def finish(self, run: RunLog) -> None:
        for judge in self.judges.values():
            judge.flush()
        run.watched = self if self.valid else None

    def usable(self, run: RunLog, tags: RunTags) -> bool:
        """Whether its judgement is the one :func:`judge_run` would make by reading again: a
        run of one stream in step order (each envelope too), judged under the configuration
        the report reads."""
        return (self.valid and len(run.streams) == 1 and run.streams[0].ordered
                and all(s.ordered for s in run.scalars.values()) and self.config == tags.config)

    def complete(self, tags: RunTags) -> None:
        """The derived curves of masks kept as envelopes, drawn from every point."""
        groups = _envelope_groups(tags)
        for (stage, block, mask, name), b in self.derived.items():
            if (stage, block, mask) in groups:
                tags.blocks[stage][block].masks[mask][name] = b.finish()


def judge_run(run: RunLog, tags: RunTags,
              advance: Callable[[int], None] = lambda n: None) -> RunHealth:
    """Thresholds, warnings and the verdict of each block of ``run``.

    Every logged point of the judged phase is read: from the run's series when they hold
    every point, else again from its files (``advance(bytes)`` follows that reading), which
    also completes the run's curves (see the module docstring).
    """
    thresholds, source, notes = thresholds_from_config(tags.config)
    sections = (tags.config or {}).get("sections")
    sections = frozenset(sections if isinstance(sections, list) else SECTIONS)
    infos = tags.infos()
    phase = _judged_phase(tags)
    if phase != "train":
        notes.append(f"an evaluation run: the verdicts judge its {phase} points (the callback "
                     "warns about training points only)")

    logged = _logged_problems(tags, notes) if phase == "train" else None
    judge = _Judge(thresholds, sections, infos, phase,
                   {(p.block, p.step) for p in logged or ()})
    # The rules on every logged point (every measurement decides the verdict; the first
    # problem of each (block, kind) gives the warnings when the run did not log its own):
    # judged while the run was read, or from its series when they hold every point, else
    # by reading it again.
    watched = run.watched if isinstance(run.watched, StreamJudge) else None
    if watched is not None and watched.usable(run, tags):
        judge = watched.judges.get(phase, judge)
        watched.complete(tags)
        advance(sum(stream.size for stream in run.streams))
    elif _needs_replay(run, tags, phase):
        _replayed(run, tags, judge, advance)
    else:
        for step, scalars in points(run, phase):
            judge.point(step, scalars)
        judge.flush()
        if not run.exact:  # what the bar counted on reading again
            advance(sum(stream.size for stream in run.streams))

    if logged is not None:
        warnings, warnings_source = logged, "logged by the callback (attn/problems)"
    else:
        warnings = list(judge.first.values())
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
        verdicts[block] = verdict(block, judge.history.get(block, CompactHistory()), warned)
    return RunHealth(thresholds, source, warnings, warnings_source, verdicts, notes, phase)
