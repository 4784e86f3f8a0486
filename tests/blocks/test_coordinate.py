"""CoordinateAttention: parity with the seed's CoordinateAtt + add-ons, SPEC formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_attn.blocks import CoordinateAtt, CoordinateAttention

from . import seed_reference as seed
from ._util import (
    BACKENDS,
    COORD_C,
    COORD_CASES,
    TOL,
    assert_close,
    assert_runs_match,
    lib_coord_from,
    run_block,
    seed_coord,
    spy_masks,
)

DTYPES = [torch.float32, torch.float64]
X_SHAPE = (3, COORD_C, 6, 7)

# --------------------------------------------------------------------------------------
# 1. Seed parity for every add-on alone and all together, train and eval mode
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(COORD_CASES))
def test_seed_parity(case, dtype, backend, mode):
    lib_kw, seed_kw = COORD_CASES[case]
    ref = seed_coord(seed_kw)
    lib = lib_coord_from(ref, lib_kw, backend)  # strict=True load inside
    assert set(lib.state_dict()) == set(ref.state_dict())
    ref.to(dtype).train(mode == "train")
    lib.to(dtype).train(mode == "train")
    x = torch.randn(*X_SHAPE, dtype=dtype)
    masks = spy_masks(lib)
    got = run_block(lib, x)
    want = run_block(ref, x)
    tol = TOL[dtype]
    assert_runs_match(got, want, tol, f"{case} backend={backend} {mode}")
    # the axis masks (the seed keeps those of its last forward)
    assert_close(masks["a_h"], ref._last_ah, tol, "a_h")
    assert_close(masks["a_w"], ref._last_aw, tol, "a_w")
    # BatchNorm running statistics moved (train) or stayed (eval) identically
    ref_buffers = dict(ref.named_buffers())
    for name, buf in lib.named_buffers():
        if name in ref_buffers:
            assert_close(buf, ref_buffers[name], tol, f"buffer {name}")


def test_reference_without_add_ons_is_the_verbatim_seed():
    """Sanity of the reference: the add-on class with every flag off is the seed's class."""
    addons = seed_coord({})
    verbatim = seed.CoordinateAtt(COORD_C)
    verbatim.load_state_dict(addons.state_dict(), strict=True)
    x = torch.randn(*X_SHAPE)
    assert torch.equal(addons(x), verbatim(x))


def test_add_on_names_follow_the_seed():
    lib_kw, _ = COORD_CASES["all"]
    names = set(CoordinateAttention(COORD_C, **lib_kw).state_dict())
    for key in ("dw_h.weight", "dw_w.weight", "alpha_h", "alpha_w", "conv1a.weight",
                "bn1a.running_mean", "conv1b.weight", "bn1b.weight", "conv_h.weight",
                "conv_w.bias", "spatial_dw.weight", "spatial_pw.bias", "beta"):
        assert key in names, key
    assert "conv1.weight" not in names and "alpha" not in names
    block = CoordinateAttention(COORD_C, head_groups=4)
    assert block.conv_h.groups == 4 and block.conv_w.groups == 4
    fixed_beta = CoordinateAttention(COORD_C, beta=0.5)
    assert "beta" not in fixed_beta.state_dict()  # the seed's beta is a plain attribute
    assert CoordinateAtt is CoordinateAttention


def test_beta_not_representable_in_float32_float64_parity():
    """The seed's fixed beta is a Python float; after ``.double()`` the seed computes with
    beta = 0.7 exactly. The library stores it in a float32 buffer (0.699999988...), so in
    float64 the outputs differ by ~1e-8, far above the 1e-10 parity tolerance."""
    ref = seed_coord({"beta": 0.7})
    lib = lib_coord_from(ref, {"beta": 0.7}, backend="plain")
    ref.double().eval()
    lib.double().eval()
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    assert_close(lib(x), ref(x), 1e-10, "y with beta=0.7 in float64")


# --------------------------------------------------------------------------------------
# The SPEC's formulas, restated functionally
# --------------------------------------------------------------------------------------


def _bn(t, sd, prefix, training):
    return F.batch_norm(
        t, sd[f"{prefix}.running_mean"].clone(), sd[f"{prefix}.running_var"].clone(),
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training, 0.1, 1e-5,
    )


