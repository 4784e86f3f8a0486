"""Health rules on constructed statistics: each fires on its bad case, none on a healthy one."""

import math

import pytest

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.core import (
    DeadBranchWarning,
    HealthThresholds,
    MaskSaturationWarning,
    NonFiniteWarning,
    ParameterDriftWarning,
    RouterCollapseWarning,
    RouterIndifferenceWarning,
    find_problems,
)
from lightning_attn.core.problems import PROBLEM_KINDS, VERDICT_WORDS, measure, verdict
from lightning_attn.core.statistics import BlockStats, GlobalStats, MaskStats, RouterStats

ALL = frozenset({"mask", "router", "param"})
# What the blocks declare about their parameters (the drift rule reads these ranges).
SPECS = {
    **DynamicSpatialAttention().attention_parameter_specs(),
    **CoordinateAttention(8).attention_parameter_specs(),
    **CoordinateAttention(8, per_axis_alpha=True, beta=0.5).attention_parameter_specs(),
}
HEALTHY_MASK = MaskStats(count=100, mean=0.5, std=0.2, sat_low=0.1, sat_high=0.1, nonfinite=0)
HEALTHY_ROUTER = RouterStats(
    count=8, entropy=0.8, entropy_norm=0.73, usage=(0.5, 0.3, 0.2), nonfinite=0
)


def _stats(step=1000, mask=HEALTHY_MASK, router=HEALTHY_ROUTER, params=None, trainable=()):
    block = BlockStats(
        masks={"mask": mask}, router=router, params=params or {"temperature": 1.0},
        trainable=frozenset(trainable), param_specs=SPECS,
    )
    return GlobalStats(step=step, blocks={"net.attn": block})


def _kinds(stats, thresholds=None):
    problems = find_problems(stats, thresholds or HealthThresholds(), PROBLEM_KINDS, ALL)
    return [p.kind for p in problems]


def test_healthy_block_has_no_problem():
    assert _kinds(_stats()) == []


@pytest.mark.parametrize(
    ("stats", "kind"),
    [
        (_stats(mask=MaskStats(100, 0.5, 0.01, 0.0, 0.0, 0)), "mask_collapse"),
        (_stats(mask=MaskStats(100, 0.5, 0.45, 0.3, 0.3, 0)), "mask_saturation"),
        (_stats(router=RouterStats(8, 0.05, 0.05, (0.4, 0.3, 0.3), 0)), "router_collapse"),
        (_stats(router=RouterStats(8, 1.09, 0.99, (0.34, 0.33, 0.33), 0)), "router_indifference"),
        (_stats(router=RouterStats(8, 0.69, 0.63, (0.5, 0.49, 0.01), 0)), "dead_branch"),
        (_stats(mask=MaskStats(100, math.nan, math.nan, 0.0, 0.0, 3)), "nonfinite"),
        (_stats(router=RouterStats(8, math.nan, math.nan, (0.5, 0.5, math.nan), 2)), "nonfinite"),
        (_stats(params={"temperature": math.inf}), "nonfinite"),
        (_stats(params={"alpha": 1.3}, trainable=["alpha"]), "parameter_drift"),
        (_stats(params={"alpha_w": -0.2}, trainable=["alpha_w"]), "parameter_drift"),
        (_stats(params={"beta": 2.0}, trainable=["beta"]), "parameter_drift"),
        (_stats(params={"temperature": 0.01}, trainable=["temperature"]), "parameter_drift"),
        (_stats(params={"temperature": 50.0}, trainable=["temperature"]), "parameter_drift"),
    ],
)
def test_each_rule_fires_on_its_case(stats, kind):
    assert _kinds(stats) == [kind]


def test_indifference_waits_for_warmup_and_thresholds_are_arguments():
    stats = _stats(step=10, router=RouterStats(8, 1.09, 0.99, (0.34, 0.33, 0.33), 0))
    assert _kinds(stats) == []  # default warm-up 500 steps
    assert _kinds(stats, HealthThresholds(indifference_warmup_steps=10)) == [
        "router_indifference"
    ]
    assert _kinds(_stats(), HealthThresholds(std_threshold=0.3)) == ["mask_collapse"]
    assert _kinds(_stats(), HealthThresholds(dead_branch_factor=1.0)) == ["dead_branch"]


