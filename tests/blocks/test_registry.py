"""create_attention / attention_names / register_attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_attn.blocks import (
    BUILTIN_FACTORIES,
    CoordinateAttention,
    DynamicSpatialAttention,
    FactoryRegistration,
    IdentityAttention,
    attention_names,
    create_attention,
    register_attention,
)


def test_known_names():
    names = attention_names()
    assert {"dsa", "coord", "none"} <= set(names)
    assert names == sorted(names)


def test_create_dsa_with_kwargs():
    block = create_attention("dsa", 64, kernels=(5,), gate="hardsigmoid", temperature=2.0,
                             use_dilated=False, return_router_weights=True, backend="plain")
    assert type(block) is DynamicSpatialAttention
    assert block.kernel_sizes == (5,) and block.num_branches == 1
    assert block.gate == "hardsigmoid" and float(block.temperature) == 2.0
    assert block.backend == "plain"
    x = torch.randn(2, 64, 6, 6)
    y, mask, rw = block(x)
    assert y.shape == x.shape and rw.shape == (2, 1)


def test_create_dsa_does_not_depend_on_channels():
    a = create_attention("dsa", 8)
    b = create_attention("dsa", 256)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_create_coord_with_kwargs():
    block = create_attention("coord", 32, reduction=4, per_axis_alpha=True, alpha=0.5,
                             learnable_alpha=True, head_groups=2)
    assert type(block) is CoordinateAttention
    assert block.in_channels == 32 and block.mid_channels == 8
    assert block.per_axis_alpha and set(block.trainable_attention_parameters()) == {
        "alpha_h", "alpha_w"
    }
    assert block.conv_h.groups == 2
    x = torch.randn(2, 32, 5, 6)
    assert block(x).shape == x.shape
    with pytest.raises(ValueError, match="in_channels"):
        block(torch.randn(2, 16, 5, 6))


def test_create_none_returns_input_unchanged():
    block = create_attention("none", 16)
    assert isinstance(block, IdentityAttention) and isinstance(block, nn.Module)
    assert list(block.parameters()) == [] and len(block.state_dict()) == 0
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert block(x) is x


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        create_attention("cbam", 16)
    message = str(err.value)
    assert "cbam" in message
    for name in attention_names():
        assert name in message
    with pytest.raises(ValueError):
        create_attention(None, 16)
    with pytest.raises(ValueError):
        create_attention("DSA ", 16)


@pytest.mark.parametrize("channels", [0, -3, 1.5, True, "16"])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match="channels"):
        create_attention("coord", channels)


def test_constructor_errors_pass_through():
    with pytest.raises(ValueError, match="head_groups"):
        create_attention("coord", 16, head_groups=3)
    with pytest.raises(ValueError, match="gate"):
        create_attention("dsa", 16, gate="tanh")
    with pytest.raises(TypeError):
        create_attention("dsa", 16, no_such_option=1)


class Mine(nn.Module):
    def __init__(self, channels, scale=1.0):
        super().__init__()
        self.channels, self.scale = channels, scale

    def forward(self, x):
        return x * self.scale


def test_register_attention_returns_the_handle_that_undoes_it():
    before = attention_names()
    registration = register_attention("mine", Mine)
    try:
        assert isinstance(registration, FactoryRegistration)
        assert attention_names() == sorted([*before, "mine"])
        block = create_attention("mine", 12, scale=2.0)
        assert isinstance(block, Mine) and block.channels == 12 and block.scale == 2.0
        with pytest.raises(ValueError, match="'mine' is already registered"):
            register_attention("mine", Mine)
        with pytest.raises(ValueError, match="'dsa' is already built in"):
            register_attention("dsa", Mine)
        with pytest.raises(ValueError, match="non-empty string"):
            register_attention("", Mine)
        with pytest.raises(TypeError, match="factory must be callable"):
            register_attention("other", 3)
    finally:
        registration.remove()
    assert attention_names() == before
    registration.remove()  # a second call does nothing
    with register_attention("mine", Mine):
        assert "mine" in attention_names()
    assert attention_names() == before


def test_factories_for_one_call_leave_the_process_untouched():
    before = attention_names()
    block = create_attention("mine", 6, factories={"mine": Mine}, scale=3.0)
    assert isinstance(block, Mine) and block.channels == 6 and block.scale == 3.0
    assert attention_names({"mine": Mine}) == sorted([*before, "mine"])
    assert attention_names() == before and "mine" not in BUILTIN_FACTORIES
    with pytest.raises(ValueError, match=r"unknown attention name 'mine'.*'coord'"):
        create_attention("mine", 6)
    with pytest.raises(ValueError, match="'coord' is already built in"):
        create_attention("coord", 6, factories={"coord": Mine})
    with pytest.raises(TypeError, match=r"factories\['mine'\] must be callable"):
        create_attention("mine", 6, factories={"mine": "Mine"})
    with pytest.raises(TypeError, match="factories must be a mapping"):
        create_attention("mine", 6, factories=[Mine])


def test_the_builtin_factories_are_immutable():
    with pytest.raises(TypeError):
        BUILTIN_FACTORIES["mine"] = Mine  # type: ignore[index]
    assert set(BUILTIN_FACTORIES) == {"dsa", "coord", "none"}


def test_the_blocks_package_exports_the_blocks_api():
    import lightning_attn.blocks

    for name in ("create_attention", "attention_names", "DynamicSpatialAttention",
                 "CoordinateAttention", "CoordinateAtt", "quick_mask_check",
                 "RecordingMixin", "AttentionBlock"):
        assert name in lightning_attn.blocks.__all__, name
