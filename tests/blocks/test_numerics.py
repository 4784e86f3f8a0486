"""gradcheck, bf16 autocast, channels_last and torch.compile for both blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

from ._util import (
    BACKENDS,
    COORD_C,
    COORD_CASES,
    DSA_CASES,
    assert_close,
    rel_err,
    run_block,
    spy_masks,
)

EACH_BACKEND = pytest.mark.parametrize("backend", BACKENDS)

# --------------------------------------------------------------------------------------
# 4. gradcheck in float64 (x and every parameter, learnable scalars included)
# --------------------------------------------------------------------------------------


def _functional(block, with_params: bool = True):
    """``f(x, *params)`` calling ``block`` with the given parameters, and the parameters."""
    names = [n for n, _ in block.named_parameters()] if with_params else []
    params = [block.get_parameter(n).detach().clone().requires_grad_() for n in names]
    rest = {k: v for k, v in block.state_dict(keep_vars=True).items() if k not in names}

    def f(x, *ps):
        return functional_call(block, {**dict(zip(names, ps, strict=True)), **rest}, (x,))

    return f, params


def _x64(shape=(2, 4, 5, 6)):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


_GC_DSA = {
    "learnable_temperature": {"learnable_temperature": True, "temperature": 1.5},
    "all": DSA_CASES["all"],
    "only_dilated_fixed_T": {"kernels": (), "temperature": 0.8},
}
_GC_COORD = {
    "learnable_alpha_beta": {"alpha": 0.7, "learnable_alpha": True, "beta": 0.6,
                             "learnable_beta": True},
    "all": COORD_CASES["all"][0],
    "per_axis_learnable": {"per_axis_alpha": True, "alpha": 0.6, "learnable_alpha": True},
}


@EACH_BACKEND
@pytest.mark.parametrize("case", list(_GC_DSA))
def test_gradcheck_dsa_all_inputs(case, backend):
    block = DynamicSpatialAttention(**_GC_DSA[case], backend=backend).double()
    f, params = _functional(block)
    assert len(params) >= 4
    assert torch.autograd.gradcheck(f, (_x64(), *params), fast_mode=True)


@EACH_BACKEND
@pytest.mark.parametrize("case", list(_GC_COORD))
def test_gradcheck_coord_all_inputs(case, backend):
    block = CoordinateAttention(4, **_GC_COORD[case], backend=backend).double().eval()
    f, params = _functional(block)
    assert torch.autograd.gradcheck(f, (_x64(), *params), fast_mode=True)


def _fast(backend: str) -> bool:
    """Triton's interpreter needs ~40 s for a full Jacobian (hundreds of kernel launches);
    its random projections (fast_mode) check the same formulas, which test_triton.py also
    checks element by element against the seed."""
    return backend == "triton"


@EACH_BACKEND
def test_gradcheck_dsa_x_full_jacobian(backend):
    block = DynamicSpatialAttention(kernels=(3,), dilated_kernel=3, backend=backend).double()
    assert torch.autograd.gradcheck(block, (_x64((2, 3, 4, 5)),), fast_mode=_fast(backend))


@EACH_BACKEND
def test_gradcheck_coord_x_full_jacobian(backend):
    block = CoordinateAttention(4, beta=0.5, backend=backend).double().eval()
    assert torch.autograd.gradcheck(block, (_x64((2, 4, 4, 5)),), fast_mode=_fast(backend))


def test_gradgradcheck_plain_paths():
    """backend="plain" supports second derivatives, and they are right."""
    dsa = DynamicSpatialAttention(learnable_temperature=True, backend="plain").double()
    f, params = _functional(dsa)
    assert torch.autograd.gradgradcheck(f, (_x64(), *params), fast_mode=True)
    coord = CoordinateAttention(
        4, **{**COORD_CASES["all"][0], "gate": "sigmoid"}, backend="plain"
    ).double().eval()
    f, params = _functional(coord)
    assert torch.autograd.gradgradcheck(f, (_x64(), *params), fast_mode=True)


# --------------------------------------------------------------------------------------
# 5. bf16 autocast on CPU. The PyTorch docs recommend calling backward outside the
#    autocast region (Lightning's bf16-mixed does so); inside is tested too.
# --------------------------------------------------------------------------------------


def _autocast_run(block, x, g, backward_inside=False):
    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(xa)
        outs = out if isinstance(out, tuple) else (out,)
        loss = (outs[0].float() * g).mean() + sum(o.float().mean() for o in outs[1:])
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [o.detach().float() for o in outs], xa.grad


def _fp32_run(block, x, g):
    xf = x.clone().requires_grad_()
    outs = block(xf)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = (outs[0] * g).mean() + sum(o.mean() for o in outs[1:])
    loss.backward()
    return [o.detach() for o in outs], xf.grad


BACKWARD = pytest.mark.parametrize("inside", [False, True], ids=["bwd_outside", "bwd_inside"])


@BACKWARD
@EACH_BACKEND
@pytest.mark.parametrize("case", ["default", "all"])
def test_bf16_autocast_dsa(case, backend, inside):
    block = DynamicSpatialAttention(**DSA_CASES[case], backend=backend)
    ref = copy.deepcopy(block)
    x = torch.randn(2, 8, 10, 9)
    g = torch.randn_like(x)
    outs, gx = _autocast_run(block, x, g, inside)
    ref_outs, ref_gx = _fp32_run(ref, x, g)
    assert torch.isfinite(outs[0]).all() and torch.isfinite(gx).all()
    assert float((outs[1] - ref_outs[1]).abs().max()) <= 0.05, "mask"
    assert rel_err(outs[0], ref_outs[0]) <= 0.05, "y"
    assert rel_err(gx, ref_gx) <= 0.1, "grad x"
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@BACKWARD
@EACH_BACKEND
@pytest.mark.parametrize("case", ["base", "all", "per_axis_alpha_beta"])
def test_bf16_autocast_coord(case, backend, inside):
    block = CoordinateAttention(COORD_C, **COORD_CASES[case][0], backend=backend)
    ref = copy.deepcopy(block)
    x = torch.randn(2, COORD_C, 6, 7)
    g = torch.randn_like(x)
    masks, ref_masks = spy_masks(block), spy_masks(ref)
    (y,), gx = _autocast_run(block, x, g, inside)
    (ref_y,), ref_gx = _fp32_run(ref, x, g)
    for name in ("a_h", "a_w"):
        assert float((masks[name].float() - ref_masks[name]).abs().max()) <= 0.05, name
    assert rel_err(y, ref_y) <= 0.05, "y"
    assert rel_err(gx, ref_gx) <= 0.1, "grad x"
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------------
# 6. channels_last input gives the contiguous result
# --------------------------------------------------------------------------------------


@EACH_BACKEND
@pytest.mark.parametrize(
    "make",
    [lambda f: DynamicSpatialAttention(backend=f, return_router_weights=True),
     lambda f: DynamicSpatialAttention(**DSA_CASES["all"], backend=f),
     lambda f: CoordinateAttention(COORD_C, backend=f),
     lambda f: CoordinateAttention(COORD_C, **COORD_CASES["all"][0], backend=f)],
    ids=["dsa", "dsa_all", "coord", "coord_all"],
)
def test_channels_last_matches_contiguous(make, backend):
    block = make(backend)
    x = torch.randn(3, COORD_C, 7, 6)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    a = run_block(copy.deepcopy(block), x)
    b = run_block(copy.deepcopy(block), xc)
    for i, (oa, ob) in enumerate(zip(a[0], b[0], strict=True)):
        assert_close(oa, ob, 1e-6, f"output {i}")
    assert_close(a[1], b[1], 1e-6, "grad x")
    for name in a[2]:
        assert_close(a[2][name], b[2][name], 1e-5, f"grad {name}")


# --------------------------------------------------------------------------------------
# 7. torch.compile(fullgraph=True, backend="eager")
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: DynamicSpatialAttention(),
     lambda: DynamicSpatialAttention(**DSA_CASES["all"]),
     lambda: CoordinateAttention(COORD_C),
     lambda: CoordinateAttention(COORD_C, **COORD_CASES["all"][0])],
    ids=["dsa", "dsa_all", "coord", "coord_all"],
)
def test_torch_compile_fullgraph_matches_eager(make, dynamo_reset):
    block = make()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    x = torch.randn(2, COORD_C, 6, 7)
    got = run_block(compiled, x)
    want = run_block(eager, x)
    for i, (a, b) in enumerate(zip(got[0], want[0], strict=True)):
        assert_close(a, b, 1e-5, f"output {i}")
    assert_close(got[1], want[1], 1e-5, "grad x")
    for name in want[2]:
        assert_close(got[2][f"_orig_mod.{name}"] if f"_orig_mod.{name}" in got[2]
                     else got[2][name], want[2][name], 1e-5, f"grad {name}")
    # BatchNorm running statistics (train mode) evolve identically
    ref_buffers = dict(eager.named_buffers())
    for name, buf in block.named_buffers():
        assert_close(buf, ref_buffers[name], 1e-6, f"buffer {name}")
    # eval mode too
    block.eval()
    eager.eval()
    with torch.no_grad():
        out_c, out_e = compiled(x), eager(x)
    out_c = out_c if isinstance(out_c, tuple) else (out_c,)
    out_e = out_e if isinstance(out_e, tuple) else (out_e,)
    for a, b in zip(out_c, out_e, strict=True):
        assert_close(a, b, 1e-5, "eval output")