def test_drift_only_for_learnable_parameters_and_range_is_configurable():
    assert _kinds(_stats(params={"alpha": 1.3})) == []  # fixed: checked at construction
    hot = _stats(params={"temperature": 8.0}, trainable=["temperature"])
    assert _kinds(hot) == []
    assert _kinds(hot, HealthThresholds(temperature_max=5.0)) == ["parameter_drift"]
    (p,) = find_problems(
        _stats(step=7, params={"alpha_h": 1.5, "alpha_w": 0.5}, trainable=["alpha_h", "alpha_w"]),
        HealthThresholds(),
    )
    assert "alpha_h = 1.5 outside [0, 1]" in p.message and "alpha_w" not in p.message
    assert (p.value, p.threshold, p.step) == (1.5, 1.05, 7) and "Try:" in p.message
    near = _stats(params={"alpha": 1.04}, trainable=["alpha"])  # the first steps past 1.0
    assert _kinds(near) == [] and _kinds(near, HealthThresholds(unit_margin=0.0)) == [
        "parameter_drift"
    ]


def test_message_names_block_value_threshold_step_and_hint():
    stats = _stats(step=42, mask=MaskStats(100, 0.5, 0.0123, 0.0, 0.0, 0))
    (p,) = find_problems(stats, HealthThresholds(), PROBLEM_KINDS, ALL)
    for part in ("'net.attn'", "0.0123", "std_threshold=0.02", "step 42", "Try:"):
        assert part in p.message


@pytest.mark.parametrize(
    ("kind", "category"),
    [
        ("mask_saturation", MaskSaturationWarning),
        ("router_collapse", RouterCollapseWarning),
        ("router_indifference", RouterIndifferenceWarning),
        ("dead_branch", DeadBranchWarning),
        ("nonfinite", NonFiniteWarning),
        ("parameter_drift", ParameterDriftWarning),
    ],
)
def test_categories(kind, category):
    assert PROBLEM_KINDS[kind].category is category


# -- verdicts: a recovery must clear the threshold by a margin and stay clear ---------------


def _history(saturated_shares, start=0):
    """The saturation measurements of a block whose saturated share took these values."""
    out = []
    for i, share in enumerate(saturated_shares):
        mask = MaskStats(100, 0.5, 0.3, share / 2, share / 2, 0)
        stats = _stats(step=start + 10 * i, mask=mask)
        measured = {k: m for (_, k), m in measure(stats, HealthThresholds()).items()}
        out.append((start + 10 * i, measured))
    return out


def test_noise_just_below_a_threshold_after_a_warning_is_not_a_recovery():
    shares = [0.51] + [0.43, 0.47, 0.44, 0.46, 0.45, 0.47, 0.43, 0.44, 0.44, 0.44]
    v = verdict("b", _history(shares), {"mask_saturation": 0})
    assert v.status == "warned" and v.kinds == ("mask_saturation",)
    assert "at step 100: saturated share 0.44 < 0.5, not yet back" in v.text


def test_a_recovery_past_the_margin_that_lasts_is_recovered():
    shares = [0.51, 0.52, 0.3, 0.3, 0.3, 0.3]
    assert verdict("b", _history(shares), {"mask_saturation": 0}).status == "recovered"
    # clear, but for too few points (fewer than half of those since the warning)
    short = [0.51, 0.52, 0.6, 0.55, 0.49, 0.3, 0.3, 0.3]
    assert verdict("b", _history(short), {"mask_saturation": 0}).status == "warned"
    # back above the threshold at the last point: a problem, whatever came before
    assert verdict("b", _history([0.51, 0.3, 0.3, 0.3, 0.6]),
                   {"mask_saturation": 0}).status == "problem"


def test_healthy_and_no_data():
    assert verdict("b", _history([0.1, 0.2]), {}).status == "healthy"
    assert verdict("b", [], {}).status == "no data"
    assert set(VERDICT_WORDS) == {"healthy", "warned", "recovered", "problem", "no data"}
