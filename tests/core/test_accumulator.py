"""An ``AccumulatorTable`` keeps its blocks' values in one tensor, and the forwards it holds
back and reduces together (``settle``) add what each forward's own ``Accumulator.add``
adds."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_attn.core.accumulator import (
    HELD_ELEMENTS,
    HELD_VALUES,
    Accumulator,
    AccumulatorTable,
)
from lightning_attn.core.statistics import MASK_SLOTS, RecordingConfig, StatisticsLayout

CONFIG = RecordingConfig(saturation_low=0.05, saturation_high=0.95, histogram_bins=8)


def _accumulators(bins: tuple[int, ...]) -> list[Accumulator]:
    names = [("mask",), ("mask_h", "mask_w"), ("mask",), ("a", "b", "c")]
    return [Accumulator(StatisticsLayout(n, None, histogram_bins=b), CONFIG, "cpu")
            for n, b in zip(names, bins, strict=True)]


def _forwards(seed: int) -> list[tuple[int, dict[str, torch.Tensor], bool]]:
    """(accumulator, masks, histograms) of a few forwards: several per block, one mask left
    out, one empty, NaN and Inf among the values, bf16 and float32, values outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)

    def mask(*shape, dtype=torch.float32):
        return torch.rand(*shape, generator=g).to(dtype)

    bad = mask(4, 3, 5, 5)
    bad[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    wide = mask(2, 1, 6, 6) * 1.4 - 0.2  # beyond [0, 1]: counted, not in the histograms
    flat = torch.full((3, 8, 1, 1), 0.5)
    return [
        (0, {"mask": mask(4, 1, 8, 8)}, True),
        (1, {"mask_h": mask(4, 6, 8, 1), "mask_w": mask(4, 6, 1, 8, dtype=torch.bfloat16)}, True),
        (0, {"mask": wide}, True),
        (2, {"mask": bad}, False),
        (3, {"a": flat, "c": mask(3, 8, 1, 1)}, True),  # "b" not recorded
        (3, {"a": mask(0, 8, 1, 1), "b": mask(3, 8, 1, 1)}, True),  # "a" empty
        (1, {"mask_h": mask(2, 6, 8, 1), "mask_w": mask(2, 6, 1, 8)}, True),
        (2, {"mask": None}, True),  # a forward that recorded nothing of its mask
    ]


@pytest.mark.parametrize("bins", [(8, 8, 8, 8), (8, 0, 8, 4)], ids=["same bins", "mixed bins"])
def test_held_forwards_add_what_each_forward_adds(bins):
    immediate, held = _accumulators(bins), _accumulators(bins)
    for accs in (immediate, held):
        g = torch.Generator().manual_seed(1)
        for acc in accs:  # rows that already hold a forward: combined, not replaced
            acc.add({name: torch.rand(2, 3, generator=g) for name in acc.layout.mask_offsets},
                    None, True)
    table = AccumulatorTable(held)
    before = [acc.row("train").clone() for acc in held]
    for a, masks, histograms in _forwards(0):
        immediate[a].add(masks, None, histograms)
        held[a].add(masks, None, histograms)
    assert table.holding  # held back, not added
    for acc, row in zip(held, before, strict=True):
        torch.testing.assert_close(acc.row("train"), row, rtol=0, atol=0, equal_nan=True)
    table.settle()
    assert not table.holding
    for a, b, earlier in zip(immediate, held, before, strict=True):
        want, got = a.row("train"), b.row("train")
        assert not torch.equal(got, earlier)
        exact = torch.ones_like(want, dtype=torch.bool)
        for off in b.layout.mask_offsets.values():  # the float64 sums: to summation order
            exact[off + 1:off + 3] = False
        torch.testing.assert_close(got[exact], want[exact], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[~exact], want[~exact], rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
    settled = [acc.row("train").clone() for acc in held]
    table.settle()  # nothing held: nothing changes
    for acc, row in zip(held, settled, strict=True):
        torch.testing.assert_close(acc.row("train"), row, rtol=0, atol=0, equal_nan=True)


def test_only_training_forwards_of_small_masks_alone_are_held_back():
    acc = _accumulators((8, 8, 8, 8))[0]
    table = AccumulatorTable([acc])
    acc.add({"mask": torch.rand(2, 4)}, torch.softmax(torch.rand(2, 3), 1), False)  # a router
    acc.add({"mask": torch.rand(2, 4)}, None, torch.tensor(True))  # compiled: in the graph
    acc.add({"mask": torch.rand(HELD_ELEMENTS + 1)}, None, False)  # large: reduced at once
    acc.set_phase("val")
    acc.add({"mask": torch.rand(2, 4)}, None, False)
    assert not table.holding
    acc.set_phase("train")
    acc.add({"mask": torch.rand(2, 4)}, None, False)
    assert table.holding
    acc.reset("train")  # a new window forgets what the last one held
    assert not table.holding
    torch.testing.assert_close(acc.row("train"), acc.initial, rtol=0, atol=0)


def test_a_held_mask_is_what_the_forward_recorded():
    immediate, held = _accumulators((8, 8, 8, 8))[0], _accumulators((8, 8, 8, 8))[0]
    table = AccumulatorTable([held])
    mask = torch.rand(4, 1, 8, 8)
    immediate.add({"mask": mask}, None, True)
    held.add({"mask": mask}, None, True)
    mask.mul_(0.0)  # changed in place after the forward recorded it
    table.settle()
    torch.testing.assert_close(held.row("train"), immediate.row("train"), rtol=1e-12, atol=0)


def test_what_a_table_holds_is_bounded():
    acc = _accumulators((8, 8, 8, 8))[0]
    table = AccumulatorTable([acc])
    forwards = HELD_VALUES // HELD_ELEMENTS + 5
    for _ in range(forwards):  # a consumer that records and never reads
        acc.add({"mask": torch.rand(HELD_ELEMENTS)}, None, False)
        assert table._held_values < HELD_VALUES
    assert table.holding
    table.settle()
    assert acc.row("train")[0] == forwards  # every forward counted


def test_a_table_holds_its_blocks_values_in_one_tensor():
    accs = _accumulators((8, 0, 8, 4))
    g = torch.Generator().manual_seed(3)
    for acc in accs:
        for phase in ("train", "val"):
            acc.set_phase(phase)
            acc.add({name: torch.rand(5, generator=g) for name in acc.layout.mask_offsets},
                    None, True)
        acc.set_phase("train")
    rows = {phase: [acc.row(phase).clone() for acc in accs] for phase in ("train", "val")}
    table = AccumulatorTable(accs)
    assert all(acc.home is table.base and acc.table is table for acc in accs)
    assert all(acc.values.untyped_storage().data_ptr() == table.base.untyped_storage().data_ptr()
               for acc in accs)  # views of it
    for phase, want in rows.items():  # moved as they were
        torch.testing.assert_close(table.gather(phase), torch.cat(want), rtol=0, atol=0)
    accs[2].add({"mask": torch.rand(3, generator=g)}, None, True)  # held back, then added
    assert table.holding
    table.settle()
    assert table.gather("train")[sum(a.layout.size for a in accs[:2])] == 2 == accs[2].row(
        "train")[0]
    again = AccumulatorTable(accs[1:])  # another table over some of them: the same tensor
    assert again.base is table.base and accs[0].table is table and accs[1].table is again
    table.empty("val", [True, False, True, False])
    for i, acc in enumerate(accs):
        want = acc.initial if i in (0, 2) else rows["val"][i]
        torch.testing.assert_close(acc.row("val"), want, rtol=0, atol=0)
    table.empty("train")
    torch.testing.assert_close(table.gather("train"), table.initial, rtol=0, atol=0)


def test_the_slots_terms_are_their_measures():
    v = torch.tensor([0.0, 0.01, 0.5, 0.97, 1.0, math.nan, math.inf, -math.inf, 1.3, -0.2])
    v64 = v.double()
    for slot in MASK_SLOTS:
        term = slot.term(v, v64, CONFIG)
        reduced = (term.sum() if slot.reduce == "sum" else
                   term.amin() if slot.reduce == "min" else term.amax()).double()
        torch.testing.assert_close(reduced, slot.measure(v, v64, CONFIG).double(),
                                   equal_nan=True, rtol=0, atol=0)
