"""Both blocks as true timm drop-ins, with the real timm (random init, nothing downloads):
``attn_layer=`` / ``se_layer=`` / ``create_attn``, the ``device`` / ``dtype`` factory
keywords, timm's names, and timm's ``CoordAttn`` weights loaded into CoordinateAttention."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import timm
import torch
from timm.layers import create_attn
from timm.layers.activations import HardSwish as TimmHardSwish
from timm.layers.coord_attn import CoordAttn
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from lightning_attn.blocks import (
    CoordinateAttention,
    DynamicSpatialAttention,
    find_attention_blocks,
)

from ._util import BACKENDS

X = torch.randn(2, 3, 32, 32)


def _blocks(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


def _runs(model: nn.Module, num_classes: int = 3) -> None:
    y = model(X)
    assert y.shape == (2, num_classes) and torch.isfinite(y).all()
    y.sum().backward()


# -- timm.create_model ------------------------------------------------------------------------


def test_resnet18_attn_layer_coordinate_attention() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3,
                              block_args=dict(attn_layer=CoordinateAttention))
    blocks = _blocks(model, CoordinateAttention)
    assert [b.in_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert all(model.get_submodule(n) is b for n, b in find_attention_blocks(model)[0].items())
    _runs(model)
    assert blocks[0].conv_h.weight.grad is not None


def test_resnet18_attn_layer_dsa_returning_a_tensor() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3,
                              block_args=dict(attn_layer=partial(DynamicSpatialAttention,
                                                                 return_mask=False)))
    blocks = _blocks(model, DynamicSpatialAttention)
    assert len(blocks) == 8 and blocks[0].channels == 64  # timm passes the channels
    _runs(model)


@pytest.mark.parametrize("layer", [CoordinateAttention,
                                   partial(DynamicSpatialAttention, return_mask=False)])
def test_efficientnet_b0_se_layer(layer) -> None:
    """EfficientNet's builder probes ``se_layer(8, rd_ratio=1.0)`` and then passes each block's
    rd_ratio: CoordinateAttention takes it as its middle width, DSA checks it and has no use
    for it."""
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3,
                              se_layer=layer)
    cls = layer if isinstance(layer, type) else layer.func
    blocks = _blocks(model, cls)
    assert len(blocks) == 16
    if cls is CoordinateAttention:
        # se_ratio 0.25 of the block input: 32 -> 8 in the first block (expansion 1),
        # 1152 -> 48 in the last (1152 = 6 x 192, rd_ratio = 0.25 / 6)
        widths = {(b.in_channels, b.mid_channels) for b in blocks}
        assert {(32, 8), (1152, 48)} <= widths
        assert {b.act_name for b in blocks} == {"silu"}  # the block's activation, passed on
    else:
        assert {b.router_act for b in blocks} == {"silu"}
    _runs(model)


@pytest.mark.parametrize("layer", [partial(CoordinateAttention, gate_layer="hard_sigmoid"),
                                   partial(DynamicSpatialAttention, return_mask=False,
                                           gate_layer="hard_sigmoid")])
def test_mobilenetv3_se_layer(layer) -> None:
    """MobileNetV3's builder passes ReLU or Hardswish (per block) and rd_ratio. (timm's
    ``create_model("mobilenetv3_*", se_layer=...)`` cannot take an se_layer at all: its
    generators set their own, so the class is built directly.)"""
    arch = [["ds_r1_k3_s2_e1_c16_se0.25_nre"], ["ir_r1_k3_s2_e4.5_c24_nre"],
            ["ir_r1_k5_s2_e4_c40_se0.25"]]
    model = MobileNetV3(block_args=decode_arch_def(arch), num_classes=3, num_features=64,
                        act_layer=nn.Hardswish, se_layer=layer)
    blocks = _blocks(model, layer.func)
    attr = "act_name" if layer.func is CoordinateAttention else "router_act"
    assert [getattr(b, attr) for b in blocks] == ["relu", "hswish"]
    assert {b.gate for b in blocks} == {"hardsigmoid"}
    assert isinstance(blocks[1].act if attr == "act_name" else blocks[1].router[2], nn.Hardswish)
    _runs(model)


def test_create_attn_builds_both_blocks() -> None:
    dsa = create_attn(DynamicSpatialAttention, 64)
    assert isinstance(dsa, DynamicSpatialAttention) and dsa.channels == 64
    coord = create_attn(CoordinateAttention, 64, rd_ratio=1 / 4)
    assert coord.in_channels == 64 and coord.mid_channels == 16
    x = torch.randn(2, 64, 5, 6)
    assert dsa(x)[0].shape == coord(x).shape == x.shape
    with pytest.raises(ValueError, match=r"\(B, 64, H, W\).*channels=64.*\(2, 32, 5, 6\)"):
        dsa(torch.randn(2, 32, 5, 6))  # the channels timm passed are checked


@pytest.mark.parametrize("device, dtype", [("meta", None), (None, torch.bfloat16)])
def test_create_model_device_and_dtype_reach_our_parameters(device, dtype) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, device=device,
                              dtype=dtype, block_args=dict(attn_layer=CoordinateAttention))
    expected_device = torch.device(device or "cpu")
    expected_dtype = dtype or torch.float32
    block = _blocks(model, CoordinateAttention)[0]
    for t in (*block.parameters(), *block.buffers()):
        assert t.device == expected_device
        assert t.dtype == expected_dtype or not t.is_floating_point()


@pytest.mark.parametrize("cls", [DynamicSpatialAttention, CoordinateAttention])
def test_factory_keywords_create_parameters_in_place(cls) -> None:
    kw = {"learnable_temperature": True} if cls is DynamicSpatialAttention else {
        "learnable_alpha": True, "beta": 0.5, "learnable_beta": True, "spatial_gate": True,
        "axis_kernel": 3}
    block = cls(16, device="meta", dtype=torch.float64, **kw)
    tensors = [*block.parameters(), *block.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        cls(16, dtype=torch.int64)
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        cls(16, device="gpu0")


# -- timm's names -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, name", [
    ("swish", "silu"), ("silu", "silu"), (nn.SiLU, "silu"), ("hard_swish", "hswish"),
    (nn.Hardswish, "hswish"), (TimmHardSwish, "hswish"), ("gelu", "gelu"),
    ("gelu_tanh", "gelu_tanh"), ("mish", "mish"), ("relu6", "relu6"),
    (partial(nn.ReLU, inplace=True), "relu"), ("quick_gelu", "quick_gelu"),
    ("hard_mish", "hard_mish"), ("identity", "identity"),
])
def test_timm_activation_names_and_classes(value, name) -> None:
    coord = CoordinateAttention(16, act_layer=value)
    dsa = DynamicSpatialAttention(act_layer=value)
    assert coord.act_name == dsa.router_act == name
    x = torch.randn(2, 16, 5, 5)
    assert torch.isfinite(coord(x)).all() and torch.isfinite(dsa(x)[0]).all()
    assert CoordinateAttention(16, act=name).act_name == name  # the same set as act=


def test_rd_names_set_the_middle_width() -> None:
    assert CoordinateAttention(64, rd_ratio=1 / 16).mid_channels == 8  # max(8, 4)
    assert CoordinateAttention(256, rd_ratio=0.3).mid_channels == 76  # floor(76.8)
    assert CoordinateAttention(256, rd_ratio=0.3, rd_divisor=8).mid_channels == 80
    assert CoordinateAttention(64, rd_channels=5).mid_channels == 5
    assert CoordinateAttention(49, rd_ratio=1 / 49, min_mid_channels=1).mid_channels == 1
    with pytest.raises(ValueError, match=r"rd_channels=5 .*contradicts reduction=4"):
        CoordinateAttention(64, rd_channels=5, reduction=4)
    with pytest.raises(ValueError, match=r"rd_divisor=8 needs rd_ratio"):
        CoordinateAttention(64, rd_divisor=8)
    with pytest.raises(ValueError, match=r"gate_layer gives 'sigmoid' but gate='hardsigmoid'"):
        CoordinateAttention(64, gate="hardsigmoid", gate_layer=nn.Sigmoid)
    with pytest.raises(ValueError, match=r"act_layer gives 'silu' but act='relu'"):
        CoordinateAttention(64, act="relu", act_layer="swish")


def test_unknown_keywords_are_type_errors() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'se_factor'"):
        CoordinateAttention(8, se_factor=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'kernelz'"):
        create_attn(DynamicSpatialAttention, 8, kernelz=3)


def test_coord_in_channels_is_the_seed_spelling_of_channels() -> None:
    assert CoordinateAttention(in_channels=24).channels == 24
    assert CoordinateAttention(channels=24).in_channels == 24
    with pytest.raises(TypeError, match="both channels=24 and in_channels=24"):
        CoordinateAttention(24, in_channels=24)
    with pytest.raises(TypeError, match="needs channels"):
        CoordinateAttention()


def test_dsa_kernels_first_positionally_still_works_with_a_future_warning() -> None:
    with pytest.warns(FutureWarning, match=r"taken as kernels.*kernels=\(3, 5\)"):
        block = DynamicSpatialAttention((3, 5))
    assert block.kernel_sizes == (3, 5) and block.channels is None
    with pytest.warns(FutureWarning):
        assert DynamicSpatialAttention([5]).kernel_sizes == (5,)
    with pytest.raises(TypeError, match=r"first argument is now channels.*by keyword"):
        DynamicSpatialAttention((3, 5), True)  # the old positional use_dilated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an int first is channels, silently
        assert DynamicSpatialAttention(32).channels == 32
        assert DynamicSpatialAttention(kernels=(3, 5)).kernel_sizes == (3, 5)


# -- timm's CoordAttn weights ---------------------------------------------------------------


def _randomised_timm(bias: bool) -> CoordAttn:
    torch.manual_seed(1)
    timm_block = CoordAttn(32, bias=bias)
    with torch.no_grad():
        for t in timm_block.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.6 + 0.2)
    return timm_block


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_from_timm_computes_what_timm_coordattn_computes(bias, backend) -> None:
    timm_block = _randomised_timm(bias)
    ours = CoordinateAttention.from_timm(timm_block, backend=backend)
    assert ours.mid_channels == timm_block.conv1.out_channels
    assert (ours.conv_h.bias is not None) == bias  # timm's parameter layout
    x = torch.randn(3, 32, 7, 9, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    for mode in ("eval", "train"):  # running statistics, then batch statistics
        timm_block.train(mode == "train")
        ours.train(mode == "train")
        expected, got = timm_block(x), ours(x2)
        # Not bitwise: timm computes (x * a_w) * a_h, this block x * (a_h * a_w).
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        expected.square().sum().backward()
        got.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        x.grad = x2.grad = None
    # conv1's bias is folded into the running mean, which then tracks timm's minus the bias
    shift = timm_block.conv1.bias.detach() if bias else 0.0
    torch.testing.assert_close(ours.bn1.running_mean, timm_block.bn1.running_mean - shift)
    torch.testing.assert_close(ours.bn1.running_var, timm_block.bn1.running_var)


def test_load_timm_state_dict_into_a_block_with_biases() -> None:
    timm_block = _randomised_timm(bias=False).eval()
    ours = CoordinateAttention(32, rd_channels=timm_block.conv1.out_channels,
                               act_layer=nn.Hardswish).eval()
    ours.load_timm_state_dict(timm_block.state_dict())
    assert not ours.conv_h.bias.any() and not ours.conv_w.bias.any()  # zero: same math
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(ours(x), timm_block(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: CoordinateAttention(32), {}, r"conv1.weight has shape \(12, 32, 1, 1\).*\(8, 32"),
    (lambda: CoordinateAttention(32, rd_channels=12, head_groups=2), {}, "head_groups=2"),
    (lambda: CoordinateAttention(32, rd_channels=12, spatial_gate=True), {}, "spatial_gate"),
    (lambda: CoordinateAttention(32, rd_channels=12, bias=False), {"bias": True},
     "conv_h.bias.*bias=False"),
])
def test_load_timm_state_dict_refuses_another_layout(make, kwargs, match) -> None:
    timm_block = CoordAttn(32, rd_channels=12, **kwargs)
    with pytest.raises(ValueError, match=match):
        make().load_timm_state_dict(timm_block.state_dict())
    with pytest.raises(ValueError, match=r"missing keys \['conv1.weight'.*unexpected.*'fc'"):
        CoordinateAttention(32).load_timm_state_dict({"fc": torch.zeros(1)})


def test_from_timm_refuses_what_the_block_cannot_compute() -> None:
    with pytest.raises(ValueError, match="has_skip=True"):
        CoordinateAttention.from_timm(CoordAttn(32, has_skip=True))
    with pytest.raises(ValueError, match="norm layer is Identity"):
        CoordinateAttention.from_timm(CoordAttn(32, norm_layer=None))
    with pytest.raises(TypeError, match="module must be a timm CoordAttn.*got Conv2d"):
        CoordinateAttention.from_timm(nn.Conv2d(3, 3, 1))
