"""The fused fast path against the plain (seed) formulation: values, gradients, double backward."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks.kernels import resolve_backend

from ._util import COORD_C, COORD_CASES, DSA_CASES, TOL, assert_close, assert_runs_match, run_block

DTYPES = [torch.float32, torch.float64]

DSA_FUSED_CASES = ["default", "all", "only_dilated", "single_even_kernel_no_dilated",
                   "learnable_temperature"]
COORD_FUSED_CASES = ["base", "all", "per_axis_alpha", "per_axis_alpha_beta",
                     "all_single_alpha_fixed_beta", "beta_learnable", "alpha_0.7_learnable",
                     "spatial_gate"]


def _pair(block):
    """``block`` (torch fused path) and an exact copy running the plain path."""
    assert block.backend == "auto"  # the default, which is the torch fused path on a CPU
    plain = copy.deepcopy(block)
    plain.backend = "plain"
    return block, plain


def _variants(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------
# 3. Fused == plain, values and every gradient
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", DSA_FUSED_CASES)
def test_dsa_fused_matches_plain(case, dtype):
    fused, plain = _pair(DynamicSpatialAttention(**DSA_CASES[case]).to(dtype))
    x0 = torch.randn(3, 6, 9, 8, dtype=dtype)
    n_out = 3 if DSA_CASES[case].get("return_router_weights") else 2
    uses = {"all": None, "y_only": [0], "mask_only": [1]}
    for layout, x in _variants(x0):
        for x_grad in (True, False):
            for use_name, use in uses.items():
                label = f"{case} {layout} x_grad={x_grad} loss={use_name}"
                got = run_block(fused, x, x_grad=x_grad, use=use)
                want = run_block(plain, x, x_grad=x_grad, use=use)
                assert len(got[0]) == n_out
                assert_runs_match(got, want, TOL[dtype], label)
                if x_grad:
                    assert got[1] is not None and float(got[1].abs().max()) > 0, label


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", COORD_FUSED_CASES)
def test_coord_fused_matches_plain(case, dtype):
    lib_kw, _ = COORD_CASES[case]
    fused, plain = _pair(CoordinateAttention(COORD_C, **lib_kw).to(dtype))
    x0 = torch.randn(3, COORD_C, 6, 7, dtype=dtype)
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        plain.train(mode == "train")
        for layout, x in _variants(x0):
            for x_grad in (True, False):
                label = f"{case} {mode} {layout} x_grad={x_grad}"
                got = run_block(fused, x, x_grad=x_grad)
                want = run_block(plain, x, x_grad=x_grad)
                assert_runs_match(got, want, TOL[dtype], label)


def test_auto_is_default_and_resolves_to_the_torch_fused_path_on_cpu():
    x = torch.randn(2, 8, 5, 5)
    assert DynamicSpatialAttention().backend == "auto"
    assert CoordinateAttention(8).backend == "auto"
    assert resolve_backend("auto", "dsa", x) == "torch"
    assert resolve_backend("auto", "coord", x) == "torch"
    assert DynamicSpatialAttention(backend="plain").backend == "plain"
    assert CoordinateAttention(8, backend="torch").backend == "torch"


@pytest.mark.parametrize("fused, backend", [(True, "torch"), (False, "plain")])
def test_fused_argument_is_a_deprecated_alias_of_backend(fused, backend):
    for make in (lambda: DynamicSpatialAttention(fused=fused),
                 lambda: CoordinateAttention(8, fused=fused)):
        with pytest.warns(FutureWarning, match=f"backend='{backend}'"):
            assert make().backend == backend
    with pytest.raises(ValueError, match="contradicts"):
        DynamicSpatialAttention(fused=fused, backend="triton" if fused else "torch")


def test_dsa_fused_gradients_do_not_leak_between_backward_passes():
    """The fused DSA hands grad_y from the product's backward to the summary's backward
    through a per-forward stash. A backward that reaches the product but not the summary
    (gradients for the parameters only, graph retained) leaves grad_y in the stash; a later
    backward that only goes through the summary (mask-only loss w.r.t. x) then adds that
    stale grad_y * mask to grad_x."""
    fused, plain = _pair(DynamicSpatialAttention())
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    results = []
    for block in (fused, plain):
        y, mask = block(x)
        torch.autograd.grad(y.sum(), list(block.parameters()), retain_graph=True)
        (gx,) = torch.autograd.grad(mask.sum(), x)
        results.append(gx)
    assert_close(results[0], results[1], 1e-5, "grad x of mask.sum() after a params-only pass")


@pytest.mark.parametrize("make", [
    lambda: DynamicSpatialAttention(),
    lambda: CoordinateAttention(COORD_C).eval(),
], ids=["dsa", "coord"])
def test_fused_retain_graph_twice_gives_same_grads(make):
    fused, plain = _pair(make())
    x = torch.randn(2, COORD_C, 5, 6, requires_grad=True)
    out = fused(x)
    y = out[0] if isinstance(out, tuple) else out
    (g1,) = torch.autograd.grad(y.square().mean(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(y.square().mean(), x)
    out_p = plain(x)
    y_p = out_p[0] if isinstance(out_p, tuple) else out_p
    (gp,) = torch.autograd.grad(y_p.square().mean(), x)
    assert_close(g1, gp, 1e-5, "first pass")
    assert_close(g2, gp, 1e-5, "second pass")


# --------------------------------------------------------------------------------------
# Double backward: fused refuses clearly, plain supports it
# --------------------------------------------------------------------------------------

_BLOCKS = {
    "dsa": lambda backend: DynamicSpatialAttention(backend=backend),
    "coord": lambda backend: CoordinateAttention(COORD_C, backend=backend).eval(),
    # every add-on, with the sigmoid gate (torch has no second derivative of hardsigmoid)
    "coord_all": lambda backend: CoordinateAttention(
        COORD_C, **{**COORD_CASES["all"][0], "gate": "sigmoid"}, backend=backend
    ).eval(),
}
_CLEAR = r"(?i)twice|once_differentiable|double backward|second derivative|fused"


def _y(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(_BLOCKS))
def test_fused_double_backward_via_backward_raises(name):
    block = _BLOCKS[name]("torch")
    x = torch.randn(2, COORD_C, 5, 6, requires_grad=True)
    # The fused path refuses create_graph=True at once, so no second derivative can follow.
    with pytest.raises(RuntimeError, match=_CLEAR):
        (gx,) = torch.autograd.grad(_y(block, x).square().mean(), x, create_graph=True)
        gx.square().sum().backward()


@pytest.mark.parametrize("name", list(_BLOCKS))
def test_fused_grad_of_grad_wrt_x_raises_clearly(name):
    """``autograd.grad(grad_x, x)`` must say that the fused path is first-order only; today it
    says 'the differentiated Tensor appears to not have been used in the graph' (and with
    allow_unused=True silently returns None)."""
    block = _BLOCKS[name]("torch")
    x = torch.randn(2, COORD_C, 5, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=_CLEAR):
        (gx,) = torch.autograd.grad(_y(block, x).square().mean(), x, create_graph=True)
        torch.autograd.grad(gx.square().sum(), x)


@pytest.mark.parametrize("name", list(_BLOCKS))
def test_fused_grad_of_grad_wrt_params_raises(name):
    """A gradient penalty on the parameters (grad with create_graph, then grad of it w.r.t.
    the parameters) must raise on the fused path, not return a silently wrong value."""
    block = _BLOCKS[name]("torch")
    params = list(block.parameters())
    x = torch.randn(2, COORD_C, 5, 6)
    with pytest.raises(RuntimeError, match=_CLEAR):
        grads = torch.autograd.grad(_y(block, x).square().mean(), params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        torch.autograd.grad(penalty, params, allow_unused=True)


@pytest.mark.parametrize("name", list(_BLOCKS))
def test_plain_supports_double_backward(name):
    torch.manual_seed(3)
    block = _BLOCKS[name]("plain").double()
    params = list(block.parameters())
    x = torch.randn(2, COORD_C, 5, 6, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(_y(block, x).square().mean(), x, create_graph=True)
    gg = torch.autograd.grad(gx.square().sum(), [x] + params, allow_unused=True)
    assert gg[0] is not None and torch.isfinite(gg[0]).all() and float(gg[0].abs().max()) > 0
    assert any(g is not None and float(g.abs().max()) > 0 for g in gg[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dsa_fused_channel_max_ties_follow_torch_max(dtype):
    """Tied channel maxima (ReLU zeros, duplicated channels): the max gradient goes to one
    channel, the one torch.max picks, exactly as in the seed and the plain path."""
    from ._util import lib_dsa_from, seed_dsa

    ref = seed_dsa({}).to(dtype)
    fused = lib_dsa_from(ref, {}, backend="torch").to(dtype)
    x = torch.relu(torch.randn(3, 4, 8, 9, dtype=dtype) - 0.5)  # many all-zero positions
    x[:, 2] = x[:, 0]  # exact ties between channels 0 and 2
    x[0, :, :2, :2] = 0.25  # all channels tied
    assert (x.amax(dim=1) == 0).any()
    got = run_block(fused, x)
    want = run_block(ref, x)
    assert_runs_match(got, want, TOL[dtype], "ties")
    for layout, xv in _variants(x):
        assert_runs_match(run_block(fused, xv), want, TOL[dtype], f"ties {layout}")


@pytest.mark.parametrize(
    "make", [lambda: DynamicSpatialAttention(return_router_weights=True),
             lambda: CoordinateAttention(COORD_C, **COORD_CASES["all"][0]).eval()],
    ids=["dsa", "coord_all"],
)
def test_fused_matches_plain_on_odd_layouts_and_sizes(make):
    fused, plain = _pair(make())
    big = torch.randn(2, COORD_C, 12, 7)
    inputs = {
        "strided": big[:, :, ::2],
        "transposed": big.transpose(2, 3),
        "expanded_batch": torch.randn(1, COORD_C, 6, 7).expand(3, -1, -1, -1),
        "1x1": torch.randn(2, COORD_C, 1, 1),
        "1xW": torch.randn(2, COORD_C, 1, 9),
        "Hx1": torch.randn(2, COORD_C, 9, 1),
        "batch_1": torch.randn(1, COORD_C, 5, 4),
    }
    for label, x in inputs.items():
        got = run_block(fused, x)
        want = run_block(plain, x)
        assert got[0][0].shape == x.shape, label
        assert_runs_match(got, want, 1e-5, label)


@pytest.mark.parametrize("per_axis", [False, True])
def test_fused_coord_follows_alpha_and_beta_changed_in_place(per_axis):
    """The fused path skips the ``c * x`` term when alpha (and beta) is exactly 1; a value
    changed in place afterwards must be read again, not assumed."""
    torch.manual_seed(5)
    kw = {"per_axis_alpha": per_axis, "beta": 1.0}
    fused, plain = CoordinateAttention(8, **kw), CoordinateAttention(8, backend="plain", **kw)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 5, 6)
    before = fused(x)
    torch.testing.assert_close(before, plain(x), rtol=0, atol=1e-6)
    for block in (fused, plain):
        for name in ("alpha_h", "alpha_w") if per_axis else ("alpha",):
            getattr(block, name).fill_(0.6)
        block.beta = 0.5
    after = fused(x)
    torch.testing.assert_close(after, plain(x), rtol=0, atol=1e-6)
    assert not torch.allclose(after, before)
