"""The head statistics against a float64 materialised softmax computed by hand: grouped-query
heads, boolean and additive masks, biases, soft capping, causal masks, chunks of any size;
queries that see fewer than two keys; NaN; the accumulator's rows combined like processes;
the summaries, tags and the two problem kinds declared on them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_attn.core.accumulator import (
    MASKED_BELOW,
    Accumulator,
    head_reductions,
    logit_reductions,
)
from lightning_attn.core.problems import HealthThresholds, find_problems, measure
from lightning_attn.core.statistics import (
    BlockInfo,
    BlockStats,
    GlobalStats,
    HeadStats,
    RecordingConfig,
    StatisticsLayout,
    block_stats,
    from_logged,
    quantities,
)
from lightning_attn.core.tags import ScalarTag, chart_layout, head_record, scalar_metrics

G = torch.Generator().manual_seed(0)


def _by_hand(q, k, scale, mask=None, bias=None, causal=False, softcap=None):
    """(count, sum of normalised entropy, sum of first-key mass, max logit) per head."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias.double()
    visible = torch.ones(logits.shape, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        visible = visible & (mask > MASKED_BELOW)
        logits = logits + mask.double().masked_fill(mask <= MASKED_BELOW, 0.0)
    if causal:
        visible = visible & torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    out = []
    for h in range(logits.shape[1]):
        count = entropy = sink = 0.0
        top = -math.inf
        for b in range(logits.shape[0]):
            for i in range(logits.shape[2]):
                seen = visible[b, h, i]
                row = logits[b, h, i][seen]
                if row.numel():
                    top = max(top, row.max().item())
                if row.numel() < 2:
                    continue
                p = torch.softmax(row, dim=0)
                count += 1
                entropy += -(p * p.log()).sum().item() / math.log(row.numel())
                sink += p[0].item() if seen[0] else 0.0
        out.append((count, entropy, sink, top))
    return out


def _check(reduced, want):
    for h, (count, entropy, sink, top) in enumerate(want):
        assert reduced["count"][h].item() == count
        assert reduced["sum_entropy"][h].item() == pytest.approx(entropy, abs=1e-12)
        assert reduced["sum_sink"][h].item() == pytest.approx(sink, abs=1e-12)
        assert reduced["max_logit"][h].item() == pytest.approx(top, abs=1e-12)


Q, K = 3 * torch.randn(2, 4, 5, 8, generator=G), torch.randn(2, 2, 6, 8, generator=G)
MASK = torch.rand(2, 1, 5, 6, generator=G) > 0.4
CASES = {
    "plain": {},
    "boolean mask": {"mask": MASK},
    "additive -inf": {"mask": torch.where(MASK, 0.3, -math.inf)},
    "additive finfo.min": {"mask": torch.where(MASK, 0.0, torch.finfo(torch.float32).min)},
    "additive -1e4 hides, -1e3 biases": {"mask": torch.where(MASK, -1e3, -1e4)},
    "per-head bias": {"bias": torch.randn(4, 5, 6, generator=G)},
    "causal": {"causal": True},
    "causal and mask": {"causal": True, "mask": MASK},
    "soft cap": {"softcap": 2.0},
    "per-head scale": {"scale": torch.tensor([0.1, 0.5, 1.0, 2.0])},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("chunk", [1, 48, 10**9])
def test_reductions_equal_a_softmax_by_hand(name, chunk):
    kwargs = dict(CASES[name])
    scale = kwargs.pop("scale", 0.35)
    reduced = head_reductions(Q, K, scale=scale, chunk_elements=chunk, **kwargs)
    hand_scale = scale if not isinstance(scale, torch.Tensor) else scale.view(1, 4, 1, 1)
    _check(reduced, _by_hand(Q, K, hand_scale, **kwargs))


def test_logits_the_forward_computed_reduce_the_same():
    logits = 4 * torch.randn(3, 2, 1, 10, generator=G)  # one query over ten positions
    reduced = logit_reductions(logits, chunk_elements=7)
    p = logits.double().softmax(-1)
    entropy = (-(p * p.log()).sum(-1) / math.log(10)).sum(dim=(0, 2))
    assert torch.allclose(reduced["sum_entropy"], entropy, atol=1e-12)
    assert torch.allclose(reduced["max_logit"], logits.double().amax(dim=(0, 2, 3)))


def test_queries_that_see_no_or_one_key_are_left_out_of_entropy_and_sink():
    mask = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True  # one key: in the max logit only
    mask[0, 0, 2, :] = True
    q, k = torch.randn(1, 1, 3, 4, generator=G), torch.randn(1, 1, 4, 4, generator=G)
    reduced = head_reductions(q, k, mask=mask, chunk_elements=2)
    assert reduced["count"].item() == 1
    logits = (q @ k.transpose(-1, -2)).double() / 2.0
    assert reduced["max_logit"].item() == pytest.approx(
        max(logits[0, 0, 1, 2].item(), logits[0, 0, 2].max().item()))
    nan = head_reductions(q.masked_fill(q > 0, math.nan), k, chunk_elements=100)
    assert math.isnan(nan["sum_entropy"].item()) and math.isnan(nan["max_logit"].item())


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"Hq a multiple of Hk.*q \(1, 3, 2, 4\)"):
        head_reductions(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 2, 4), chunk_elements=8)
    with pytest.raises(ValueError, match="logits must be"):
        logit_reductions(torch.randn(2, 3), chunk_elements=8)
    with pytest.raises(ValueError, match="head_chunk_elements"):
        RecordingConfig(head_chunk_elements=0)
    with pytest.raises(ValueError, match="num_heads"):
        StatisticsLayout((), num_heads=0)


