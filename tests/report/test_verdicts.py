"""The verdicts' compact history gives :func:`verdict` what the list of every point gave."""

from __future__ import annotations

import random

import pytest

from lightning_attn.core.problems import PROBLEM_KINDS, Measurement, verdict
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
