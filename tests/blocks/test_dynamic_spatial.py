"""DynamicSpatialAttention: parity with the seed class, the SPEC formulas, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_attn.blocks import DynamicSpatialAttention
from lightning_attn.core import RecordingConfig
from lightning_attn.core.statistics import block_stats

from . import seed_reference as seed
from ._util import (
    BACKENDS,
    DSA_CASES,
    TOL,
    assert_close,
    assert_runs_match,
    lib_dsa_from,
    run_block,
    seed_dsa,
)

DTYPES = [torch.float32, torch.float64]

# --------------------------------------------------------------------------------------
# 1. Seed parity: the seed's state dict, strict load, same outputs and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(DSA_CASES))
def test_seed_parity(case, dtype, backend):
    kwargs = DSA_CASES[case]
    ref = seed_dsa(kwargs)
    lib = lib_dsa_from(ref, kwargs, backend)  # strict=True load inside
    assert set(lib.state_dict()) == set(ref.state_dict())
    assert lib.num_branches == ref.num_branches
    ref.to(dtype)
    lib.to(dtype)
    x = torch.randn(3, 6, 9, 10, dtype=dtype)
    got = run_block(lib, x)
    want = run_block(ref, x)
    n_out = 3 if kwargs.get("return_router_weights") else 2
    assert len(got[0]) == n_out
    # outputs y, mask (and rw); loss sum((o * g).mean()) over all of them
    assert_runs_match(got, want, TOL[dtype], f"{case} backend={backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_parity_router_weights_not_returned_still_match(backend):
    """The router weights the library computes equal the seed's even when not returned."""
    kwargs = {"kernels": (3, 5), "router_hidden": 4}
    ref = seed_dsa({**kwargs, "return_router_weights": True})
    lib = lib_dsa_from(ref, kwargs, backend)
    lib.configure_recording(RecordingConfig(histogram_bins=0), "cpu")
    lib.start_recording()
    x = torch.randn(4, 5, 8, 8)
    _, _, rw = ref(x)
    assert len(lib(x)) == 2
    router = block_stats(lib.statistics_layout, lib.recorded_statistics().tolist()).router
    usage = torch.tensor(router.usage, dtype=torch.float64)
    assert_close(usage, rw.detach().double().mean(0), 1e-6, "router weights")


def test_state_dict_keys_are_the_seeds():
    fixed = DynamicSpatialAttention()
    assert set(fixed.state_dict()) == {
        "branches.0.weight", "branches.1.weight", "branches.2.weight", "T",
        "router.1.weight", "router.1.bias", "router.3.weight", "router.3.bias",
    }
    learn = DynamicSpatialAttention(learnable_temperature=True, bias=False)
    assert "t_raw" in learn.state_dict() and "T" not in learn.state_dict()
    assert "router.1.bias" not in learn.state_dict()


def test_library_state_dict_loads_into_seed():
    kwargs = DSA_CASES["all"]
    lib = DynamicSpatialAttention(**kwargs)
    ref = seed.DynamicSpatialAttention(**kwargs)
    ref.load_state_dict(lib.state_dict(), strict=True)
    x = torch.randn(2, 4, 7, 7)
    for a, b in zip(lib(x), ref(x), strict=True):
        assert_close(a, b, 1e-5, "lib -> seed")


# --------------------------------------------------------------------------------------
# The SPEC's formulas, restated functionally
# --------------------------------------------------------------------------------------


def _odd(k: int) -> int:
    return k + 1 if k % 2 == 0 else k


