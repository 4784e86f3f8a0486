"""Every invalid argument or input raises a clear error naming the argument and the value."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

from ._util import BACKENDS

NAN, INF = float("nan"), float("inf")


def _raises(exc, fn, *needles):
    """``fn()`` raises ``exc``; the message contains every needle."""
    with pytest.raises(exc) as err:
        fn()
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------------
# DynamicSpatialAttention constructor
# --------------------------------------------------------------------------------------

DSA_BAD_VALUES = [
    ({"temperature": 0.0}, "temperature", "0"),
    ({"temperature": -1.5}, "temperature", "-1.5"),
    ({"temperature": NAN}, "temperature", "nan"),
    ({"temperature": INF}, "temperature", "inf"),
    ({"temperature": -INF}, "temperature", "inf"),
    ({"temperature": NAN, "learnable_temperature": True}, "temperature", "nan"),
    ({"gate": "tanh"}, "gate", "tanh"),
    ({"gate": ""}, "gate", "''"),
    ({"router_hidden": 0}, "router_hidden", "0"),
    ({"router_hidden": -2}, "router_hidden", "-2"),
    ({"kernels": (0,)}, "kernels", "0"),
    ({"kernels": (3, -1)}, "kernels", "-1"),
    ({"kernels": (3, -4)}, "kernels", "-4"),
    ({"dilated_kernel": 0}, "dilated_kernel", "0"),
    ({"dilated_kernel": -3}, "dilated_kernel", "-3"),
    ({"dilated_d": 0}, "dilated_d", "0"),
    ({"dilated_d": -1}, "dilated_d", "-1"),
    ({"kernels": (), "use_dilated": False}, "kernels", "use_dilated"),
]


@pytest.mark.parametrize("kwargs, name, value", DSA_BAD_VALUES, ids=lambda v: repr(v)[:40])
def test_dsa_bad_values(kwargs, name, value):
    _raises(ValueError, lambda: DynamicSpatialAttention(**kwargs), name, value)


DSA_BAD_TYPES = [
    ({"temperature": "1.0"}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"router_hidden": 8.0}, "router_hidden"),
    ({"kernels": "37"}, "kernels"),
    ({"kernels": 3}, "kernels"),
    ({"kernels": (3.5,)}, "kernels"),
    ({"kernels": ("3",)}, "kernels"),
    ({"dilated_d": 2.0}, "dilated_d"),
    ({"gate": None}, "gate"),
]


@pytest.mark.parametrize("kwargs, name", DSA_BAD_TYPES, ids=lambda v: repr(v)[:40])
def test_dsa_bad_types(kwargs, name):
    with pytest.raises((TypeError, ValueError)) as err:
        DynamicSpatialAttention(**kwargs)
    assert name in str(err.value)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["kernels", "dilated_kernel"])
def test_dsa_non_finite_kernel_size(where, bad):
    """A NaN/inf kernel size must be a ValueError/TypeError that names the argument (int(nan)
    gives a ValueError without the name, int(inf) an OverflowError)."""
    kwargs = {"kernels": (bad,)} if where == "kernels" else {"dilated_kernel": bad}
    with pytest.raises((ValueError, TypeError)) as err:
        DynamicSpatialAttention(**kwargs)
    assert where in str(err.value)


def test_dsa_eps_checked():
    _raises(ValueError, lambda: DynamicSpatialAttention(eps=-1.0), "eps", "-1.0")
    _raises(ValueError, lambda: DynamicSpatialAttention(eps=NAN), "eps", "nan")


def test_dsa_valid_edge_values_accepted():
    assert DynamicSpatialAttention(kernels=(1,), use_dilated=False).num_branches == 1
    assert DynamicSpatialAttention(dilated_d=1, dilated_kernel=1).num_branches == 3
    assert DynamicSpatialAttention(router_hidden=1).router[1].out_channels == 1
    assert DynamicSpatialAttention(gate="HardSigmoid").gate == "hardsigmoid"
    assert DynamicSpatialAttention(temperature=1).temperature.item() == 1.0


# --------------------------------------------------------------------------------------
# CoordinateAttention constructor
# --------------------------------------------------------------------------------------

COORD_BAD_VALUES = [
    (0, {}, "channels", "0"),
    (-4, {}, "channels", "-4"),
    (16, {"reduction": 0}, "reduction", "0"),
    (16, {"reduction": -2}, "reduction", "-2"),
    (16, {"min_mid_channels": 0}, "min_mid_channels", "0"),
    (16, {"act": "swishy"}, "act", "swishy"),
    (16, {"pool": "max"}, "pool", "max"),
    (16, {"gate": "relu"}, "gate", "relu"),
    (16, {"alpha": NAN}, "alpha", "nan"),
    (16, {"alpha": INF}, "alpha", "inf"),
    (16, {"beta": NAN}, "beta", "nan"),
    (16, {"head_groups": 3}, "head_groups", "3"),
    (16, {"head_groups": 0}, "head_groups", "0"),
    (16, {"axis_kernel": 4}, "axis_kernel", "4"),
    (16, {"axis_kernel": 0}, "axis_kernel", "0"),
    (16, {"axis_kernel": -3}, "axis_kernel", "-3"),
    (16, {"axis_kernel": 3, "axis_dilation": 0}, "axis_dilation", "0"),
    (16, {"axis_dilation": 2}, "axis_dilation", "2"),
    (16, {"bottleneck_layers": 3}, "bottleneck_layers", "3"),
    (16, {"bottleneck_layers": 0}, "bottleneck_layers", "0"),
    (16, {"bottleneck_layers": True}, "bottleneck_layers", "True"),
    (16, {"learnable_beta": True}, "learnable_beta", "beta"),
]


@pytest.mark.parametrize("c, kwargs, name, value", COORD_BAD_VALUES,
                         ids=lambda v: repr(v)[:40])
def test_coord_bad_values(c, kwargs, name, value):
    _raises(ValueError, lambda: CoordinateAttention(c, **kwargs), name, value)


def test_head_groups_message_has_both_numbers():
    # divides neither C=16 nor mid=8
    _raises(ValueError, lambda: CoordinateAttention(16, head_groups=3), "3", "16", "8")
    # divides C=64 but not mid=16 (64 // 4)
    msg = _raises(ValueError, lambda: CoordinateAttention(64, reduction=4, head_groups=32),
                  "head_groups", "32", "16")
    assert "64" in msg
    # divides mid=8 but not C=12
    _raises(ValueError, lambda: CoordinateAttention(12, head_groups=8), "8", "12")
    assert CoordinateAttention(64, reduction=4, head_groups=16).conv_h.groups == 16


COORD_BAD_TYPES = [
    (16.0, {}, "channels"),
    ("16", {}, "channels"),
    (16, {"reduction": 2.5}, "reduction"),
    (16, {"head_groups": 2.0}, "head_groups"),
    (16, {"axis_kernel": 3.0}, "axis_kernel"),
    (16, {"alpha": "1"}, "alpha"),
    (16, {"act": None}, "act"),
]


@pytest.mark.parametrize("c, kwargs, name", COORD_BAD_TYPES, ids=lambda v: repr(v)[:40])
def test_coord_bad_types(c, kwargs, name):
    with pytest.raises((TypeError, ValueError)) as err:
        CoordinateAttention(c, **kwargs)
    assert name in str(err.value)


def test_coord_valid_edge_values_accepted():
    assert CoordinateAttention(1).mid_channels == 8
    assert CoordinateAttention(16, axis_kernel=1).dw_h.kernel_size == (1, 1)
    block = CoordinateAttention(16, axis_kernel=5, axis_dilation=3)
    assert block.dw_h.kernel_size == (5, 1) and block.dw_h.dilation == (3, 1)
    assert block.dw_h.padding == (6, 0) and block.dw_w.padding == (0, 6)
    x = torch.randn(2, 16, 7, 9)
    assert block(x).shape == x.shape
    assert CoordinateAttention(16, act="ReLU").act_name == "relu"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

BLOCKS = {
    "dsa": lambda: DynamicSpatialAttention(),
    "dsa_plain": lambda: DynamicSpatialAttention(backend="plain"),
    "coord": lambda: CoordinateAttention(8),
    "coord_plain": lambda: CoordinateAttention(8, backend="plain"),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_input_3d(name):
    block = BLOCKS[name]()
    _raises(ValueError, lambda: block(torch.randn(8, 5, 6)), "4-D", "(8, 5, 6)")
    _raises(ValueError, lambda: block(torch.randn(1, 1, 8, 5, 6)), "4-D", "(1, 1, 8, 5, 6)")


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_input_integer(name, dtype):
    block = BLOCKS[name]()
    x = torch.ones(2, 8, 4, 4, dtype=dtype)
    _raises(TypeError, lambda: block(x), "floating", str(dtype))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_input_not_a_tensor(name):
    block = BLOCKS[name]()
    _raises(TypeError, lambda: block([[1.0]]), "Tensor", "list")


@pytest.mark.parametrize("backend", BACKENDS)
def test_coord_wrong_channel_count(backend):
    block = CoordinateAttention(8, backend=backend)
    msg = _raises(ValueError, lambda: block(torch.randn(2, 6, 5, 5)), "8", "(2, 6, 5, 5)")
    assert "in_channels" in msg or "channels" in msg


def test_dsa_accepts_any_channel_count_and_float_dtypes():
    block = DynamicSpatialAttention()
    for c in (1, 3, 17):
        assert block(torch.randn(1, c, 5, 5))[0].shape == (1, c, 5, 5)
    assert block.double()(torch.randn(1, 2, 4, 4, dtype=torch.float64))[1].dtype == torch.float64


def test_error_values_are_readable():
    """NaN must be reported as nan, not e.g. as a failed comparison."""
    msg = _raises(ValueError, lambda: DynamicSpatialAttention(temperature=NAN), "temperature")
    assert "nan" in msg.lower()
    assert math.isnan(NAN)


@pytest.mark.parametrize(
    ("eps", "exc"), [("x", TypeError), (-1e-3, ValueError), (float("nan"), ValueError)]
)
def test_dsa_bad_eps_names_the_argument(eps, exc):
    with pytest.raises(exc, match="eps"):
        DynamicSpatialAttention(eps=eps)


# --------------------------------------------------------------------------------------
# Meaningful ranges, float32 storage, empty and mismatched inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name, value", [
    ({"alpha": 5.0}, "alpha", "5.0"),
    ({"alpha": -0.1}, "alpha", "-0.1"),
    ({"alpha": 1.5, "learnable_alpha": True}, "alpha", "1.5"),
    ({"alpha": 2.0, "per_axis_alpha": True}, "alpha", "2.0"),
    ({"beta": -3.0}, "beta", "-3.0"),
    ({"beta": 1.01, "learnable_beta": True}, "beta", "1.01"),
])
def test_coord_alpha_and_beta_outside_unit_interval(kwargs, name, value):
    _raises(ValueError, lambda: CoordinateAttention(8, **kwargs), name, value, "[0, 1]")


@pytest.mark.parametrize("value", [0.0, 1.0, 0.25])
def test_coord_alpha_and_beta_edges_accepted(value):
    block = CoordinateAttention(8, alpha=value, beta=value)
    assert float(block.alpha) == value and block.beta == value


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("value, stored", [(1e-46, "0.0"), (1e39, "inf")])
def test_temperature_that_float32_cannot_hold(value, stored, learnable):
    kwargs = {"temperature": value, "learnable_temperature": learnable}
    if learnable and value < 1:
        kwargs["eps"] = 0.0
    _raises(ValueError, lambda: DynamicSpatialAttention(**kwargs), "temperature", stored,
            "float32")


def test_large_and_small_float32_temperatures_accepted():
    assert torch.isfinite(DynamicSpatialAttention(temperature=1e30).temperature)
    assert float(DynamicSpatialAttention(temperature=1e-30).temperature) > 0
    assert torch.isfinite(
        DynamicSpatialAttention(temperature=1e30, learnable_temperature=True).temperature
    )


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("shape, dims", [((2, 0, 4, 4), "C"), ((2, 8, 0, 4), "H"),
                                         ((2, 8, 4, 0), "W")])
def test_input_with_an_empty_dimension(name, shape, dims):
    block = BLOCKS[name]()
    exc = ValueError
    _raises(exc, lambda: block(torch.randn(*shape)), str(shape), f"{dims} = 0")


@pytest.mark.parametrize("name", list(BLOCKS))
def test_empty_batch_runs_like_the_plain_path(name):
    block = BLOCKS[name]()
    x = torch.randn(0, 8, 5, 6, requires_grad=True)
    out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    assert y.shape == (0, 8, 5, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_other_than_the_parameters_outside_autocast(name, dtype):
    block = BLOCKS[name]()
    x = torch.randn(2, 8, 5, 5, dtype=dtype)
    _raises(TypeError, lambda: block(x), str(dtype), "torch.float32", "autocast")


@pytest.mark.parametrize("name", list(BLOCKS))
def test_input_dtype_other_than_the_parameters_inside_autocast_runs(name):
    block = BLOCKS[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(2, 8, 5, 5, dtype=torch.bfloat16))
    y = out[0] if isinstance(out, tuple) else out
    assert y.shape == (2, 8, 5, 5) and torch.isfinite(y.float()).all()


def test_backend_choice_is_checked():
    _raises(ValueError, lambda: DynamicSpatialAttention(backend="cuda"), "backend", "cuda")
    _raises(ValueError, lambda: CoordinateAttention(8, backend="fast"), "backend", "fast")


# --------------------------------------------------------------------------------------
# timm's argument names and DSA's tensor-only output
# --------------------------------------------------------------------------------------


def test_coord_accepts_timm_argument_names():
    a = CoordinateAttention(64, rd_ratio=1 / 16, act_layer=torch.nn.ReLU,
                            gate_layer="hard_sigmoid")
    b = CoordinateAttention(64, reduction=16, act="relu", gate="hardsigmoid")
    assert (a.mid_channels, a.act_name, a.gate) == (b.mid_channels, b.act_name, b.gate)
    assert CoordinateAttention(64, act_layer="hard_swish").act_name == "hswish"
    assert CoordinateAttention(64, gate_layer=torch.nn.Sigmoid).gate == "sigmoid"


@pytest.mark.parametrize("kwargs, needles", [
    ({"rd_ratio": 1.5}, ("rd_ratio", "1.5")),
    ({"rd_ratio": 0.0}, ("rd_ratio", "0.0")),
    ({"rd_ratio": 1 / 8, "reduction": 16}, ("rd_ratio", "reduction=16")),
    ({"act_layer": "swishy"}, ("act_layer", "swishy")),
    ({"act_layer": "prelu"}, ("act_layer", "prelu", "parameters")),
    ({"gate_layer": torch.nn.Tanh}, ("gate_layer", "Tanh")),
])
def test_coord_timm_names_bad_values(kwargs, needles):
    _raises(ValueError, lambda: CoordinateAttention(64, **kwargs), *needles)


def test_dsa_tensor_only_output():
    block = DynamicSpatialAttention(return_mask=False)
    x = torch.randn(2, 4, 6, 6)
    y = block(x)
    assert isinstance(y, torch.Tensor)
    full = DynamicSpatialAttention()
    full.load_state_dict(block.state_dict())
    torch.testing.assert_close(y, full(x)[0])
    _raises(ValueError, lambda: DynamicSpatialAttention(return_mask=False,
                                                        return_router_weights=True),
            "return_mask", "return_router_weights")
