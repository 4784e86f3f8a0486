"""Each block checks its arguments in one place, a frozen settings class, and builds its
layers from the result; the constructor itself only wires the two together."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks.coordinate import CoordinateSettings
from lightning_attn.blocks.dynamic_spatial import DynamicSpatialSettings

PAIRS = [(CoordinateAttention, CoordinateSettings),
         (DynamicSpatialAttention, DynamicSpatialSettings)]
IDS = ["coord", "dsa"]


@pytest.mark.parametrize(("block", "settings"), PAIRS, ids=IDS)
def test_the_check_takes_every_constructor_argument(block, settings) -> None:
    arguments = [p for p in inspect.signature(block.__init__).parameters if p != "self"]
    checked = [p for p in inspect.signature(settings.check).parameters if p != "owner"]
    assert sorted(checked) == sorted(arguments)


@pytest.mark.parametrize(("block", "settings"), PAIRS, ids=IDS)
def test_settings_are_frozen_and_the_block_keeps_its_attributes(block, settings) -> None:
    built = block(16)
    checked = settings.check(block.__name__, **{
        p.name: (16 if p.name == "channels" else p.default)
        for p in inspect.signature(block.__init__).parameters.values() if p.name != "self"
    })
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.backend = "plain"
    for name in settings.ATTRIBUTES:
        assert getattr(built, name) == getattr(checked, name), name


@pytest.mark.parametrize("make", [
    lambda: CoordinateAttention(8, fused=True),
    lambda: DynamicSpatialAttention(fused=False),
    lambda: DynamicSpatialAttention((3, 5)),
], ids=["coord fused", "dsa fused", "dsa kernels first"])
def test_deprecation_warnings_point_at_the_callers_line(make) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    assert [w.category for w in caught] == [FutureWarning]
    assert caught[0].filename == __file__
