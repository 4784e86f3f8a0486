"""``backend="triton"``: the Triton kernels against the seed code and the plain path.

On a machine with CUDA the kernels run on the GPU (TF32 off); without one, on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before triton is
imported). The interpreter is slow, so the shapes are small but odd: ``C`` not a power of
two, ``B = 1``, ``H`` or ``W = 1``, and sizes that make the kernels loop over several tiles.
The parity tests of test_dynamic_spatial.py, test_coordinate.py, test_numerics.py and
test_observation.py also run on ``"triton"`` where the interpreter is on (``BACKENDS``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks.kernels import triton_importable

from ._util import (
    COORD_C,
    COORD_CASES,
    DSA_CASES,
    assert_close,
    assert_runs_match,
    lib_coord_from,
    lib_dsa_from,
    rel_err,
    run_block,
    seed_coord,
    seed_dsa,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if not triton_importable():
    pytest.skip(
        "triton is not installed (pip install triton; wheels exist for Linux x86_64 and "
        "aarch64)",
        allow_module_level=True,
    )
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it unless the "
        "environment already sets it to something else)",
        allow_module_level=True,
    )

from lightning_attn.blocks.kernels import load_triton_ops  # noqa: E402

ops = load_triton_ops()
from lightning_attn.blocks.kernels import triton_common as common  # noqa: E402
from lightning_attn.blocks.kernels import triton_coord as coord  # noqa: E402
from lightning_attn.blocks.kernels import triton_dsa as dsa  # noqa: E402

from . import seed_reference  # noqa: E402

# The interpreter runs the kernels in numpy, which warns about inf/NaN arithmetic that the
# NaN tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")

#: float32 tolerance: the kernels sum in another order than torch; cuDNN's convolutions
#: differ more from each other than the CPU's.
TOL32 = 1e-4 if CUDA else 1e-5
TOL = {torch.float32: TOL32, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Parity on CUDA needs exact float32 convolutions and matmuls in the seed too."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


def _layouts(x: torch.Tensor):
    """The same values as ``x`` in four memory layouts."""
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    wide = x.new_zeros(*x.shape[:3], 2 * x.shape[3])
    wide[..., ::2] = x
    yield "strided_w", wide[..., ::2]
    yield "transposed_hw", x.transpose(2, 3).contiguous().transpose(2, 3)


def _relu_ties(shape, dtype=torch.float32) -> torch.Tensor:
    """ReLU output with exact ties at the channel and axis maxima: zeros, duplicated
    channels and a patch where every channel holds the same value."""
    x = torch.relu(torch.randn(*shape, dtype=dtype) - 0.3)
    if shape[1] > 2:
        x[:, 2] = x[:, 0]
    x[0, :, : min(2, shape[2]), : min(2, shape[3])] = 0.25
    return x.to(DEVICE)


def _dsa_pair(case: str, dtype=torch.float32):
    ref = seed_dsa(DSA_CASES[case]).to(DEVICE, dtype)
    return ref, lib_dsa_from(ref, DSA_CASES[case], "triton").to(DEVICE, dtype)


def _coord_pair(lib_kw: dict, seed_kw: dict, channels: int = COORD_C, dtype=torch.float32):
    ref = seed_coord(seed_kw, channels).to(DEVICE, dtype)
    return ref, lib_coord_from(ref, lib_kw, "triton", channels).to(DEVICE, dtype)


# --------------------------------------------------------------------------------------
# The ops against torch, on inputs chosen to hit ties, NaN, infinities and several tiles
# --------------------------------------------------------------------------------------


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The interpreter with the CUDA tile sizes, so that the ops loop as on a GPU (the
    interpreter's own tiles are larger: fewer programs, faster tests)."""
    monkeypatch.setattr(common, "INTERPRETER_TILES", common.GPU_TILES)
    common.clear_caches()
    yield
    common.clear_caches()


def test_op_tests_take_several_tile_steps_with_gpu_tiles(gpu_tiles):
    for layout in ("contiguous", "channels_last"):
        x = dict(_layouts(torch.zeros(2, 70, 16, 17, device=DEVICE)))[layout]
        block_c, block_s = dsa.dsa_tiles(x)
        assert block_c < 70 and block_s < 16 * 17 or block_c * 2 < 70, layout
    for layout in ("contiguous", "channels_last", "transposed_hw"):
        x = dict(_layouts(torch.zeros(2, 3, 70, 17, device=DEVICE)))[layout]
        launch = coord.coord_launch(x).constexprs
        assert launch["BLOCK_H"] < 70 and launch["BLOCK_W"] == 32, layout
    for layout in ("contiguous", "channels_last"):  # blocks of one sample's channels
        x = dict(_layouts(torch.zeros(2, 40, 9, 6, device=DEVICE)))[layout]
        launch = coord.coord_launch(x).constexprs
        assert not launch["FOLD"] and 40 % launch["BLOCK_C"], layout


def test_block_tests_fold_small_channel_counts_into_one_program():
    p = coord.coord_launch(torch.zeros(2, COORD_C, 6, 7, device=DEVICE))
    assert p.constexprs["FOLD"] and p.grid == (1,)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dsa_summary_is_torch_mean_and_max_with_its_argmax(layout, gpu_tiles):
    # C = 70 spans 9 channel steps of the NCHW kernel and 2 of the channels_last one.
    x = _relu_ties((2, 70, 16, 17))
    x[0, 5, 3, 3] = x[0, 9, 3, 3] = float("nan")  # two NaN channels: torch.max names the first
    x[1, :, 4, 4] = float("-inf")  # all -inf: channel 0
    x[1, 7, 5, 5] = float("inf")
    x[1, 3, 6, 6] = float("nan")
    x = dict(_layouts(x))[layout]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    s = ops.dsa_summary(xa)
    mx, _ = torch.max(xb, dim=1, keepdim=True)
    want = torch.cat([xb.mean(dim=1, keepdim=True), mx], dim=1)
    assert s.dtype == x.dtype and s.shape == (2, 2, 16, 17)
    torch.testing.assert_close(s, want, equal_nan=True, rtol=0, atol=1e-6)
    assert torch.equal(s[:, 1].isnan(), want[:, 1].isnan())
    g = torch.randn_like(want)
    (got_gx,) = torch.autograd.grad((s * g).sum(), xa)
    (want_gx,) = torch.autograd.grad((want * g).sum(), xb)
    # the max gradient lands on exactly the channel torch.max picked (ties, NaN, -inf)
    torch.testing.assert_close(got_gx, want_gx, equal_nan=True, rtol=0, atol=1e-6)


def test_dsa_summary_saves_an_int32_argmax_map_not_a_full_size_tensor(gpu_tiles):
    x = _randn(2, 6, 5, 7).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.dsa_summary(x)
    full = [t for t in saved if t.numel() == x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in full), "a full-size copy was saved"
    assert any(t.dtype == torch.int32 and t.shape == (2, 1, 5, 7) for t in saved)