def _accumulate(*calls) -> list[float]:
    layout = StatisticsLayout(("mask",), None, 0, num_heads=4)
    acc = Accumulator(layout, RecordingConfig(histogram_bins=0), "cpu")
    for q, k in calls:
        acc.add({}, None, False, heads=head_reductions(q, k, chunk_elements=64))
    return acc.row("train").tolist()


def test_forwards_and_processes_combine_like_one_batch():
    """Two forwards in one accumulator, or one each in two processes' rows combined slot by
    slot (sums added, maxima taken): the statistics of the concatenated batch."""
    (qa, qb), (ka, kb) = Q.split(1), K.split(1)
    layout = StatisticsLayout(("mask",), None, 0, num_heads=4)
    whole = block_stats(layout, _accumulate((Q, K))).heads
    two = block_stats(layout, _accumulate((qa, ka), (qb, kb))).heads
    rows = [_accumulate((qa, ka)), _accumulate((qb, kb))]
    combined = [max(a, b) if kind == "max" else a + b
                for a, b, kind in zip(*rows, layout.reductions, strict=True)]
    gathered = block_stats(layout, combined)
    assert gathered.forwards == 2 and gathered.masks == {}  # the mask slots stayed empty
    for stats in (two, gathered.heads):
        assert stats.head_count == whole.head_count == (10,) * 4
        assert stats.head_entropy == pytest.approx(whole.head_entropy, abs=1e-12)
        assert stats.head_max_logit == pytest.approx(whole.head_max_logit, abs=1e-12)
        assert stats.head_sink == pytest.approx(whole.head_sink, abs=1e-12)


def _heads(entropy, logits, sink=(0.1, 0.2), count=(5, 5)) -> HeadStats:
    values = dict(head_count=count, head_entropy=entropy, head_max_logit=logits,
                  head_sink=sink)
    return from_logged(HeadStats, values)


