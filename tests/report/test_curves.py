"""Series kept in bounded memory: whole up to their limit, an envelope beyond that keeps
every bucket's extremes, the first and last point and every non-finite value's bucket."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_attn.report.curves import Series, SeriesBuilder


def _built(steps, values, limit: int, chunk: int = 997) -> Series:
    b = SeriesBuilder(limit)
    for i in range(0, len(steps), chunk):
        b.steps.extend(int(s) for s in steps[i:i + chunk])
        b.values.extend(float(v) for v in values[i:i + chunk])
        b.flush()
    return b.finish()


def _random(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(10**7, n, replace=False)) - 10**6  # negative steps too
    values = rng.standard_normal(n)
    values[rng.random(n) < 0.002] = math.nan
    values[rng.random(n) < 0.001] = math.inf
    return steps, values


@pytest.mark.parametrize("seed", range(6))
def test_an_envelope_keeps_each_buckets_extremes_ends_and_nonfinite_points(seed):
    steps, values = _random(seed, 20_000)
    s = _built(steps, values, limit=256)
    assert not s.exact and len(s) == len(steps)
    kept = dict(zip(s.steps, s.values, strict=True))
    assert len(kept) <= 5 * 256 // 4  # at most five points a bucket
    truth = dict(zip(steps.tolist(), values.tolist(), strict=True))
    for step, value in kept.items():  # every point kept is a logged point
        assert truth[step] == value or (math.isnan(value) and math.isnan(truth[step]))
    start, end, low, high = s.envelope()
    shift = 0
    while (int(steps[-1]) >> shift) - (int(steps[0]) >> shift) >= 256 // 4:
        shift += 1
    assert len(start) <= 256 // 4
    buckets = steps >> shift
    for k in np.unique(buckets):
        here = buckets == k
        st, va = steps[here], values[here]
        finite = np.isfinite(va)
        assert st[0] in kept and st[-1] in kept  # first and last point of the bucket
        if finite.any():
            lo, hi = va[finite].min(), va[finite].max()
            assert st[finite][np.argmin(va[finite])] in kept and kept[
                st[finite][np.argmin(va[finite])]] == lo
            assert st[finite][np.argmax(va[finite])] in kept and kept[
                st[finite][np.argmax(va[finite])]] == hi
            i = int(np.searchsorted(start, st[0]))
            assert (low[i], high[i]) == (lo, hi)
        if (~finite).any():  # its first non-finite value is a gap and a mark
            assert st[~finite][0] in kept
            assert int(st[~finite][0]) in s.nonfinite()[0]
    assert s.nonfinite()[1] == int((~np.isfinite(values)).sum())
    finite = np.isfinite(values)
    assert s.extreme("max") == (values[finite].max(), int(steps[finite][np.argmax(
        values[finite])]))
    assert s.extreme("min") == (values[finite].min(), int(steps[finite][np.argmin(
        values[finite])]))
    assert (s.first_step, s.last_step) == (steps[0], steps[-1])
    assert s.last == values[-1] or (math.isnan(s.last) and math.isnan(values[-1]))


def test_a_short_series_is_whole_and_a_repeated_step_keeps_its_later_value():
    s = _built([3, 1, 2, 2, 5], [0.3, 0.1, 0.2, 0.25, 0.5], limit=16, chunk=2)
    assert s.exact and s.steps == [1, 2, 3, 5] and s.values == [0.1, 0.25, 0.3, 0.5]
    assert s.envelope() is None and len(s) == 4
    assert Series([1, 1], [2.0, 3.0]).values == [3.0]


def test_pins_keep_a_point_and_an_extreme_tie_takes_the_earliest_step():
    steps = np.arange(0, 10_000, 10)
    values = np.sin(steps / 300.0)
    values[[200, 700]] = 5.0  # the same highest value twice
    s = _built(steps, values, limit=32)
    s.pin(4321, 0.123)  # a warning's point, kept as it is
    assert dict(zip(s.steps, s.values, strict=True))[4321] == 0.123
    assert s.extreme("max") == (5.0, 2000)


def test_joining_a_resumed_series_lets_the_later_one_win():
    early = Series(range(0, 100), [0.0] * 100)
    late = Series(range(50, 150), [1.0] * 100)
    joined = early.joined(late)
    assert joined.exact and len(joined) == 150
    assert joined.values[:50] == [0.0] * 50 and joined.values[50:] == [1.0] * 100
    big = _built(np.arange(0, 5000), np.zeros(5000), limit=64)
    out = big.joined(_built(np.arange(4000, 9000), np.ones(5000), limit=64))
    assert not out.exact and not out.ordered  # the report rebuilds it from every point
    assert (out.first_step, out.last_step) == (0, 8999) and out.last == 1.0