@pytest.mark.parametrize("x_dtype, mask_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
])
def test_dsa_apply_is_x_times_mask_with_torch_dtypes(x_dtype, mask_dtype, gpu_tiles):
    x = _randn(3, 5, 4, 7, dtype=x_dtype).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(3, 1, 4, 7, dtype=mask_dtype).to(DEVICE)
    xa, ma = x.clone().requires_grad_(), mask.clone().requires_grad_()
    xb, mb = x.clone().requires_grad_(), mask.clone().requires_grad_()
    y, want = ops.dsa_apply(xa, ma), xb * mb
    assert y.dtype == want.dtype and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want)  # dtype-aware tolerances: one rounding apart
    g = torch.randn_like(want)
    got = torch.autograd.grad(y.mul(g).sum(), (xa, ma))
    ref = torch.autograd.grad(want.mul(g).sum(), (xb, mb))
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        # torch rounds each low-precision product before summing grad_mask; the kernel not
        low = a.dtype != torch.float32
        torch.testing.assert_close(a, b, rtol=1e-2 if low else None, atol=1e-2 if low else None)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed_hw"])
@pytest.mark.parametrize("with_max", [False, True], ids=["mean", "mean_max"])
def test_coord_pool_is_mean_and_amax_with_amax_gradient(with_max, layout, gpu_tiles):
    # H = 70 takes several row steps; ties in rows and columns (amax splits its gradient).
    x = _relu_ties((2, 3, 70, 17))
    x[0, 1, 10, 4] = float("nan")  # a NaN row and column
    x[1, 2, 20, :] = float("-inf")  # a row of -inf: every element ties
    x = dict(_layouts(x))[layout]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    x_h, x_w = ops.coord_pool(xa, with_max)
    want_h, want_w = xb.mean(dim=3, keepdim=True), xb.mean(dim=2, keepdim=True)
    if with_max:
        want_h = 0.5 * (want_h + xb.amax(dim=3, keepdim=True))
        want_w = 0.5 * (want_w + xb.amax(dim=2, keepdim=True))
    for got, want in ((x_h, want_h), (x_w, want_w)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)
    gh, gw = torch.randn_like(want_h), torch.randn_like(want_w)
    (got_gx,) = torch.autograd.grad((x_h * gh).sum() + (x_w * gw).sum(), xa)
    (want_gx,) = torch.autograd.grad((want_h * gh).sum() + (want_w * gw).sum(), xb)
    torch.testing.assert_close(got_gx, want_gx, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c_kind", ["none", "fixed", "learnable"])
def test_coord_scale_matches_the_formula_and_its_gradients(c_kind, layout, gpu_tiles):
    # C = 40: blocks of 16 (NCHW) or 32 (channels_last) channels, the last one partial
    x = dict(_layouts(_relu_ties((2, 40, 9, 6))))[layout]
    u_h = torch.rand(2, 40, 9, 1, dtype=torch.bfloat16).to(DEVICE)  # as autocast leaves them
    u_w = torch.rand(2, 40, 1, 6, dtype=torch.bfloat16).to(DEVICE)
    k0 = torch.tensor(0.7, device=DEVICE)
    leaves = [x, u_h, u_w, k0]
    runs = []
    for _ in range(2):
        xs, hs, ws, k = (t.clone().requires_grad_() for t in leaves)
        c = None if c_kind == "none" else (1 - k) if c_kind == "learnable" else 1 - k.detach()
        runs.append(((xs, hs, ws, k), c))
    (xa, ha, wa, ka), ca = runs[0]
    (xb, hb, wb, kb), cb = runs[1]
    y = ops.coord_scale(xa, ha, wa, ca, ka)
    # torch's dtype: a bf16 map times a 0-d float32 k stays bf16, times float32 x is float32
    assert y.dtype == (x * (k0 * (u_h * u_w))).dtype == torch.float32
    # the kernel computes the scale in float32: compare with torch in float32
    want = xb * ((0.0 if cb is None else cb) + kb * (hb.float() * wb.float()))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    got = torch.autograd.grad((y * g).sum(), (xa, ha, wa, ka))
    ref = torch.autograd.grad((want * g).sum(), (xb, hb, wb, kb))
    for name, a, b in zip(("x", "u_h", "u_w", "k"), got, ref, strict=True):
        assert a.dtype == b.dtype, name  # the maps' gradients in bf16, like the maps
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_ops_name_bad_arguments():
    x = _randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 1, 4, 5\)"):
        ops.dsa_apply(x, _randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="u_w must have shape"):
        ops.coord_scale(x, _randn(2, 3, 4, 1), _randn(2, 3, 5, 1), None, _randn(()))
    with pytest.raises(ValueError, match="k must be a 0-d tensor"):
        ops.coord_scale(x, _randn(2, 3, 4, 1), _randn(2, 3, 1, 5), None, _randn(1))
    with pytest.raises(ValueError, match="W=8193"):
        ops.coord_pool(_randn(1, 1, 1, 8193), False)


# --------------------------------------------------------------------------------------
# The blocks against the seed code
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "all"])
def test_dsa_matches_seed_in_every_layout(case):
    ref, lib = _dsa_pair(case)
    x = _relu_ties((2, 5, 7, 9))
    want = run_block(ref, x)
    for layout, xv in _layouts(x):
        assert_runs_match(run_block(lib, xv), want, TOL32, f"{case} {layout}")


@pytest.mark.parametrize("shape", [(1, 70, 3, 5), (2, 3, 1, 1), (2, 6, 9, 1), (1, 6, 1, 9)],
                         ids=["B1_C70", "1x1", "Hx1", "1xW"])
def test_dsa_matches_seed_on_odd_sizes(shape):
    ref, lib = _dsa_pair("default")
    x = _relu_ties(shape)
    want = run_block(ref, x)
    for layout, xv in list(_layouts(x))[:2]:
        assert_runs_match(run_block(lib, xv), want, TOL32, f"{shape} {layout}")


def test_dsa_float64_and_ties_match_seed_exactly():
    ref, lib = _dsa_pair("all", torch.float64)
    x = _relu_ties((2, 6, 5, 7), torch.float64)
    assert (x.amax(dim=1) == 0).any() and (x[:, 2] == x[:, 0]).all()
    assert_runs_match(run_block(lib, x), run_block(ref, x), TOL[torch.float64], "f64 ties")


def test_dsa_nan_propagates_as_in_seed():
    ref, lib = _dsa_pair("default")
    x = _randn(2, 5, 6, 7)
    x[0, 3, 2, 2] = float("nan")
    got, want = run_block(lib, x), run_block(ref, x)
    for a, b, what in ((got[0][0], want[0][0], "y"), (got[0][1], want[0][1], "mask"),
                       (got[1], want[1], "grad x")):
        assert torch.equal(a.isnan(), b.isnan()), what
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=TOL32, msg=what)
    assert got[0][0][0].isnan().any() and not got[0][0][1].isnan().any()


#: Add-ons that change the full-size work: pooling (1), the scale's c and k (4, 6, alpha
#: fixed / learnable / exactly 1, where c is None), the spatial gate (9), and all together.
COORD_TRITON_CASES = {
    name: COORD_CASES[name]
    for name in ("base", "mean_max", "per_axis_alpha", "per_axis_alpha_learnable", "beta",
                 "beta_learnable", "alpha_0.7_learnable", "per_axis_alpha_beta",
                 "spatial_gate", "all", "all_single_alpha_fixed_beta")
}
COORD_TRITON_CASES["alpha_0.7_fixed"] = ({"alpha": 0.7}, {"alpha": 0.7})


