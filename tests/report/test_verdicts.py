"""The verdicts' compact history gives :func:`verdict` what the list of every point gave."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lightning_attn.core.problems import PROBLEM_KINDS, HealthThresholds, Measurement, verdict
from lightning_attn.report.verdicts import CompactHistory

KINDS = list(PROBLEM_KINDS)


def _measurement(rng: random.Random) -> Measurement | None:
    state = rng.choice(("absent", "clear", "near", "bad"))
    if state == "absent":
        return None
    value = rng.random()
    return Measurement(value, 0.5, state == "bad", state == "clear", "q", f"q {value:.3f}")


@pytest.mark.parametrize("seed", range(40))
def test_compact_history_gives_the_verdict_of_every_point(seed):
    rng = random.Random(seed)
    kinds = rng.sample(KINDS, rng.randint(1, 3))
    history, compact = [], CompactHistory()
    step = rng.randint(-50, 50)
    stick = None
    for _ in range(rng.randint(1, 300)):
        step += rng.choice((1, 10, 10, 10, 37))  # strides that repeat, and break
        if stick is None or rng.random() < 0.05:  # outcomes that last, then change
            stick = {k: _measurement(rng) for k in kinds}
        point = {k: m for k, m in stick.items() if m is not None}
        history.append((step, point))
        compact.append(step, point)
    warned = {k: history[rng.randrange(len(history))][0] for k in kinds if rng.random() < 0.7}
    assert len(compact) == len(history) and compact[-1] == history[-1]
    assert [s for s, _ in compact] == [s for s, _ in history]
    assert verdict("b", compact, warned) == verdict("b", history, warned)
    i = rng.randrange(len(history))
    step, outcome = compact[i]
    assert step == history[i][0] and set(outcome) == set(history[i][1])
    assert all(outcome[k].clear == history[i][1][k].clear for k in outcome)


def test_an_empty_history_is_no_data():
    assert verdict("b", CompactHistory(), {}).status == "no data"


def _judged(points, batch: int, monkeypatch) -> tuple[dict, dict]:
    """``(first problems, history)`` of ``points`` judged ``batch`` points at a time."""
    from lightning_attn.core.statistics import SECTIONS
    from lightning_attn.report import verdicts

    monkeypatch.setattr(verdicts, "JUDGE_BATCH", batch)
    judge = verdicts._Judge(HealthThresholds(), frozenset(SECTIONS), {}, "train")
    for step, scalars in points:
        judge.point(step, scalars)
    judge.flush()
    history = {b: [(s, {k: (m.value, m.bad, m.clear) for k, m in outcome.items()}
                    if i == len(h) - 1 else {k: m.clear for k, m in outcome.items()})
                   for i, (s, outcome) in enumerate(h)] for b, h in judge.history.items()}
    return {k: (p.step, p.value, p.detail) for k, p in judge.first.items()}, history


def test_points_judged_in_batches_as_one_by_one(monkeypatch):
    # an indifferent router whose warm-up ends inside a batch, a mask that collapses at one
    # point, a temperature that drifts, a NaN, and a block that stops logging its router
    rng = np.random.default_rng(0)
    warmup = HealthThresholds().indifference_warmup_steps
    points = []
    for step in range(warmup - 70, warmup + 130, 10):
        u = rng.uniform(0.3, 0.36)
        scalars = {"attn/a/router/entropy_norm": 0.999, "attn/a/router/usage_0": u,
                   "attn/a/router/usage_1": 1 - u,
                   "attn/a/mask/mean": 0.5, "attn/a/mask/std": 0.001 if step == warmup + 40
                   else 0.2,
                   "attn/b/mask/mean": math.nan if step == warmup + 90 else 0.4,
                   "attn/b/mask/std": 0.1, "attn/b/param/temperature": 1.0 + step / 100,
                   "attn/b/param/temperature_grad_norm": 0.1}
        if step > warmup + 100:  # another set of tags: another batch
            scalars = {k: v for k, v in scalars.items() if "/router/" not in k}
        points.append((step, scalars))
    one_by_one = _judged(points, 1, monkeypatch)
    for batch in (3, 256):
        assert _judged(points, batch, monkeypatch) == one_by_one
    first, history = one_by_one
    assert first[("a", "router_indifference")][0] == warmup
    assert first[("a", "mask_collapse")][0] == warmup + 40
    assert first[("b", "nonfinite")][0] == warmup + 90
    assert all(("router_indifference" in o) == (warmup <= s <= warmup + 100)
               for s, o in history["a"])
