"""Each statistic, against values computed by hand: accumulate on the device, read on the host."""

import math

import pytest
import torch

from lightning_attn.core.accumulator import Accumulator, empty_row
from lightning_attn.core.statistics import (
    MASK_SLOTS,
    PHASES,
    ROUTER_SLOTS,
    MaskStats,
    RecordingConfig,
    StatisticsLayout,
    block_stats,
    from_logged,
    router_entropy,
    slot_width,
)


def _run(masks=None, rw=None, k=None, bins=0, low=0.05, high=0.95):
    """Accumulate the forwards ``masks``/``rw`` (lists, one item per forward) and read back."""
    masks = masks or []
    layout = StatisticsLayout(("mask",), k, bins)
    acc = Accumulator(layout, RecordingConfig(low, high, bins), "cpu")
    for i in range(max(len(masks), len(rw or []))):
        acc.add({"mask": masks[i]} if i < len(masks) else {}, rw[i] if rw else None, True)
    return block_stats(layout, acc.row("train").tolist())


def test_mask_statistics_by_hand():
    values = [0.0, 0.02, 0.5, 0.97, 1.0, 0.5]
    stats = _run([torch.tensor(values).view(1, 1, 2, 3)]).masks["mask"]
    mean = sum(values) / 6
    var = sum((v - mean) ** 2 for v in values) / 5  # unbiased, like torch.std
    assert stats.count == 6
    assert stats.mean == pytest.approx(mean, abs=1e-7)
    assert stats.std == pytest.approx(math.sqrt(var), abs=1e-6)
    assert (stats.min, stats.max) == (0.0, 1.0)
    assert stats.sat_low == pytest.approx(2 / 6)
    assert stats.sat_high == pytest.approx(2 / 6)
    assert stats.saturated == pytest.approx(4 / 6)
    assert stats.nonfinite == 0


def test_mask_thresholds_are_configurable():
    mask = torch.tensor([0.05, 0.1, 0.5, 0.9, 0.95])
    stats = _run([mask], low=0.2, high=0.8).masks["mask"]
    assert (stats.sat_low, stats.sat_high) == (pytest.approx(0.4), pytest.approx(0.4))
    strict = _run([mask]).masks["mask"]  # values equal to a threshold are not saturated
    assert (strict.sat_low, strict.sat_high) == (0.0, 0.0)


def test_forwards_add_up_like_one_concatenated_batch():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(3, 2, 4, 1, generator=g), torch.rand(5, 2, 4, 1, generator=g)]
    merged = _run(parts)
    whole = torch.cat(parts).double()
    m = merged.masks["mask"]
    assert merged.forwards == 2 and m.count == whole.numel()
    assert m.mean == pytest.approx(whole.mean().item(), abs=1e-7)
    assert m.std == pytest.approx(whole.std().item(), abs=1e-6)
    assert (m.min, m.max) == (pytest.approx(whole.min().item()), pytest.approx(whole.max().item()))


def test_std_near_collapse_is_exact():
    # float64 sums: a std of 1e-4 around 0.5 survives E[x^2] - E[x]^2
    mask = 0.5 + 1e-4 * torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    got = _run([mask]).masks["mask"].std
    assert got == pytest.approx(mask.double().std().item(), rel=1e-3)


def test_constant_mask_has_zero_std_and_nonfinite_is_counted():
    assert _run([torch.full((4, 1, 3, 3), 0.5)]).masks["mask"].std == pytest.approx(0, abs=1e-7)
    bad = torch.tensor([0.5, float("nan"), float("inf"), 0.2])
    stats = _run([bad, torch.tensor([0.3, 0.4])]).masks["mask"]
    assert stats.nonfinite == 2 and stats.count == 6
    # the statistics a NaN touches are NaN, as a plain torch reduction would give
    for value in (stats.mean, stats.std, stats.min, stats.max):
        assert math.isnan(value)
    inf = _run([torch.tensor([0.5, float("inf")])]).masks["mask"]
    assert inf.nonfinite == 1 and inf.max == math.inf and inf.min == 0.5


def test_no_value_and_single_value():
    assert _run([]).masks == {} and _run([]).forwards == 0
    assert _run([torch.empty(0, 1, 3, 3)]).masks == {}


@pytest.mark.parametrize("shape", [(1,), (1, 1, 1, 1)], ids=["one value", "batch 1 of a 1x1 map"])
def test_the_std_of_one_value_is_undefined_not_nonfinite(shape):
    # torch.tensor([0.3]).std() is nan too: the unbiased std of one value does not exist
    stats = _run([torch.full(shape, 0.3)]).masks["mask"]
    assert math.isnan(stats.std) and not stats.std_defined
    assert stats.mean == pytest.approx(0.3) and stats.nonfinite == 0 and stats.count == 1
    # read back from the logged scalars (no counts there), it is still not a NaN value
    logged = from_logged(MaskStats, {"mean": stats.mean, "std": stats.std, "min": 0.3,
                                     "max": 0.3, "sat_low": 0.0, "sat_high": 0.0})
    assert logged.nonfinite == 0 and not logged.std_defined
    nan = from_logged(MaskStats, {"mean": math.nan, "std": math.nan})
    assert nan.nonfinite == 1