@pytest.mark.parametrize("case", list(COORD_TRITON_CASES))
def test_coord_matches_seed(case):
    lib_kw, seed_kw = COORD_TRITON_CASES[case]
    ref, lib = _coord_pair(lib_kw, seed_kw)
    x = _relu_ties((2, COORD_C, 6, 7))
    want = run_block(ref, x)
    for layout, xv in list(_layouts(x))[:2]:
        assert_runs_match(run_block(lib, xv), want, TOL32, f"{case} {layout}")


@pytest.mark.parametrize("shape", [(1, 20, 1, 9), (2, 20, 9, 1), (1, 20, 1, 1), (2, 20, 70, 5),
                                   (2, 20, 6, 7)],
                         ids=["B1_1xW", "Hx1", "1x1", "H70", "strided"])
def test_coord_all_add_ons_match_seed_on_odd_sizes(shape):
    lib_kw, seed_kw = COORD_CASES["all"]
    ref, lib = _coord_pair(lib_kw, seed_kw, channels=20)
    x = _relu_ties(shape)
    want = run_block(ref, x)
    layouts = dict(_layouts(x))
    xv = layouts["strided_w"] if shape == (2, 20, 6, 7) else layouts["channels_last"]
    assert_runs_match(run_block(lib, xv), want, TOL32, str(shape))


def test_coord_nan_propagates_as_in_seed():
    lib_kw, seed_kw = COORD_CASES["all_single_alpha_fixed_beta"]
    ref, lib = _coord_pair(lib_kw, seed_kw)
    ref.eval(), lib.eval()  # in train mode BatchNorm spreads a NaN over the whole batch
    x = _randn(2, COORD_C, 6, 7)
    x[1, 4, 2, 3] = float("nan")
    got, want = run_block(lib, x), run_block(ref, x)
    for a, b, what in ((got[0][0], want[0][0], "y"), (got[1], want[1], "grad x")):
        assert torch.equal(a.isnan(), b.isnan()), what
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=TOL32, msg=what)
    assert not got[0][0][0].isnan().any() and got[0][0][1].isnan().any()


# --------------------------------------------------------------------------------------
# Low precision: the same dtypes as the plain path, values within rounding
# --------------------------------------------------------------------------------------

_LOW_PRECISION_BLOCKS = {
    "dsa": lambda backend: DynamicSpatialAttention(**DSA_CASES["all"], backend=backend),
    "coord": lambda backend: CoordinateAttention(
        COORD_C, **COORD_CASES["all"][0], backend=backend
    ),
}


def _outputs_and_grads(block, x, g, autocast_dtype):
    x = x.clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outs = block(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = (outs[0].float() * g).mean() + sum(o.float().mean() for o in outs[1:])
    loss.backward()
    grads = {n: p.grad for n, p in block.named_parameters()}
    return [o.detach() for o in outs], x.grad, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["autocast", "low_precision_block"])
@pytest.mark.parametrize("name", list(_LOW_PRECISION_BLOCKS))
def test_low_precision_matches_plain_path(name, mode, dtype):
    torch.manual_seed(0)
    triton_block = _LOW_PRECISION_BLOCKS[name]("triton").to(DEVICE)
    plain = copy.deepcopy(triton_block)
    plain.backend = "plain"
    x = _randn(2, COORD_C, 6, 7)
    if mode == "low_precision_block":
        triton_block.to(dtype), plain.to(dtype)
        x = x.to(dtype)
    g = _randn(*x.shape)
    autocast = dtype if mode == "autocast" else None
    got_outs, got_gx, got_pg = _outputs_and_grads(triton_block, x, g, autocast)
    want_outs, want_gx, want_pg = _outputs_and_grads(plain, x, g, autocast)
    # the plain path rounds its intermediates to the low precision, the kernels only once
    tol = 0.02 if dtype == torch.bfloat16 else 0.005
    for i, (a, b) in enumerate(zip(got_outs, want_outs, strict=True)):
        assert a.dtype == b.dtype, f"output {i}: {a.dtype} vs plain {b.dtype}"
        assert rel_err(a, b) <= tol, f"output {i}: {rel_err(a, b):.3g}"
    assert got_gx.dtype == want_gx.dtype
    assert rel_err(got_gx, want_gx) <= 2 * tol, f"grad x: {rel_err(got_gx, want_gx):.3g}"
    for n, p in want_pg.items():
        assert got_pg[n].dtype == p.dtype, n
        # a 0-d parameter's gradient is a sum over the whole tensor that mostly cancels
        # (about 4e-5 for alpha here): its relative error is measured against 1e-3
        err = float((got_pg[n].double() - p.double()).norm())
        scale = float(p.double().norm()) if p.dim() else max(float(p.abs()), 1e-3)
        assert err <= 5 * tol * scale, f"grad {n}: {err:.3g} vs {scale:.3g}"


# --------------------------------------------------------------------------------------
# torch.compile, autograd limits, errors
# --------------------------------------------------------------------------------------


