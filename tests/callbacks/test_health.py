"""What a callback does with a problem: warn once on rank zero, raise, stop or ignore."""

import warnings

import pytest

from lightning_attn.callbacks.health import ProblemReporter
from lightning_attn.core import (
    AttentionProblemError,
    HealthThresholds,
    MaskCollapseWarning,
    find_problems,
)
from lightning_attn.core.problems import PROBLEM_KINDS
from lightning_attn.core.statistics import BlockStats, GlobalStats, MaskStats

ALL = frozenset({"mask", "router", "param"})


def _stats(mask: MaskStats) -> GlobalStats:
    return GlobalStats(step=1000, blocks={"net.attn": BlockStats(masks={"mask": mask})})


def test_reporter_warns_once_per_block_and_kind():
    reporter = ProblemReporter("warn")
    bad = _stats(MaskStats(100, 0.5, 0.01, 0.0, 0.0, 0))
    problems = find_problems(bad, HealthThresholds(), PROBLEM_KINDS, ALL)
    with pytest.warns(MaskCollapseWarning) as record:
        reporter.report(problems)
        reporter.report(problems)
    assert len(record) == 1
    assert reporter.state_dict() == {"reported": {"net.attn|mask_collapse": 1000},
                                     "active": ["net.attn|mask_collapse"]}
    assert str(record[0].message).startswith("MaskCollapseWarning: attention block")


def test_a_problem_that_cleared_warns_again_when_it_comes_back():
    reporter = ProblemReporter("warn")
    bad = find_problems(_stats(MaskStats(100, 0.5, 0.01, 0.0, 0.0, 0)), HealthThresholds())
    with pytest.warns(MaskCollapseWarning) as record:
        reporter.report(bad)
        reporter.report(bad)  # still collapsed: no second warning
        reporter.clear([("net.attn", "mask_collapse")])  # back past the margin
        reporter.report(bad)  # collapsed again: warned again
    assert len(record) == 2
    restored = ProblemReporter("warn")
    restored.load_state_dict({"net.attn|mask_collapse": 7})  # an earlier release's state
    assert restored.reported == {"net.attn|mask_collapse": 7} and restored.fresh(bad) == []


def test_stop_warns_and_returns_the_new_problems():
    bad = _stats(MaskStats(100, 0.5, 0.01, 0.0, 0.0, 0))
    problems = find_problems(bad, HealthThresholds())
    reporter = ProblemReporter("stop")
    with pytest.warns(MaskCollapseWarning):
        assert reporter.report(problems) == problems
    assert reporter.report(problems) == []


def test_raise_and_ignore():
    bad = _stats(MaskStats(100, 0.5, 0.01, 0.0, 0.0, 0))
    problems = find_problems(bad, HealthThresholds(), PROBLEM_KINDS, ALL)
    with pytest.raises(AttentionProblemError) as info:
        ProblemReporter("raise").report(problems)
    assert info.value.kind == "mask_collapse" and info.value.block == "net.attn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProblemReporter("ignore").report(problems)
