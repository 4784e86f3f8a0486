"""The statistics, against values computed by hand."""

import math

import pytest
import torch

from lightning_attn.callbacks import (
    mask_stats_from_sums,
    mask_sums,
    router_entropy,
    router_stats_from_sums,
    router_sums,
)
from lightning_attn.callbacks.statistics import histogram_counts


def _mask_stats(mask, low=0.05, high=0.95):
    sums = mask_sums(mask, low, high).tolist()
    return mask_stats_from_sums([mask.numel(), *sums])


def test_mask_statistics_by_hand():
    values = [0.0, 0.02, 0.5, 0.97, 1.0, 0.5]
    stats = _mask_stats(torch.tensor(values).view(1, 1, 2, 3))
    mean = sum(values) / 6
    var = sum((v - mean) ** 2 for v in values) / 5  # unbiased, like torch.std
    assert stats.count == 6
    assert stats.mean == pytest.approx(mean, abs=1e-7)
    assert stats.std == pytest.approx(math.sqrt(var), abs=1e-6)
    assert stats.sat_low == pytest.approx(2 / 6)
    assert stats.sat_high == pytest.approx(2 / 6)
    assert stats.saturated == pytest.approx(4 / 6)
    assert stats.nonfinite == 0


def test_mask_thresholds_are_configurable():
    mask = torch.tensor([0.05, 0.1, 0.5, 0.9, 0.95])
    stats = _mask_stats(mask, low=0.2, high=0.8)
    assert (stats.sat_low, stats.sat_high) == (pytest.approx(0.4), pytest.approx(0.4))
    strict = _mask_stats(mask)  # values equal to a threshold are not saturated
    assert (strict.sat_low, strict.sat_high) == (0.0, 0.0)


def test_mask_sums_add_up_over_batches():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(3, 2, 4, 1, generator=g), torch.rand(5, 2, 4, 1, generator=g)]
    total = [sum(p.numel() for p in parts)]
    total += (mask_sums(parts[0], 0.05, 0.95) + mask_sums(parts[1], 0.05, 0.95)).tolist()
    merged = mask_stats_from_sums(total)
    whole = torch.cat(parts)
    assert merged.mean == pytest.approx(whole.double().mean().item(), abs=1e-7)
    assert merged.std == pytest.approx(whole.double().std().item(), abs=1e-6)


def test_constant_mask_has_zero_std_and_nonfinite_is_counted():
    assert _mask_stats(torch.full((4, 1, 3, 3), 0.5)).std == pytest.approx(0.0, abs=1e-7)
    bad = torch.tensor([0.5, float("nan"), float("inf"), 0.2])
    stats = _mask_stats(bad)
    assert stats.nonfinite == 2
    assert not math.isfinite(stats.mean)


def test_empty_and_single_value():
    assert mask_stats_from_sums([0, 0, 0, 0, 0, 0]) is None
    assert _mask_stats(torch.tensor([0.3])).std == 0.0


def test_router_statistics_by_hand():
    rw = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert router_entropy(rw).tolist() == pytest.approx([0.0, math.log(3)], abs=1e-6)
    stats = router_stats_from_sums([2, *router_sums(rw).tolist()])
    assert stats.entropy == pytest.approx(math.log(3) / 2, abs=1e-6)
    assert stats.entropy_norm == pytest.approx(0.5, abs=1e-6)
    assert stats.usage == pytest.approx((2 / 3, 1 / 6, 1 / 6), abs=1e-6)
    assert stats.num_branches == 3 and stats.nonfinite == 0


def test_router_single_branch_and_nan():
    one = router_stats_from_sums([4, *router_sums(torch.ones(4, 1)).tolist()])
    assert one.entropy == 0.0 and one.entropy_norm == 0.0 and one.usage == (1.0,)
    rw = torch.tensor([[0.5, float("nan")], [0.5, 0.5]])
    assert router_stats_from_sums([2, *router_sums(rw).tolist()]).nonfinite == 1
    assert router_stats_from_sums([0, 0, 0, 0, 0]) is None


def test_histogram_counts_finite_values_in_unit_interval():
    values = torch.tensor([0.0, 0.1, 0.1, 0.99, 1.0, float("nan"), float("inf"), -0.5, 1.5])
    counts = histogram_counts(values, bins=10)
    assert counts.sum().item() == 5
    assert counts[0].item() == 1 and counts[1].item() == 2 and counts[9].item() == 2