def _recording_backend():
    """AOTAutograd with recording compilers: the forward and backward graphs it traces."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, list] = {"forward": [], "backward": []}

    def record(kind):
        def compiler(gm, _inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward")), graphs


def _targets(graphs) -> set[str]:
    return {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}


_COMPILE_BLOCKS = {
    "dsa": (lambda: DynamicSpatialAttention(backend="triton"),
            {"forward": ["dsa_summary", "dsa_apply"],
             "backward": ["dsa_summary_backward", "dsa_apply_backward"]}),
    "coord_all": (lambda: CoordinateAttention(COORD_C, **COORD_CASES["all"][0], backend="triton"),
                  {"forward": ["coord_pool", "coord_scale"],
                   "backward": ["coord_pool_backward", "coord_scale_backward"]}),
    # a fixed alpha of 1 on the host: eager skips a pass by reading it, compiled must not
    "coord_default": (lambda: CoordinateAttention(COORD_C, backend="triton"),
                      {"forward": ["coord_pool", "coord_scale"],
                       "backward": ["coord_pool_backward", "coord_scale_backward"]}),
}


@pytest.mark.parametrize("name", list(_COMPILE_BLOCKS))
def test_torch_compile_fullgraph_traces_the_kernels(name, dynamo_reset):
    from torch._dynamo.utils import counters

    make, expected = _COMPILE_BLOCKS[name]
    block = make().to(DEVICE)
    eager = copy.deepcopy(block)
    backend, graphs = _recording_backend()
    counters.clear()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = _relu_ties((2, COORD_C, 6, 7))
    got, want = run_block(compiled, x), run_block(eager, x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1
    for kind, names in expected.items():
        targets = _targets(graphs[kind])
        for op in names:
            assert f"lightning_attn.{op}.default" in targets, f"{op} not in the {kind} graph"
    for i, (a, b) in enumerate(zip(got[0], want[0], strict=True)):
        assert_close(a, b, TOL32, f"output {i}")
    assert_close(got[1], want[1], TOL32, "grad x")
    for n, g in want[2].items():
        assert_close(got[2][f"_orig_mod.{n}"], g, TOL32, f"grad {n}")


if CUDA:  # inductor's C++ codegen takes ~30 s per block on a 2-core CPU: GPU machines only

    @pytest.mark.parametrize("name", list(_COMPILE_BLOCKS))
    def test_torch_compile_inductor_on_cuda(name, dynamo_reset):
        from torch._dynamo.testing import CompileCounterWithBackend
        from torch._dynamo.utils import counters

        block = _COMPILE_BLOCKS[name][0]().to(DEVICE)
        eager = copy.deepcopy(block)
        counter = CompileCounterWithBackend("inductor")
        counters.clear()
        compiled = torch.compile(block, fullgraph=True, backend=counter)
        x = _relu_ties((2, COORD_C, 6, 7))
        got, want = run_block(compiled, x), run_block(eager, x)
        assert counter.frame_count == 1 and not counters["graph_break"]
        assert_close(got[0][0], want[0][0], TOL32, "y")
        assert_close(got[1], want[1], TOL32, "grad x")


#: Bytes per pipelined (cp.async) load of x in float32 NCHW, by W: 16 where a row (or a
#: channel plane, for DSA) starts 16-byte aligned; a 14-wide row is only 8-byte aligned
#: and a 7-wide one 4. Before the hints every CoordinateAttention load was 4 bytes.
_LOAD_BYTES = {
    "_coord_": {56: 16, 28: 16, 14: 8, 7: 4, 8192: 16},
    "_dsa_": {56: 16, 28: 16, 14: 16, 7: 4, 8192: 16},
}
#: Shared memory one program may use on sm_90 (227 KiB).
_SM90_SHARED = 232448


def _compile_for_sm90(*args: str) -> list[dict]:
    """The variants ``triton_sm90_compile.py`` compiled, one dict per planned launch and
    configuration: kernel, block, w, dtype, layout, config, pipelined, plain, shared."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton install has no CUDA backend (ptxas)")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_sm90_compile.py")), *args],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = []
    for line in done.stdout.splitlines():
        if "sm_90 cubin" not in line:
            continue
        name, _, block, width, dtype, layout, config, pipelined, plain, shared, _shape = (
            c.strip() for c in line.replace(": sm_90", " | sm_90").split("|"))
        rows.append({"kernel": name, "block": block, "w": int(width.removeprefix("W=")),
                     "dtype": dtype, "layout": layout, "config": config,
                     "pipelined": int(pipelined.split()[1]), "plain": int(plain.split()[1]),
                     "shared": int(shared.split()[1]), "line": line})
    return rows


def _check_compiled_variant(row: dict) -> None:
    """Full-width pipelined x loads and shared memory within an sm_90 program's."""
    assert row["shared"] <= _SM90_SHARED, f"{row['line']}: shared memory over sm_90's"
    if "combine" in row["kernel"] or "sum_splits" in row["kernel"]:
        assert row["config"] == "-", row["line"]  # no loop over x: Triton's defaults
        return
    # channels_last: runs of C channels, 16 bytes at any W
    want = 16 if row["layout"] == "nhwc" else next(
        v for k, v in _LOAD_BYTES.items() if row["kernel"].startswith(k))[row["w"]]
    assert row["pipelined"] == want, f"{row['line']}: {row['pipelined']} B per load, want {want}"


def test_kernels_compile_for_an_h100_with_full_width_loads():
    """What runs by default on a GPU at W = 56, 28, 14, 7 and 8192 (float32 NCHW, one
    forward+backward of each block, as the host code plans them for 132 SMs, each launch
    with the configuration the rule picks for its shape class) through Triton's real
    compiler down to sm_90 cubins (~15 s with a cold Triton cache, a few with a warm one):
    what the interpreter cannot check. Needs no GPU; ptxas ships with triton's CUDA
    backend. The x loads of the loops are pipelined (cp.async) and as wide as the rows'
    alignment allows; channels_last (checked at W = 7) loads 16 bytes; every program fits
    in sm_90's shared memory. ``triton_sm90_compile.py --full`` compiles every dtype and
    layout (minutes)."""
    rows = _compile_for_sm90("--rule-only")
    kernels = {r["kernel"] for r in rows}
    assert len(kernels) == 10, kernels  # 6 DSA (2 combine the split C), 4 CoordinateAttention
    checked = set()
    for r in rows:
        _check_compiled_variant(r)
        if r["config"] != "-":
            assert r["config"].endswith("(rule)"), r["line"]
            checked.add((r["kernel"], r["w"], r["layout"]))
    assert len(checked) == 8 * 5 + 8, sorted(checked)
    # every shape class the rule knows runs somewhere: DSA's channel loop is long at W = 56,
    # one step at W = 7; a CoordinateAttention row of 8192 is wider than the GPU tile
    classes = {(r["kernel"][:6], r["w"], r["layout"]): r["config"].split()[0] for r in rows
               if r["config"] != "-"}
    assert classes[("_dsa_s", 56, "nchw")] == "long"
    assert classes[("_dsa_s", 7, "nchw")] == "short"
    assert classes[("_coord", 56, "nchw")] == "short"
    assert classes[("_coord", 8192, "nchw")] == "wide"


@pytest.mark.slow
def test_every_autotune_config_compiles_for_an_h100():
    """With autotuning opted in (``LIGHTNING_ATTN_TRITON_AUTOTUNE=1``) every looped launch
    can run with every configuration of ``LAUNCH_CONFIGS``: each one, at every shape of
    the test above, compiles for sm_90 with the same load widths and within shared memory
    (~200 variants, ~1 minute with a cold Triton cache)."""
    rows = _compile_for_sm90()
    configs = {}
    for r in rows:
        _check_compiled_variant(r)
        if r["config"] != "-":
            configs.setdefault((r["kernel"], r["w"], r["layout"]), set()).add(
                r["config"].split()[0])
    assert len(configs) == 8 * 5 + 8
    for key, names in configs.items():
        assert names == set(common.LAUNCH_CONFIGS), (key, names)


def test_cpu_tensor_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, COORD_C, 5, 6)
    for block in (DynamicSpatialAttention(backend="triton"),
                  CoordinateAttention(COORD_C, backend="triton")):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            block(x)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.dsa_summary(x)


@pytest.mark.parametrize("make", [lambda: DynamicSpatialAttention(backend="triton"),
                                  lambda: CoordinateAttention(COORD_C, backend="triton")],
                         ids=["dsa", "coord"])
def test_double_backward_raises_clearly(make):
    block = make().to(DEVICE)
    x = _randn(2, COORD_C, 5, 6).requires_grad_()
    out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(y.square().mean(), x, create_graph=True)


def test_dsa_empty_batch_and_expanded_gradients():
    ref, lib = _dsa_pair("default")
    y, mask = lib(_randn(0, 4, 5, 6))
    assert y.shape == (0, 4, 5, 6) and mask.shape == (0, 1, 5, 6)
    # y.sum() sends back a stride-0 gradient; an expanded batch reads x with stride 0
    x = _randn(1, 4, 5, 6).expand(3, -1, -1, -1)
    grads = []
    for block in (lib, ref):
        xg = x.clone().requires_grad_() if block is ref else x.detach().requires_grad_()
        (g,) = torch.autograd.grad(block(xg)[0].sum(), xg)
        grads.append(g)
    assert_close(grads[0], grads[1], TOL32, "grad x")


# --------------------------------------------------------------------------------------
# One gradient buffer: the linked backward writes grad_x once, and nothing else full-size
# --------------------------------------------------------------------------------------