def coord_formula(x, p, kw, training):
    """docs/spec.md section 2 from a parameter dict ``p`` (state dict + alpha/beta values)."""
    c = x.shape[1]
    h = x.shape[2]
    x_h = x.mean(dim=3, keepdim=True)  # (B,C,H,1)
    x_w = x.mean(dim=2, keepdim=True)  # (B,C,1,W)
    if kw.get("pool", "mean") == "mean_max":
        x_h = 0.5 * (x_h + x.amax(dim=3, keepdim=True))
        x_w = 0.5 * (x_w + x.amax(dim=2, keepdim=True))
    if kw.get("axis_kernel") is not None:
        k, d = kw["axis_kernel"], kw.get("axis_dilation", 1)
        pad = d * (k - 1) // 2
        x_h = F.conv2d(x_h, p["dw_h.weight"], padding=(pad, 0), dilation=(d, 1), groups=c)
        x_w = F.conv2d(x_w, p["dw_w.weight"], padding=(0, pad), dilation=(1, d), groups=c)
    y = torch.cat([x_h, x_w.transpose(2, 3)], dim=2)  # (B,C,H+W,1)

    def act(t):
        if kw.get("act", "hswish") == "relu":
            return torch.relu(t)
        return t * torch.clamp(t + 3.0, 0.0, 6.0) / 6.0

    if kw.get("bottleneck_layers", 1) == 1:
        y = act(_bn(F.conv2d(y, p["conv1.weight"]), p, "bn1", training))
    else:
        y = act(_bn(F.conv2d(y, p["conv1a.weight"]), p, "bn1a", training))
        y = act(_bn(F.conv2d(y, p["conv1b.weight"]), p, "bn1b", training))
    y_h, y_w = y[:, :, :h], y[:, :, h:].transpose(2, 3)
    g = kw.get("head_groups", 1)

    def gate(t):
        if kw.get("gate", "sigmoid") == "sigmoid":
            return torch.sigmoid(t)
        return torch.clamp(t / 6.0 + 0.5, 0.0, 1.0)

    a_h = gate(F.conv2d(y_h, p["conv_h.weight"], p["conv_h.bias"], groups=g))  # (B,C,H,1)
    a_w = gate(F.conv2d(y_w, p["conv_w.weight"], p["conv_w.bias"], groups=g))  # (B,C,1,W)
    beta = p.get("beta")
    if kw.get("per_axis_alpha", False):
        s_h = (1 - p["alpha_h"]) + p["alpha_h"] * a_h
        s_w = (1 - p["alpha_w"]) + p["alpha_w"] * a_w
        scale = s_h * s_w
        if beta is not None:  # documented: scale = 1 + beta * (s_h * s_w - 1)
            scale = 1 + beta * (scale - 1)
    else:
        att = a_h * a_w
        if beta is not None:
            att = 1 + beta * (att - 1)
        scale = (1 - p["alpha"]) + p["alpha"] * att
    out = x * scale
    if kw.get("spatial_gate", False):
        z = F.conv2d(out, p["spatial_dw.weight"], padding=1, groups=c)
        out = out * torch.sigmoid(F.conv2d(z, p["spatial_pw.weight"], p["spatial_pw.bias"]))
    return out, a_h, a_w


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", ["base", "all", "per_axis_alpha_beta", "all_single_alpha_fixed_beta"]
)
def test_matches_spec_formula_float64(case, backend, mode):
    lib_kw, seed_kw = COORD_CASES[case]
    ref = seed_coord(seed_kw)  # only for its (perturbed) parameters
    lib = lib_coord_from(ref, lib_kw, backend).double().train(mode == "train")
    p = {k: v.detach().clone() for k, v in lib.state_dict().items()}
    if "beta" in lib_kw:
        p["beta"] = torch.as_tensor(lib.beta).detach().clone()
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    masks = spy_masks(lib)
    y = lib(x1)
    ry, ra_h, ra_w = coord_formula(x2, p, lib_kw, training=mode == "train")
    assert_close(y, ry, 1e-10, "y")
    assert_close(masks["a_h"], ra_h, 1e-10, "a_h")
    assert_close(masks["a_w"], ra_w, 1e-10, "a_w")
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad((y * g).mean(), x1)
    (rgx,) = torch.autograd.grad((ry * g).mean(), x2)
    assert_close(gx, rgx, 1e-10, "grad x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_axis_alpha_with_beta_one_is_per_axis_alpha(backend):
    """beta = 1 gives add-on 4 exactly; alpha_h = alpha_w = 1 gives add-on 6 (alpha = 1)."""
    x = torch.randn(*X_SHAPE, dtype=torch.float64)
    a = CoordinateAttention(COORD_C, per_axis_alpha=True, alpha=0.6, beta=1.0, backend=backend)
    b = CoordinateAttention(COORD_C, per_axis_alpha=True, alpha=0.6, backend=backend)
    b.load_state_dict(a.state_dict(), strict=True)
    a.double().eval()
    b.double().eval()
    assert_close(a(x), b(x), 1e-12, "beta=1 vs per-axis alpha alone")

    c = CoordinateAttention(COORD_C, per_axis_alpha=True, alpha=1.0, beta=0.3, backend=backend)
    d = CoordinateAttention(COORD_C, alpha=1.0, beta=0.3, backend=backend)
    sd = {k: v for k, v in c.state_dict().items() if k not in ("alpha_h", "alpha_w")}
    d.load_state_dict({**sd, "alpha": torch.tensor(1.0)}, strict=True)
    c.double().eval()
    d.double().eval()
    assert_close(c(x), d(x), 1e-12, "alpha_h=alpha_w=1 vs beta alone")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_identity(backend):
    block = CoordinateAttention(COORD_C, alpha=0.0, backend=backend).eval()
    x = torch.randn(*X_SHAPE)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_mid_channels():
    assert CoordinateAttention(64, reduction=4).mid_channels == 16
    assert CoordinateAttention(64).mid_channels == 8
    assert CoordinateAttention(64, min_mid_channels=4).mid_channels == 4
    assert CoordinateAttention(64, reduction=4).conv1.out_channels == 16


# --------------------------------------------------------------------------------------
# Add-on 10: the mask check (tests/blocks/test_recording.py) keeps nothing between forwards
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["base", "all"])
def test_no_tensor_is_kept_between_forwards(case):
    lib_kw, _ = COORD_CASES[case]
    lib = CoordinateAttention(COORD_C, **lib_kw)
    before = set(vars(lib))
    lib(torch.randn(*X_SHAPE, requires_grad=True)).sum().backward()
    assert set(vars(lib)) == before
    assert not any(isinstance(v, torch.Tensor) for v in vars(lib).values())
