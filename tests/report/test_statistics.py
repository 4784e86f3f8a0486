"""The adapter (logged scalars -> GlobalStats), thresholds, verdict phrases, metric modes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lightning_attn.core import (
    PROBLEM_KINDS,
    BlockStats,
    GlobalStats,
    HealthThresholds,
    MaskStats,
    RouterStats,
    find_problems,
)
from lightning_attn.core.problems import Problem, phrase
from lightning_attn.core.statistics import quantities
from lightning_attn.core.tags import scalar_metrics
from lightning_attn.report import MetricSpec, stats_from_scalars, thresholds_from_config

SECTIONS = frozenset({"mask", "router", "param"})


def _mask(mean, std, low=0.0, high=0.0, nonfinite=0):
    return MaskStats(count=100, mean=mean, std=std, sat_low=low, sat_high=high,
                     nonfinite=nonfinite)


def _router(*usage, entropy_norm=0.5):
    k = len(usage)
    return RouterStats(count=8, entropy=entropy_norm * math.log(k), entropy_norm=entropy_norm,
                       usage=tuple(usage), nonfinite=0)


STATS = GlobalStats(step=700, blocks={
    "a.collapsed": BlockStats(masks={"mask": _mask(0.5, 0.001)}, router=_router(0.5, 0.3, 0.2),
                              params={"temperature": 1.5}, grad_norms={"temperature": 0.1}),
    "b.saturated": BlockStats(masks={"mask_h": _mask(0.5, 0.3, 0.4, 0.3),
                                     "mask_w": _mask(0.5, 0.2)},
                              params={"alpha": 0.9, "beta": 0.5}),
    "c.router": BlockStats(masks={"mask": _mask(0.4, 0.2)},
                           router=_router(0.999, 0.001, 0.0, entropy_norm=0.01)),
    "d.indifferent": BlockStats(masks={"mask": _mask(0.4, 0.2)},
                                router=_router(0.34, 0.33, 0.33, entropy_norm=0.99)),
    "e.nan": BlockStats(masks={"mask": _mask(math.nan, math.nan, nonfinite=3)},
                        params={"temperature": math.inf}),
})


def _key(problems):
    return [(p.block, p.kind, p.value, p.threshold, p.step) for p in problems]


def test_adapter_inverts_scalar_metrics_and_gives_the_same_problems():
    rebuilt = stats_from_scalars(STATS.step, scalar_metrics(STATS, SECTIONS))
    assert rebuilt.step == STATS.step and list(rebuilt.blocks) == list(STATS.blocks)
    for name, bs in STATS.blocks.items():
        rb = rebuilt.blocks[name]
        for mask, m in bs.masks.items():
            r = rb.masks[mask]
            for f in (q.name for q in quantities(MaskStats) if q.tag is not None):
                assert (getattr(r, f) == getattr(m, f)) or math.isnan(getattr(m, f))
            assert bool(r.nonfinite) == bool(m.nonfinite)
        if bs.router is None:
            assert rb.router is None
        else:
            assert rb.router.usage == bs.router.usage
            assert rb.router.entropy_norm == bs.router.entropy_norm
        assert rb.grad_norms == bs.grad_norms
        assert rb.params.keys() == bs.params.keys()
    thresholds = HealthThresholds()
    expected = find_problems(STATS, thresholds, tuple(PROBLEM_KINDS), SECTIONS)
    got = find_problems(rebuilt, thresholds, tuple(PROBLEM_KINDS), SECTIONS)
    assert len({p.kind for p in expected}) >= 6  # the synthetic point sets off most kinds
    assert _key(got) == _key(expected)
    # the same messages, but for how many values were NaN (counts are not logged)
    for g, e in zip(got, expected, strict=True):
        if g.kind == "nonfinite":
            assert "mask 'mask' (1 values)" in g.message and "(3 values)" in e.message
        else:
            assert g.message == e.message


def test_adapter_ignores_other_tags_and_fills_missing_normalised_entropy():
    scalars = {
        "val/attn/x/mask/std": 0.0, "train/loss": 1.0,
        "attn/x/router/entropy": math.log(2) / 2, "attn/x/router/usage_0": 0.9,
        "attn/x/router/usage_1": 0.1, "attn/x/mask/mean": 0.5, "attn/x/mask/std": 0.1,
        "attn/x/param/alpha": 0.5, "attn/x/param/alpha_grad_norm": 0.2,
    }
    stats = stats_from_scalars(5, scalars)
    (bs,) = stats.blocks.values()
    assert bs.router.entropy_norm == pytest.approx(0.5)
    assert bs.masks["mask"].std == 0.1 and bs.masks["mask"].sat_low == 0.0
    assert bs.params == {"alpha": 0.5} and bs.grad_norms == {"alpha": 0.2}
    if "trainable" in {f.name for f in dataclasses.fields(BlockStats)}:
        assert bs.trainable == frozenset({"alpha"})


def test_thresholds_from_config():
    t, source, notes = thresholds_from_config(
        {"thresholds": {"std_threshold": 0.1, "dead_branch_factor": 0.2, "not_a_field": 3}}
    )
    assert (t.std_threshold, t.dead_branch_factor) == (0.1, 0.2)
    assert t.saturation_low == HealthThresholds().saturation_low
    assert source == "the run's attn/config"
    assert notes == ["thresholds unknown to this version, ignored: not_a_field"]
    t, source, notes = thresholds_from_config(None)
    assert t == HealthThresholds() and source.startswith("defaults") and not notes
    t, source, notes = thresholds_from_config({"thresholds": {"std_threshold": 7.0}})
    assert t == HealthThresholds() and "invalid" in source and "std_threshold" in notes[0]


def test_every_problem_kind_has_a_verdict_phrase():
    for kind in PROBLEM_KINDS:
        assert phrase(kind) == PROBLEM_KINDS[kind].phrase and phrase(kind)
    assert phrase("mask_collapse") == "collapsed"
    assert phrase("router_indifference") == "router ignoring its input"
    assert phrase("parameter_drift") == "drifting parameter"
    assert phrase("some_new_kind") == "some new kind"


def test_problems_keep_finding_and_remedy_apart_and_round_trip():
    p = Problem("x", "mask_collapse", 0.01, 0.02, 3, "std of mask 'mask'", "bad", "less of it")
    assert p.message == "attention block 'x' at step 3: bad. Try: less of it."
    assert (p.detail, p.hint) == ("bad", "less of it")
    assert Problem.from_json(p.to_json()) == p
    old = {"block": "x", "kind": "k", "value": 1, "threshold": 0, "step": 2,
           "message": "no remedy here"}  # a record of an older version
    assert (Problem.from_json(old).detail, Problem.from_json(old).hint) == ("no remedy here", "")


@pytest.mark.parametrize(
    ("text", "name", "mode"),
    [("val/acc", "val/acc", "max"), ("val/loss", "val/loss", "min"),
     ("test/err", "test/err", "min"), ("val/loss:max", "val/loss", "max"),
     ("val/loc/a.b:min", "val/loc/a.b", "min")],
)
def test_metric_modes(text, name, mode):
    assert MetricSpec.parse(text) == MetricSpec(name, mode)


def test_describe_names_the_drifting_parameter():
    drift = Problem("b", "parameter_drift", 1.02, 1.0, 9, "alpha_h",
                    "learnable alpha_h = 1.02 outside [0, 1]")
    assert drift.describe() == "alpha_h 1.02 > 1"
    collapse = Problem("b", "mask_collapse", 0.001, 0.02, 9, "mask std")
    assert collapse.describe() == "mask std 0.001 < 0.02"
    assert Problem("b", "nonfinite", 2.0, 0.0, 9, "quantities").describe() == (
        "NaN or Inf in 2 quantities"
    )