class _SeesInsideOurOps(TorchDispatchMode):
    """A dispatch mode that also sees the aten ops inside our custom ops (their
    implementations run under it), but not Triton's interpreter's own bookkeeping (use
    :func:`_interpreter_unseen`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lightning_attn":
            with self:
                return OPDEFS[func._name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self.seen(func, out)
        return out

    def seen(self, func, out) -> None:
        raise NotImplementedError


@pytest.fixture
def interpreter_unseen(monkeypatch):
    """Triton's interpreter runs with dispatch modes suspended (its copies between torch and
    numpy are not the kernels' work); yields the launch counts by kernel name."""
    if CUDA:
        yield {}
        return
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, int] = {}
    run = InterpretedFunction.run

    def unseen_run(self, *args, **kwargs):
        launches[self.fn.__name__] = launches.get(self.fn.__name__, 0) + 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", unseen_run)
    yield launches


class _Allocations(_SeesInsideOurOps):
    """Full-size float tensors (``numel`` of x, not broadcast) that any op makes."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.made = numel, []

    def seen(self, func, out) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and not func.is_view
                    and t.numel() == self.numel and 0 not in t.stride()):
                self.made.append(func.overloadpacket.__name__)


_ONE_BUFFER_BLOCKS = {
    "dsa": lambda: DynamicSpatialAttention(backend="triton"),
    "dsa_all": lambda: DynamicSpatialAttention(**DSA_CASES["all"], backend="triton"),
    "coord": lambda: CoordinateAttention(COORD_C, backend="triton"),
    "coord_mean_max": lambda: CoordinateAttention(COORD_C, pool="mean_max", backend="triton"),
    "coord_per_axis_beta": lambda: CoordinateAttention(
        COORD_C, **COORD_CASES["per_axis_alpha_beta"][0], backend="triton"
    ),
}


@pytest.mark.parametrize("name", list(_ONE_BUFFER_BLOCKS))
def test_backward_makes_one_full_size_buffer_grad_x(name, interpreter_unseen):
    """The summary/pool backward writes grad_x once (4 passes): no second part of grad_x,
    no out-of-place sum of parts, no full-size temporary. Forward: y alone."""
    block = _ONE_BUFFER_BLOCKS[name]().to(DEVICE)
    x = _relu_ties((2, COORD_C, 6, 7)).requires_grad_()
    mode = _Allocations(x.numel())
    with mode:
        out = block(x)
        y = out[0] if isinstance(out, tuple) else out
    assert mode.made == ["empty_like"], f"forward made {mode.made}"  # y
    grad = torch.randn_like(y)
    mode.made.clear()
    with mode:
        y.backward(grad)
    assert mode.made == ["empty_like"], f"backward made {mode.made}"  # grad_x, once


def _full_size_passes(launches, numel: int) -> int:
    """Passes over full-size memory: the distinct full-size tensors each launch touches."""
    passes = 0
    for launch in launches:
        seen = {a.data_ptr() for a in launch.args if isinstance(a, torch.Tensor)
                and a.numel() == numel and 0 not in a.stride()}
        passes += len(seen)
    return passes


@pytest.mark.parametrize("name, forward, backward", [
    ("dsa", 3, 4), ("dsa_all", 3, 4), ("coord", 3, 4), ("coord_per_axis_beta", 3, 4),
    ("coord_mean_max", 3, 5),
])
def test_passes_over_full_size_memory(name, forward, backward):
    """3 passes forward (read x for the maps; read x, write y) and 4 backward (read grad_y
    and x for the map gradients; read grad_y, write grad_x), 5 when the max pooling of
    add-on 1 reads x again for its ties. (Each launch touches each full-size tensor once.)"""
    block = _ONE_BUFFER_BLOCKS[name]().to(DEVICE)
    x = _relu_ties((2, COORD_C, 6, 7)).requires_grad_()
    with common.record_launches() as launches:  # planned, not run: values are garbage
        out = block(x)
    assert _full_size_passes(launches, x.numel()) == forward, launches
    y = out[0] if isinstance(out, tuple) else out
    with common.record_launches() as launches:
        y.backward(torch.ones_like(y))
    assert _full_size_passes(launches, x.numel()) == backward
    assert x.grad is not None


def test_linked_backward_when_y_or_the_mask_takes_no_part():
    """Gradients reach x through the summary alone (a mask-only loss), through y alone, and
    after a backward that stopped before the summary (parameters only): the carriers hold
    nothing between backward passes (no Python-side state to go stale)."""
    ref, lib = _dsa_pair("default")
    x = _randn(2, 6, 5, 7)
    for use in ([1], [0]):
        assert_runs_match(run_block(lib, x, use=use), run_block(ref, x, use=use), TOL32,
                          f"loss on outputs {use}")
    grads = []
    for block in (lib, ref):
        xg = x.clone().requires_grad_()
        y, mask = block(xg)
        torch.autograd.grad(y.sum(), list(block.parameters()), retain_graph=True)
        grads.append(torch.autograd.grad(mask.sum(), xg)[0])
    assert_close(grads[0], grads[1], TOL32, "mask-only grad after a parameters-only pass")
    # CoordinateAttention's ops: a loss on the pooled maps alone
    xa = _randn(2, 5, 6, 7).requires_grad_()
    xb = xa.detach().clone().requires_grad_()
    x_h, x_w, link = ops.coord_pool_linked(xa, True)
    ops.coord_scale(xa, x_h.sigmoid(), x_w.sigmoid(), None, None, link)
    (x_h.sum() + x_w.square().sum()).backward()
    want_h = 0.5 * (xb.mean(3, keepdim=True) + xb.amax(3, keepdim=True))
    want_w = 0.5 * (xb.mean(2, keepdim=True) + xb.amax(2, keepdim=True))
    (want_h.sum() + want_w.square().sum()).backward()
    assert_close(xa.grad, xb.grad, 1e-6, "pool-only grad_x")


def test_linked_apply_with_a_wider_mask_than_x():
    """x bfloat16 with a float32 mask: y and grad_y are float32, the carrier bfloat16
    (autograd rounds grad_y once more); values within bfloat16 rounding of torch's."""
    x = _randn(2, 6, 5, 7, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    s, link = ops.dsa_summary_linked(xa)
    mask_a = torch.sigmoid(s.float().sum(1, keepdim=True))
    y = ops.dsa_apply(xa, mask_a, link)
    mx, _ = torch.max(xb, dim=1, keepdim=True)
    s_b = torch.cat([xb.mean(dim=1, keepdim=True), mx], dim=1)
    want = xb * torch.sigmoid(s_b.float().sum(1, keepdim=True))
    assert y.dtype == want.dtype == torch.float32
    g = torch.randn_like(want)
    (y * g).sum().backward()
    (want * g).sum().backward()
    assert xa.grad.dtype == torch.bfloat16
    assert rel_err(xa.grad, xb.grad) < 0.02


def test_linked_ops_name_a_wrong_link():
    x = _randn(2, 3, 4, 5)
    _, link = ops.dsa_summary_linked(_randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="link must be the DsaLink"):
        ops.dsa_apply(x, _randn(2, 1, 4, 5), link)
    with pytest.raises(ValueError, match="link must be the CoordLink"):
        ops.coord_scale(x, _randn(2, 3, 4, 1), _randn(2, 3, 1, 5), None, None, link)
    with pytest.raises(TypeError, match="c must be a 0-d tensor, a number or None"):
        ops.coord_scale(x, _randn(2, 3, 4, 1), _randn(2, 3, 1, 5), "0.5", None)


@pytest.mark.parametrize("kind", ["number", "tensor", "none"])
def test_coord_scale_takes_numbers_tensors_or_none_for_c_and_k(kind):
    x = _randn(2, 5, 4, 6, dtype=torch.float64)
    u_h, u_w = torch.rand(2, 5, 4, 1, dtype=torch.float64), torch.rand(2, 5, 1, 6,
                                                                          dtype=torch.float64)
    c, k = {"number": (0.3, 0.7), "none": (None, None),
            "tensor": (torch.tensor(0.3, dtype=torch.float64),
                       torch.tensor(0.7, dtype=torch.float64))}[kind]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ops.coord_scale(xa, u_h.to(DEVICE), u_w.to(DEVICE), c, k)
    c0, k0 = (0.0, 1.0) if kind == "none" else (0.3, 0.7)
    want = xb * (c0 + k0 * u_h * u_w)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)  # float64 exactly: no rounding
    g = torch.randn_like(want)
    (y * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# Small maps in parallel: C split across programs, combined in channel order
# --------------------------------------------------------------------------------------


def test_dsa_grid_fills_an_h100_at_every_benchmark_shape():
    """At least ~4 programs per SM (132 SMs) for every DSA shape of the GPU benchmark, in
    both layouts: C is split where pixel blocks alone leave the GPU idle."""
    with common.plan_for_gpu(132):
        for shape in ((64, 256, 56, 56), (256, 64, 32, 32), (128, 1024, 14, 14),
                      (8, 2048, 7, 7)):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(shape, device="meta").contiguous(memory_format=layout)
                g = dsa._grid(x)
                assert g.grid[0] >= 3.8 * 132, (shape, layout, g)
                if layout == torch.contiguous_format and shape[3] <= 14:
                    assert g.n_split > 1, (shape, g)  # 128 and 8 programs unsplit


def test_split_reductions_match_one_program_and_are_deterministic(monkeypatch):
    """Forced into many channel ranges, the summary finds the first maximal channel across
    ranges (ties, NaN in a later range, all -inf), and grad_mask sums the ranges in order:
    bitwise the same from run to run."""
    tiny = common.TileSizes(
        elements=256, dsa_pixels=64, dsa_channels=4, coord_channels=4, min_programs=10**6)
    monkeypatch.setattr(common, "INTERPRETER_TILES", tiny)
    monkeypatch.setattr(common, "GPU_TILES", tiny)
    monkeypatch.setattr(dsa, "min_programs", lambda t: 10**6)
    common.clear_caches()
    try:
        x = _relu_ties((2, 37, 5, 7))
        assert dsa._grid(x).n_split >= 9
        x[:, 30] = x[:, 1]  # ties across ranges: the first channel wins
        x[0, 33, 1, 1] = float("nan")  # NaN in a later range than the max
        x[1, :, 2, 2] = float("-inf")
        runs = []
        for _ in range(2):
            xa = x.clone().requires_grad_()
            s, link = ops.dsa_summary_linked(xa)
            mask = torch.sigmoid(torch.nan_to_num(s).sum(1, keepdim=True))
            y = ops.dsa_apply(xa, mask, link)
            (gx,) = torch.autograd.grad((y * torch.cos(y.detach())).sum() + s.nansum(), xa)
            runs.append((s.detach(), gx))
        xb = x.clone().requires_grad_()
        mx, _ = torch.max(xb, dim=1, keepdim=True)
        s_b = torch.cat([xb.mean(dim=1, keepdim=True), mx], dim=1)
        y_b = xb * torch.sigmoid(torch.nan_to_num(s_b).sum(1, keepdim=True))
        (gx_b,) = torch.autograd.grad((y_b * torch.cos(y_b.detach())).sum() + s_b.nansum(), xb)
        torch.testing.assert_close(runs[0][0], s_b.detach(), equal_nan=True, rtol=0, atol=1e-6)
        torch.testing.assert_close(runs[0][1], gx_b, equal_nan=True, rtol=1e-5, atol=1e-5)
        for a, b in zip(runs[0], runs[1], strict=True):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), "not deterministic"
    finally:
        common.clear_caches()