def test_summaries_leave_out_heads_that_counted_nothing():
    h = _heads((0.5, math.nan), (3.0, 7.0), count=(5, 0))
    assert (h.entropy_min, h.entropy_mean, h.max_logit) == (0.5, 0.5, 7.0)
    assert h.sink_max == 0.1 and h.nonfinite == 0
    bad = _heads((0.5, math.nan), (3.0, math.nan))
    assert math.isnan(bad.entropy_min) and math.isnan(bad.max_logit)


def _point(heads: HeadStats, step: int = 10) -> GlobalStats:
    return GlobalStats(step=step, blocks={"vit.blocks.0.attn": BlockStats(heads=heads,
                                                                          forwards=1)})


def test_collapse_and_logit_growth_fire_past_their_thresholds_and_clear_past_the_margin():
    t = HealthThresholds()
    healthy = _point(_heads((0.6, 0.8), (12.0, 30.0)))
    assert find_problems(healthy, t) == []
    sick = _point(_heads((0.6, 0.04), (12.0, 250.0)))
    problems = {p.kind: p for p in find_problems(sick, t)}
    assert set(problems) == {"head_entropy_collapse", "logit_growth"}
    assert "head 1 of 2" in problems["head_entropy_collapse"].detail
    assert "head 1 of 2" in problems["logit_growth"].detail
    assert "QKClip" in problems["logit_growth"].hint and "qk_norm=True" in problems[
        "logit_growth"].hint
    near = measure(_point(_heads((0.6, 0.105), (12.0, 95.0))), t)
    assert not near[("vit.blocks.0.attn", "head_entropy_collapse")].bad
    assert not near[("vit.blocks.0.attn", "head_entropy_collapse")].clear  # 0.105 < 0.11
    assert not near[("vit.blocks.0.attn", "logit_growth")].clear  # 95 > 90
    nan = find_problems(_point(_heads((0.6, math.nan), (12.0, math.nan))), t)
    assert [p.kind for p in nan] == ["nonfinite"]
    assert find_problems(sick, t, sections=("mask", "router", "param")) == []
    strict = dataclasses.replace(t, max_logit_threshold=10.0, head_entropy_threshold=0.7)
    assert {p.kind for p in find_problems(healthy, strict)} == {"head_entropy_collapse",
                                                                 "logit_growth"}


@pytest.mark.parametrize(("field", "value", "match"), [
    ("head_entropy_threshold", 1.5, "head_entropy_threshold"),
    ("max_logit_threshold", -1.0, "max_logit_threshold"),
    ("max_logit_threshold", math.nan, "max_logit_threshold"),
])
def test_bad_thresholds_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        HealthThresholds(**{field: value})


def test_tags_charts_and_the_per_head_record_come_from_the_declarations():
    stats = _point(_heads((0.6, 0.04), (12.0, 250.0)))
    metrics = scalar_metrics(stats, ("heads",))
    names = {q.tag for q in quantities(HeadStats) if q.tag}
    assert {tag.rsplit("/", 1)[1] for tag in metrics} == names
    assert all(ScalarTag.parse(tag).format() == tag for tag in metrics)
    assert metrics["attn/vit.blocks.0.attn/heads/max_logit"] == 250.0
    assert scalar_metrics(stats, ("mask",)) == {}
    rebuilt = from_logged(HeadStats, {ScalarTag.parse(t).quantity: v for t, v in metrics.items()})
    assert [p.kind for p in find_problems(_point(rebuilt), HealthThresholds())] == [
        "head_entropy_collapse", "logit_growth"]  # the report judges what the callback did
    assert head_record(stats) == {"vit.blocks.0.attn": {
        "head_count": [5, 5], "head_entropy": [0.6, 0.04], "head_max_logit": [12.0, 250.0],
        "head_sink": [0.1, 0.2]}}
    info = BlockInfo("vit.blocks.0.attn", StatisticsLayout((), num_heads=2))
    charts = chart_layout([info], ("heads",))["attn/vit.blocks.0.attn"]
    assert len(charts) == len(names)
    assert BlockInfo.from_json(info.to_json()).layout.num_heads == 2