def dsa_formula(x: torch.Tensor, sd: dict, kw: dict):
    """docs/spec.md section 1, op by op, from a state dict."""
    kernels = [_odd(k) for k in kw.get("kernels", (3, 7))]
    s = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    pooled = s.mean(dim=(2, 3), keepdim=True)
    hidden = torch.relu(F.conv2d(pooled, sd["router.1.weight"], sd.get("router.1.bias")))
    logits = F.conv2d(hidden, sd["router.3.weight"], sd.get("router.3.bias")).flatten(1)
    rw = torch.softmax(logits, dim=1)
    zs = [F.conv2d(s, sd[f"branches.{i}.weight"], padding=k // 2) for i, k in enumerate(kernels)]
    if kw.get("use_dilated", True):
        k, d = _odd(kw.get("dilated_kernel", 7)), kw.get("dilated_d", 2)
        w = sd[f"branches.{len(kernels)}.weight"]
        zs.append(F.conv2d(s, w, padding=d * (k - 1) // 2, dilation=d))
    wlogit = sum(rw[:, i, None, None, None] * z for i, z in enumerate(zs))
    if kw.get("learnable_temperature", False):
        t = torch.log1p(torch.exp(sd["t_raw"])) + kw.get("eps", 1e-6)
    else:
        t = sd["T"]
    v = wlogit / t
    mask = torch.sigmoid(v) if kw.get("gate", "sigmoid") == "sigmoid" else (v / 6 + 0.5).clamp(0, 1)
    return x * mask, mask, rw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["default", "only_dilated", "even_kernels", "all"])
def test_matches_spec_formula_float64(case, backend):
    kw = DSA_CASES[case]
    lib = DynamicSpatialAttention(**kw, backend=backend).double()
    sd = {k: v.detach() for k, v in lib.state_dict().items()}
    x = torch.randn(2, 5, 8, 9, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    out = lib(x1)
    y, mask = out[0], out[1]
    ry, rmask, rrw = dsa_formula(x2, sd, kw)
    assert_close(y, ry, 1e-10, "y")
    assert_close(mask, rmask, 1e-10, "mask")
    if kw.get("return_router_weights"):
        assert_close(out[2], rrw, 1e-10, "router weights")
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad((y * g).mean() + mask.mean(), x1)
    (rgx,) = torch.autograd.grad((ry * g).mean() + rmask.mean(), x2)
    assert_close(gx, rgx, 1e-10, "grad x")


def test_temperature_divides_the_logit():
    """mask(T) = gate(wlogit / T): a sigmoid mask's logit scales as 1/T."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    a = DynamicSpatialAttention(temperature=1.0).double()
    b = DynamicSpatialAttention(temperature=4.0).double()
    b.load_state_dict({**a.state_dict(), "T": torch.tensor(4.0, dtype=torch.float64)})
    la = torch.logit(a(x)[1])
    lb = torch.logit(b(x)[1])
    assert_close(la, 4.0 * lb, 1e-9, "logit scaling")


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_even_kernel_raised_by_one(backend):
    block = DynamicSpatialAttention(kernels=(4,), dilated_kernel=6, dilated_d=2, backend=backend)
    assert block.branches[0].kernel_size == (5, 5)
    assert block.branches[0].padding == (2, 2)
    assert block.branches[1].kernel_size == (7, 7)
    assert block.branches[1].padding == (6, 6)
    assert block.num_branches == 2
    x = torch.randn(2, 3, 7, 11)
    y, mask = block(x)
    assert y.shape == x.shape
    assert mask.shape == (2, 1, 7, 11)


@pytest.mark.parametrize(
    "kwargs, k",
    [({}, 3), ({"kernels": (5,)}, 2), ({"kernels": (), "use_dilated": True}, 1),
     ({"kernels": (1, 3, 5, 7)}, 5), ({"use_dilated": False}, 2)],
)
def test_number_of_branches_and_router_width(kwargs, k):
    block = DynamicSpatialAttention(**kwargs, return_router_weights=True)
    assert block.num_branches == k
    _, _, rw = block(torch.randn(3, 4, 6, 6))
    assert rw.shape == (3, k)
    torch.testing.assert_close(rw.sum(dim=1), torch.ones(3))


def test_seed_turns_kernel_zero_into_one_library_raises():
    """Intended difference: the seed silently builds a 1x1 branch for k=0, the library raises."""
    assert seed.DynamicSpatialAttention(kernels=(0,)).branches[0].kernel_size == (1, 1)
    with pytest.raises(ValueError, match="kernels"):
        DynamicSpatialAttention(kernels=(0,))


# --------------------------------------------------------------------------------------
# 2. Stable inverse softplus
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [100.0, 1.0, 0.01, 1000.0, 0.5, 7.0])
def test_learnable_temperature_starts_at_temperature(t):
    block = DynamicSpatialAttention(temperature=t, learnable_temperature=True)
    value = block.temperature
    assert isinstance(value, torch.Tensor) and value.dim() == 0
    assert torch.isfinite(value) and torch.isfinite(block.t_raw)
    assert abs(float(value.detach()) - t) <= 1e-6 * t, float(value.detach())
    # and it stays learnable: a finite gradient reaches t_raw
    y, mask = block(torch.randn(2, 3, 5, 5))
    mask.mean().backward()
    assert block.t_raw.grad is not None and torch.isfinite(block.t_raw.grad)


def test_seed_inverse_softplus_overflows_at_100():
    """Why the library needs its own formula: the seed's gives t_raw = inf for T = 100."""
    ref = seed.DynamicSpatialAttention(temperature=100.0, learnable_temperature=True)
    assert not torch.isfinite(ref.t_raw)
    lib = DynamicSpatialAttention(temperature=100.0, learnable_temperature=True)
    assert torch.isfinite(lib(torch.randn(1, 2, 4, 4))[1]).all()


def test_learnable_temperature_init_no_worse_than_seed():
    """Documented difference: the library starts at T exactly; the seed is off by ~eps."""
    for t in (0.5, 2.0, 5.0):
        lib = DynamicSpatialAttention(temperature=t, learnable_temperature=True)
        ref = seed.DynamicSpatialAttention(temperature=t, learnable_temperature=True)
        lib_err = abs(float(lib.temperature.detach()) - t)
        ref_err = abs(float(ref._get_T().detach()) - t)
        assert lib_err <= 2.5e-7 * max(t, 1.0)
        assert ref_err <= 1e-5  # close, but not exactly
        assert lib_err <= ref_err + 1e-7


def test_temperature_below_eps_is_rejected_or_exact():
    """T = softplus(t_raw) + eps can never be below eps; asking for it must not silently start
    somewhere else (the library gives T = 1.1e-6 for temperature=1e-7)."""
    try:
        block = DynamicSpatialAttention(temperature=1e-7, learnable_temperature=True)
    except ValueError as err:
        assert "temperature" in str(err)
    else:
        value = float(block.temperature.detach())
        assert abs(value - 1e-7) <= 1e-6 * 1e-7, (
            f"learnable temperature=1e-7 (< eps=1e-6) starts at {value}"
        )


def test_fixed_temperature_is_buffer_and_property():
    block = DynamicSpatialAttention(temperature=2.5)
    assert "T" in dict(block.named_buffers())
    assert float(block.temperature.detach()) == 2.5
    assert block.trainable_attention_parameters() == {}
    assert not any(n == "t_raw" for n, _ in block.named_parameters())


def test_dsa_outputs_shapes_and_range():
    block = DynamicSpatialAttention(return_router_weights=True)
    x = torch.randn(2, 7, 9, 5)
    with torch.no_grad():
        y, mask, rw = block(x)
    assert y.shape == x.shape and mask.shape == (2, 1, 9, 5) and rw.shape == (2, 3)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    torch.testing.assert_close(y, x * mask)
    assert math.isclose(float(rw.sum()), 2.0, rel_tol=1e-6)