def determinism_outputs() -> list[torch.Tensor]:
    """y, grad_x and every parameter gradient of DSA (every option) and CoordinateAttention
    (every add-on) on fixed inputs, with the GPU's tile sizes (under the interpreter too):
    DSA's channel reduction split across programs and combined, CoordinateAttention's loop
    down H in three steps."""
    old = common.INTERPRETER_TILES
    common.INTERPRETER_TILES = common.GPU_TILES
    common.clear_caches()
    try:
        torch.manual_seed(0)
        out = []
        for block, shape in (
            (DynamicSpatialAttention(**DSA_CASES["all"], backend="triton"), (1, 24, 9, 15)),
            (CoordinateAttention(4, **COORD_CASES["all"][0], backend="triton"), (1, 4, 40, 100)),
        ):
            block = block.to(DEVICE)
            x = torch.randn(shape).to(DEVICE).requires_grad_()
            y = block(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(torch.randn(shape).to(DEVICE))
            out += [y.detach(), x.grad]
            out += [p.grad for p in block.parameters() if p.grad is not None]
        return [t.detach().cpu().contiguous() for t in out]
    finally:
        common.INTERPRETER_TILES = old
        common.clear_caches()


def _bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        s.shape == t.shape and s.dtype == t.dtype
        and torch.equal(s.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        for s, t in zip(a, b, strict=True))


def test_same_inputs_give_bitwise_equal_outputs_in_calls_and_processes(monkeypatch, tmp_path):
    """Under the default configuration (no autotuning) the same inputs give bitwise the
    same outputs and gradients of both blocks over repeated calls and in fresh processes
    (with other hash seeds: nothing may depend on the order of a set or dict of strings)."""
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != common.AUTOTUNE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = ("import sys, torch; from tests.blocks.test_triton import determinism_outputs; "
            "torch.save(determinism_outputs(), sys.argv[1])")
    # two fresh processes at once, while this one computes its own
    children = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{seed}.pt")],
                                 cwd=root, env={**env, "PYTHONHASHSEED": str(seed)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed in (1, 2)]
    runs = [determinism_outputs() for _ in range(2)]
    assert len(runs[0]) >= 8 and all(t.isfinite().all() for t in runs[0])
    assert all(t.abs().sum() > 0 for t in runs[0][:4])
    for again in runs[1:]:
        assert _bitwise_equal(runs[0], again), "repeated calls differ"
    for seed, child in zip((1, 2), children, strict=True):
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
        fresh = torch.load(tmp_path / f"{seed}.pt")
        assert _bitwise_equal(runs[0], fresh), f"a fresh process (PYTHONHASHSEED={seed}) differs"


# --------------------------------------------------------------------------------------
# Host path: integer arithmetic, memoised parameters, vector widths, tuning, devices
# --------------------------------------------------------------------------------------


def test_integer_helpers_agree_with_triton():
    import triton

    for n in [0, 1, 2, 3, 7, 8, 9, 56, 196, 1000, 8191, 8192, 2**20 + 1]:
        assert common.next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
        for d in (1, 3, 8, 256):
            assert common.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert common.pow2_divisor(56, 3136, cap=4) == 4
    assert common.pow2_divisor(14, cap=16) == 2
    assert common.pow2_divisor(7, 0, cap=8) == 1


@pytest.mark.parametrize("shape, dtype, layout, want", [
    ((2, 8, 56, 56), torch.float32, "contiguous", 4),  # 16 bytes
    ((2, 8, 56, 56), torch.bfloat16, "contiguous", 8),
    ((2, 8, 14, 14), torch.float32, "contiguous", 2),  # a 56-byte row: 8-byte aligned
    ((2, 8, 7, 7), torch.float32, "contiguous", 1),
    ((2, 8, 56, 56), torch.float32, "strided_w", 1),  # W not unit-stride
    ((2, 8, 56, 56), torch.float32, "channels_last", 1),  # along C instead (Triton's own)
])
def test_coord_row_vector_width(shape, dtype, layout, want):
    x = dict(_layouts(torch.zeros(shape, dtype=dtype)))[layout]
    assert coord.coord_launch(x).vec == want
    # a broadcast grad_y (y.sum()) is all stride 0: it never narrows the width
    gy = torch.zeros((), dtype=dtype).expand(shape)
    assert coord.coord_launch(x, gy).vec == want


def test_dsa_plane_vector_width_follows_h_times_w():
    assert dsa._vec((torch.zeros(2, 8, 14, 14),), (True,)) == 4  # 196 = 4 * 49
    assert dsa._vec((torch.zeros(2, 8, 7, 7),), (True,)) == 1
    assert dsa._vec((torch.zeros(2, 8, 14, 14, dtype=torch.bfloat16),), (True,)) == 4


def test_launch_parameters_are_memoised_per_shape_strides_and_dtype(monkeypatch):
    calls = []
    real = coord._coord_launch
    monkeypatch.setattr(coord, "_coord_launch", lambda *t: calls.append(1) or real(*t))
    coord._CACHE.clear()
    x = torch.zeros(2, 8, 6, 7)
    for _ in range(3):
        coord.coord_launch(x)
    coord.coord_launch(torch.zeros(2, 8, 6, 7))  # same key, another tensor
    assert len(calls) == 1
    coord.coord_launch(x.contiguous(memory_format=torch.channels_last))
    coord.coord_launch(x.double())
    coord.coord_launch(torch.zeros(3, 8, 6, 7))
    assert len(calls) == 4


def test_autotuning_is_opt_in(monkeypatch):
    """By default each looped kernel runs the one configuration the rule picks for its shape
    class (the same bits from run to run and rank to rank); LIGHTNING_ATTN_TRITON_AUTOTUNE=1
    opts into triton.autotune over every configuration on CUDA, keyed on the sizes and
    layout. The interpreter never tunes; a value other than 0 or 1 is a clear error."""
    kernel = coord._coord_scale_kernel
    config = common.LAUNCH_CONFIGS["long"]
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    for device in (cuda, torch.device("cpu")):
        assert common.select_kernel(kernel, coord._KEY, device, config) == (
            kernel, {"NUM_STAGES": 3, "TILE_DIV": 1, "num_warps": 4})
    monkeypatch.setenv(common.AUTOTUNE_ENV, "1")
    fn, extra = common.select_kernel(kernel, coord._KEY, cuda, config)
    assert fn is not kernel and extra == {} and fn.keys == coord._KEY
    assert [(c.kwargs, c.num_warps) for c in fn.configs] == [
        (c.constexprs, c.num_warps) for c in common.LAUNCH_CONFIGS.values()]
    assert common.select_kernel(kernel, coord._KEY, torch.device("cpu"), config)[0] is kernel
    monkeypatch.setenv(common.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="LIGHTNING_ATTN_TRITON_AUTOTUNE must be 1 .* 'yes'"):
        common.select_kernel(kernel, coord._KEY, cuda, config)


def test_one_fixed_config_per_shape_class():
    """The rule: a step larger than the GPU tile is "wide" (8 warps), else a loop of at
    least LONG_LOOP steps is "long" (3 stages), else "short"; the tile divisor stays 1 (it
    changes the order of the sums). Planned for 132 SMs, the benchmark shapes fall into the
    classes the sm_90 compile test compiles."""
    assert common.shape_class(2048, 1) == "short"
    assert common.shape_class(2048, common.LONG_LOOP - 1) == "short"
    assert common.shape_class(2048, common.LONG_LOOP) == "long"
    assert common.shape_class(4096, 1) == "wide" == common.shape_class(4096, 100)
    assert {c.tile_div for n, c in common.LAUNCH_CONFIGS.items() if n != "halved"} == {1}
    assert common.launch_config(4096, 1).num_warps == 8
    with pytest.raises(ValueError, match="tile_elements=0"):
        common.shape_class(0, 1)
    want = {  # (block, shape): (DSA NCHW, CoordinateAttention NCHW)
        (64, 256, 56, 56): ("long", "short"), (256, 64, 32, 32): ("long", "short"),
        (128, 1024, 14, 14): ("long", "short"), (8, 2048, 7, 7): ("short", "short"),
        (2, 16, 3, 8192): ("short", "wide"),
    }
    names = {c: n for n, c in common.LAUNCH_CONFIGS.items()}
    with common.plan_for_gpu(132):
        for shape, (dsa_class, coord_class) in want.items():
            x = torch.empty(shape, device="meta")
            assert names[dsa._grid(x).config] == dsa_class, shape
            assert names[coord.coord_launch(x).config] == coord_class, shape


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Each launch is inside torch.cuda.device(x.device) for CUDA tensors: the guard is
    chosen from the tensor's own device (cuda:1 without set_device launches on cuda:1)."""
    guard = common.launch_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []

    def counting_guard(t):
        entered.append(t.device)
        return common.launch_guard(t)

    launched = []
    real_launch = common.launch

    def counting_launch(*args, **kwargs):
        launched.append(args[0])
        return real_launch(*args, **kwargs)

    for module in (dsa, coord):
        monkeypatch.setattr(module, "launch_guard", counting_guard)
        monkeypatch.setattr(module, "launch", counting_launch)
    for block in _ONE_BUFFER_BLOCKS.values():
        out = block().to(DEVICE)(_randn(2, COORD_C, 5, 6).requires_grad_())
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert len(entered) == 4 * len(_ONE_BUFFER_BLOCKS) and len(launched) >= len(entered)
    assert {d.type for d in entered} == {DEVICE.type}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_tensor_on_the_second_gpu_runs_there():
    x = torch.randn(2, COORD_C, 6, 7, device="cuda:1")
    for make in (lambda: DynamicSpatialAttention(backend="triton"),
                 lambda: CoordinateAttention(COORD_C, backend="triton")):
        block = make()
        ref = copy.deepcopy(block)
        ref.backend = "plain"
        assert torch.cuda.current_device() == 0
        got, want = run_block(block.to("cuda:1"), x), run_block(ref.to("cuda:1"), x)
        assert_runs_match(got, want, TOL32, "cuda:1")


# --------------------------------------------------------------------------------------
# No host-to-device copy in a forward
# --------------------------------------------------------------------------------------

#: Ops that make a tensor from Python numbers: torch.tensor/as_tensor/new_tensor
#: (lift_fresh: a host-to-device copy on a GPU, which CUDA-graph capture refuses),
#: torch.scalar_tensor and torch.full.
_FROM_NUMBERS = {"lift_fresh", "lift_fresh_copy", "scalar_tensor", "full"}


class _TensorsFromNumbers(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _FROM_NUMBERS:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


_EVERY_CONFIG = [("dsa", n, kw) for n, kw in DSA_CASES.items()] + [
    ("coord", n, kw) for n, (kw, _) in COORD_CASES.items()
]


@pytest.mark.parametrize("backend", ["plain", "torch", "triton"])
def test_no_forward_makes_a_tensor_from_a_python_number(backend):
    """Every option table entry of both blocks, every backend: a forward makes no tensor
    from Python numbers (per-axis alpha without beta used to: torch.as_tensor(1.0, device))."""
    x = _randn(2, COORD_C, 5, 6)
    for kind, name, kw in _EVERY_CONFIG:
        if kind == "dsa":
            block = DynamicSpatialAttention(**kw, backend=backend)
        else:
            block = CoordinateAttention(COORD_C, **kw, backend=backend)
        block = block.to(DEVICE)
        mode = _TensorsFromNumbers()
        with mode:
            block(x.clone().requires_grad_())
        assert not mode.found, f"{kind} {name}: {mode.found}"


@pytest.mark.skipif(not CUDA, reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("name", ["dsa", "coord", "coord_per_axis_beta"])
def test_forward_and_backward_capture_in_a_cuda_graph(name):
    """No host-to-device copy, no sync, no allocation outside the graph pool in a step: the
    whole forward+backward captures and replays (after a warm-up that compiles and tunes)."""
    block = _ONE_BUFFER_BLOCKS[name]().cuda()
    x = torch.randn(2, COORD_C, 6, 7, device="cuda", requires_grad=True)
    g = torch.randn(2, COORD_C, 6, 7, device="cuda")

    def step():
        out = block(x)
        (out[0] if isinstance(out, tuple) else out).backward(g)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    want = x.grad.clone()
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        step()
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(x.grad, want, TOL32, "grad x from the replayed graph")


# --------------------------------------------------------------------------------------
# Kernel launches per forward+backward: at most the seed code's
# --------------------------------------------------------------------------------------


class _KernelCount(_SeesInsideOurOps):
    """Counts the aten kernels of one step on the CPU, as a GPU would launch them.

    Every op that reaches the dispatcher below autograd counts one kernel, except views and
    allocations (``empty*``, ``detach``, ``_unsafe_view``, ...): a CPU op and its CUDA
    counterpart are the same dispatcher entry, one kernel each on a GPU. Our custom ops do
    not count themselves: the aten ops inside them do (they run under the mode), and each
    Triton launch counts one (:func:`interpreter_unseen`, where the interpreter starts a
    grid).
    """

    NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                 "detach", "lift_fresh", "_unsafe_view", "promote_types", "set_", "alias"}

    def __init__(self) -> None:
        super().__init__()
        self.aten: dict[str, int] = {}

    def seen(self, func, out) -> None:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.NO_KERNEL:
            self.aten[name] = self.aten.get(name, 0) + 1


def _count_launches(block, x, triton_launches: dict) -> tuple[dict, dict]:
    """``(aten kernels, Triton launches)`` of one forward+backward, by name."""
    triton_launches.clear()
    mode = _KernelCount()
    x = x.clone().requires_grad_()
    with mode:
        out = block(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(torch.ones_like(y))
    return mode.aten, dict(triton_launches)


_LAUNCH_CASES = {
    "dsa": (lambda: seed_reference.DynamicSpatialAttention(),
            lambda: DynamicSpatialAttention(backend="triton")),
    "dsa_all": (lambda: seed_reference.DynamicSpatialAttention(**DSA_CASES["all"]),
                lambda: DynamicSpatialAttention(**DSA_CASES["all"], backend="triton")),
    "coord": (lambda: seed_reference.CoordinateAtt(COORD_C),
              lambda: CoordinateAttention(COORD_C, backend="triton")),
    "coord_all": (lambda: seed_reference.SeedCoordAttAddons(COORD_C, **COORD_CASES["all"][1]),
                  lambda: CoordinateAttention(COORD_C, **COORD_CASES["all"][0],
                                              backend="triton")),
}


@pytest.mark.skipif(CUDA, reason="counts launches through Triton's interpreter (CPU)")
@pytest.mark.parametrize("name, split", [(n, False) for n in _LAUNCH_CASES] + [
    ("dsa", True), ("dsa_all", True)])
def test_kernel_launches_per_step_at_most_the_seeds(name, split, monkeypatch,
                                                    interpreter_unseen):
    """Kernel launches of one forward+backward (see :class:`_KernelCount`): the Triton path
    launches no more than the seeds' code, also when DSA splits C (two more launches)."""
    if split:
        monkeypatch.setattr(common, "INTERPRETER_TILES", common.TileSizes(
            elements=256, dsa_pixels=64, dsa_channels=4, coord_channels=4,
            min_programs=10**6))
    common.clear_caches()
    make_seed, make_lib = _LAUNCH_CASES[name]
    x = _relu_ties((2, COORD_C, 6, 7))
    seed_aten, seed_triton = _count_launches(make_seed(), x, interpreter_unseen)
    lib_aten, lib_triton = _count_launches(make_lib(), x, interpreter_unseen)
    common.clear_caches()
    assert not seed_triton
    assert sum(lib_triton.values()) == (6 if split and name.startswith("dsa") else 4), lib_triton
    seed_total = sum(seed_aten.values())
    lib_total = sum(lib_aten.values()) + sum(lib_triton.values())
    assert lib_total <= seed_total, (
        f"triton {lib_total} ({lib_aten}, {lib_triton}) > seed {seed_total} ({seed_aten})"
    )


# --------------------------------------------------------------------------------------
# Peak memory of a step, in units of x: benchmarks/memory.py's measurement
# --------------------------------------------------------------------------------------


def _benchmark(name: str):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dsa", "coord"])
def test_peak_memory_at_most_0_7_of_the_seeds_and_the_torch_backends(kind):
    """One forward+backward's peak beyond its inputs (``x.grad = None`` first), in units of
    x: the Triton path holds y and grad_x and small maps (~2.1 x), the seed 3.1 (DSA) and
    5.4 (CoordinateAttention) x, the torch backend 2.1 and 2.6 x. On the CPU the allocation
    events of torch.profiler (the interpreter made to free its arguments as a GPU launch
    does); on a GPU torch.cuda's peak."""
    memory = _benchmark("memory")
    rows = memory.measure(kind, (2, 64, 16, 16), "fp32", "nchw", DEVICE,
                          ["seed", "torch", "triton"])
    peak = {r["variant"]: r["peak_x"] for r in rows}
    assert peak["triton"] <= 0.7 * peak["seed"], peak
    assert peak["triton"] <= peak["torch"] + 0.02, peak
    assert not memory.goal_failures(rows)