def test_router_statistics_by_hand():
    rw = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert router_entropy(rw).tolist() == pytest.approx([0.0, math.log(3)], abs=1e-6)
    stats = _run(rw=[rw], k=3).router
    assert stats.entropy == pytest.approx(math.log(3) / 2, abs=1e-6)
    assert stats.entropy_norm == pytest.approx(0.5, abs=1e-6)
    assert stats.usage == pytest.approx((2 / 3, 1 / 6, 1 / 6), abs=1e-6)
    assert stats.num_branches == 3 and stats.nonfinite == 0 and stats.count == 2


def test_router_single_branch_and_nan():
    one = _run(rw=[torch.ones(4, 1)], k=1).router
    assert one.entropy == 0.0 and one.entropy_norm == 0.0 and one.usage == (1.0,)
    nan = _run(rw=[torch.tensor([[0.5, float("nan")], [0.3, 0.7]])], k=2).router
    assert nan.nonfinite == 1 and math.isnan(nan.usage[1]) and math.isnan(nan.entropy)
    assert _run(rw=[torch.empty(0, 2)], k=2).router is None


def test_histogram_counts_finite_values_in_unit_interval():
    values = torch.tensor([0.0, 0.1, 0.1, 0.99, 1.0, float("nan"), float("inf"), -0.5, 1.5])
    stats = _run([values], bins=10)
    counts = stats.histograms["mask"]
    assert sum(counts) == 5
    assert counts[0] == 1 and counts[1] == 2 and counts[9] == 2


def test_layout_offsets_and_reductions():
    layout = StatisticsLayout(("mask_h", "mask_w"), 3, 4)
    mask, router = len(MASK_SLOTS), sum(slot_width(s, 3) for s in ROUTER_SLOTS)
    assert layout.mask_offsets == {"mask_h": 1, "mask_w": 1 + mask}
    hist = 1 + 2 * mask + router  # the bins follow the forward count, the masks and router
    assert layout.router_offset == 1 + 2 * mask
    assert layout.histogram_offsets == {"mask_h": hist, "mask_w": hist + 4, "router": hist + 8}
    size = hist + 12
    assert layout.size == size == len(layout.reductions) == empty_row(layout, "cpu").numel()
    first_min = 1 + [s.name for s in MASK_SLOTS].index("min")
    assert layout.reductions[first_min] == "min" and empty_row(layout, "cpu")[first_min] == math.inf
    with pytest.raises(ValueError, match=f"{size} accumulator values"):
        block_stats(layout, [0.0] * 3)


def test_phases_record_into_their_own_rows():
    layout = StatisticsLayout(("mask",), None, 0)
    acc = Accumulator(layout, RecordingConfig(histogram_bins=0), "cpu")
    acc.add({"mask": torch.full((2, 1, 2, 2), 0.25)}, None, False)
    acc.set_phase("val")
    acc.add({"mask": torch.full((3, 1, 2, 2), 0.75)}, None, False)
    acc.set_phase("train")
    acc.add({"mask": torch.full((1, 1, 2, 2), 0.25)}, None, False)
    train = block_stats(layout, acc.row("train").tolist())
    val = block_stats(layout, acc.row("val").tolist())
    assert (train.forwards, train.masks["mask"].count, train.masks["mask"].mean) == (2, 12, 0.25)
    assert (val.forwards, val.masks["mask"].count, val.masks["mask"].mean) == (1, 12, 0.75)
    acc.reset("val")
    assert block_stats(layout, acc.row("val").tolist()).forwards == 0
    assert block_stats(layout, acc.row("train").tolist()).forwards == 2  # untouched
    assert acc.values.shape == (len(PHASES), layout.size)


def test_logged_quantities_round_trip_through_the_declarations():
    stats = _run([torch.tensor([0.01, 0.5, 0.97, float("nan")])]).masks["mask"]
    logged = {"mean": stats.mean, "std": stats.std, "sat_low": 0.25, "sat_high": 0.25}
    back = from_logged(MaskStats, logged)
    assert back.nonfinite == 1 and back.count == 1  # counts are not logged
    assert back.saturated == 0.5


def test_mask_names_that_are_tag_groups_are_refused():
    for bad in ("router", "param", "a/b", ""):
        with pytest.raises(ValueError, match="mask_names"):
            StatisticsLayout((bad,), None, 0)
