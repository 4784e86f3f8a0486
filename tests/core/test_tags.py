"""The tag schema: every tag a point logs parses back to what formatted it."""

from __future__ import annotations

import math

import pytest

from lightning_attn.core.statistics import (
    BlockInfo,
    BlockStats,
    GlobalStats,
    MaskStats,
    RouterStats,
    StatisticsLayout,
    quantities,
)
from lightning_attn.core.tags import (
    ScalarTag,
    chart_layout,
    decode_name,
    encode_name,
    histogram_tag,
    scalar_metrics,
    tag_table,
)

STATS = BlockStats(
    masks={"mask_h": MaskStats(10, 0.5, 0.1, 0.0, 0.1, 0, 0.1, 0.9),
           "attn": MaskStats(10, 0.4, 0.2, 0.1, 0.0, 0, 0.0, 1.0)},
    router=RouterStats(4, 0.9, 0.8, (0.5, 0.3, 0.2), 0),
    params={"temperature": 1.5, "x_grad_norm": 3.0}, grad_norms={"temperature": 0.1},
)


@pytest.mark.parametrize("phase", ["train", "val", "test"])
def test_every_logged_tag_round_trips(phase):
    stats = GlobalStats(7, {"net.attn": STATS, "attn": STATS}, phase)
    metrics = scalar_metrics(stats, ("mask", "router", "param"))
    per_block = (
        len(STATS.masks) * sum(q.tag is not None for q in quantities(MaskStats))
        + sum((STATS.router.num_branches if q.per_branch else 1)
              for q in quantities(RouterStats) if q.tag is not None)
        + len(STATS.params) + len(STATS.grad_norms))
    assert len(metrics) == 2 * per_block
    for tag, value in metrics.items():
        parsed = ScalarTag.parse(tag)
        assert parsed is not None and parsed.format() == tag and parsed.stage == phase
        assert parsed.block in ("net.attn", "attn")
        assert math.isfinite(value)
    # a parameter literally named like a gradient norm stays a parameter value
    assert ScalarTag.parse("attn/b/param/x_grad_norm_grad_norm") == ScalarTag(
        "train", "b", "param", "grad_norm", param="x_grad_norm")
    assert ScalarTag.parse("attn/b/router/usage_12").branch == 12


@pytest.mark.parametrize("tag", [
    "attn/b/mask/hist", "attn/b/router/weights_hist", "val/attn/maps", "attn/config",
    "train/loss", "attn/b/router/usage_x", "x/y/attn/b/mask/mean", "attn/b/mask",
])
def test_other_tags_are_not_scalars_of_the_diagnostics(tag):
    assert ScalarTag.parse(tag) is None


def test_chart_layout_and_docs_table_come_from_the_declarations():
    info = BlockInfo("net.attn", StatisticsLayout(("mask",), 2), ("temperature",),
                     ("temperature",), ("3x3", "7x7"))
    layout = chart_layout([info], ("mask", "router", "param"))
    charts = layout["attn/net.attn"]
    assert "usage of branch 1 (7x7)" in charts and "temperature gradient norm" in charts
    assert "mask std" in charts and "router entropy / log K (1 = uniform)" in charts
    for kind, (regex,) in charts.values():
        assert kind == "Multiline" and regex.startswith("^attn/net\\.attn/")
    rows = dict(tag_table())
    assert rows["attn/<block>/<mask>/sat_low"] == "the mask's share below saturation_low"
    assert "attn/<block>/param/<name>_grad_norm" in rows


#: Names a ModuleDict key (or a block's mask, or a parameter) may carry.
NAMES = ["res/3x3", "a%2Fb", "100%", "%", "héllo 注意力 🙂", 'say "hi"', "<b>x</b>", "a`b",
         "new\nline", "tab\there", "x\ud800", "attn", "val", "router", "", " ", "a|b", "$x$"]


@pytest.mark.parametrize("name", NAMES, ids=[ascii(n) for n in NAMES])
def test_any_name_round_trips_through_a_tag(name):
    assert decode_name(encode_name(name)) == name
    assert "/" not in encode_name(name)
    for tag in (ScalarTag("train", name, "mask", "std"),
                ScalarTag("val", f"net.{name}", f"m{name}", "mean"),
                ScalarTag("test", "b", "router", "usage", branch=2),
                ScalarTag("train", name, "param", "grad_norm", param=f"{name}_grad_norm"),
                ScalarTag("train", name, "param", "value", param=name or "t")):
        assert ScalarTag.parse(tag.format()) == tag, tag.format()


def test_ordinary_names_are_written_as_they_are():
    assert ScalarTag("train", "stages.0.attn", "mask_h", "std").format() == (
        "attn/stages.0.attn/mask_h/std")
    assert ScalarTag("train", "blocks.res/3x3", "mask", "std").format() == (
        "attn/blocks.res%2F3x3/mask/std")
    assert histogram_tag("a/b", "m%") == "attn/a%2Fb/m%25/hist"
