"""Helpers shared by the block tests: option tables, loss, gradient collection, comparisons."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks.kernels import triton_importable

from . import seed_reference as seed

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

#: Whether ``backend="triton"`` runs on the CPU tensors of the parity tests: Triton's
#: interpreter, set by tests/conftest.py on machines without CUDA (on a GPU machine the
#: Triton path is tested on CUDA tensors by test_triton.py instead).
TRITON_ON_CPU = triton_importable() and os.environ.get("TRITON_INTERPRET") == "1"

#: The backends every parity test runs on this machine.
BACKENDS = ["torch", "plain"] + (["triton"] if TRITON_ON_CPU else [])

# --------------------------------------------------------------------------------------
# Option tables
# --------------------------------------------------------------------------------------

#: DynamicSpatialAttention options accepted by both the seed and the library.
DSA_CASES: dict[str, dict] = {
    "default": {},
    "kernels_3_5_7": {"kernels": (3, 5, 7)},
    "even_kernels": {"kernels": (2, 4)},
    "single_kernel": {"kernels": (5,)},
    "single_even_kernel_no_dilated": {"kernels": (4,), "use_dilated": False},
    "only_dilated": {"kernels": (), "use_dilated": True},
    "no_dilated": {"use_dilated": False},
    "dilated_5_d3": {"dilated_kernel": 5, "dilated_d": 3},
    "dilated_even_6_d1": {"dilated_kernel": 6, "dilated_d": 1},
    "hardsigmoid": {"gate": "hardsigmoid"},
    "temperature_0.5": {"temperature": 0.5},
    "temperature_3": {"temperature": 3.0},
    "learnable_temperature": {"temperature": 2.0, "learnable_temperature": True},
    "router_hidden_3": {"router_hidden": 3},
    "no_bias": {"bias": False},
    "router_weights": {"return_router_weights": True},
    "all": {
        "kernels": (2, 5),
        "dilated_kernel": 4,
        "dilated_d": 3,
        "gate": "hardsigmoid",
        "temperature": 0.7,
        "learnable_temperature": True,
        "router_hidden": 5,
        "bias": False,
        "return_router_weights": True,
    },
}

COORD_C = 16  # mid = max(8, 16 // 32) = 8, so head_groups=4 divides both

#: CoordinateAttention options: id -> (library kwargs, seed-style SeedCoordAttAddons kwargs).
COORD_CASES: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "mean_max": ({"pool": "mean_max"}, {"mean_max": True}),
    "axis_kernel_3": ({"axis_kernel": 3}, {"axis_dw": True}),
    "axis_dilation_2": ({"axis_kernel": 3, "axis_dilation": 2}, {"dilation": 2}),
    "per_axis_alpha": (
        {"per_axis_alpha": True, "alpha": 0.6},
        {"per_axis_alpha": True, "alpha": 0.6},
    ),
    "per_axis_alpha_learnable": (
        {"per_axis_alpha": True, "alpha": 0.6, "learnable_alpha": True},
        {"per_axis_alpha": True, "alpha": 0.6, "learnable_alpha": True},
    ),
    "hardsigmoid": ({"gate": "hardsigmoid"}, {"hardsigmoid": True}),
    "beta": ({"beta": 0.5}, {"beta": 0.5}),
    "beta_learnable": (
        {"beta": 0.5, "learnable_beta": True},
        {"beta": 0.5, "learnable_beta": True},
    ),
    "bottleneck_2": ({"bottleneck_layers": 2}, {"bottleneck2": True}),
    "head_groups_4": ({"head_groups": 4}, {"groups": 4}),
    "spatial_gate": ({"spatial_gate": True}, {"spatial_gate": True}),
    "relu": ({"act": "relu"}, {"act": "relu"}),
    "alpha_0.7_learnable": (
        {"alpha": 0.7, "learnable_alpha": True},
        {"alpha": 0.7, "learnable_alpha": True},
    ),
    "per_axis_alpha_beta": (
        {"per_axis_alpha": True, "alpha": 0.6, "beta": 0.5},
        {"per_axis_alpha": True, "alpha": 0.6, "beta": 0.5},
    ),
    "all": (
        {
            "pool": "mean_max", "axis_kernel": 3, "axis_dilation": 2, "per_axis_alpha": True,
            "gate": "hardsigmoid", "beta": 0.5, "learnable_beta": True,
            "bottleneck_layers": 2, "head_groups": 4, "spatial_gate": True, "act": "relu",
            "alpha": 0.7, "learnable_alpha": True,
        },
        {
            "mean_max": True, "dilation": 2, "per_axis_alpha": True, "hardsigmoid": True,
            "beta": 0.5, "learnable_beta": True, "bottleneck2": True, "groups": 4,
            "spatial_gate": True, "act": "relu", "alpha": 0.7, "learnable_alpha": True,
        },
    ),
    "all_single_alpha_fixed_beta": (
        {
            "pool": "mean_max", "axis_kernel": 3, "gate": "hardsigmoid", "beta": 0.5,
            "bottleneck_layers": 2, "head_groups": 4, "spatial_gate": True, "alpha": 0.7,
        },
        {
            "mean_max": True, "axis_dw": True, "hardsigmoid": True, "beta": 0.5,
            "bottleneck2": True, "groups": 4, "spatial_gate": True, "alpha": 0.7,
        },
    ),
}

# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_batchnorm_(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            m.bias.copy_(0.3 * torch.randn(n, generator=gen))
            m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            m.num_batches_tracked.fill_(3)


def seed_dsa(kwargs: dict, seed_value: int = 1) -> seed.DynamicSpatialAttention:
    torch.manual_seed(seed_value)
    return seed.DynamicSpatialAttention(**kwargs)


def lib_dsa_from(seed_block: nn.Module, kwargs: dict, backend: str) -> DynamicSpatialAttention:
    """A library DSA built with ``kwargs`` that strictly loads ``seed_block``'s state dict."""
    torch.manual_seed(12345)  # different init: only the loaded state may make them agree
    lib = DynamicSpatialAttention(**kwargs, backend=backend)
    lib.load_state_dict(seed_block.state_dict(), strict=True)
    return lib


def seed_coord(seed_kwargs: dict, channels: int = COORD_C, seed_value: int = 1):
    torch.manual_seed(seed_value)
    block = seed.SeedCoordAttAddons(channels, **seed_kwargs)
    perturb_batchnorm_(block, torch.Generator().manual_seed(seed_value + 7))
    return block


def lib_coord_from(
    seed_block: nn.Module, lib_kwargs: dict, backend: str, channels: int = COORD_C
):
    torch.manual_seed(12345)
    lib = CoordinateAttention(channels, **lib_kwargs, backend=backend)
    lib.load_state_dict(seed_block.state_dict(), strict=True)
    return lib


# --------------------------------------------------------------------------------------
# Running a block and collecting gradients
# --------------------------------------------------------------------------------------


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def loss_weights(outs, seed_value: int = 99) -> list[torch.Tensor]:
    """Fixed random weights ``g`` (one per output) for the loss ``sum((o * g).mean())``."""
    gen = torch.Generator().manual_seed(seed_value)
    return [
        torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
        for o in outs
    ]


def weighted_loss(outs, weights, use=None) -> torch.Tensor:
    """``sum_i (out_i * g_i).mean()`` over the outputs selected by ``use`` (default all)."""
    idx = range(len(outs)) if use is None else use
    return sum((outs[i] * weights[i]).mean() for i in idx)


def run_block(block: nn.Module, x: torch.Tensor, *, x_grad: bool = True, use=None, weights=None):
    """Forward ``block`` on a fresh copy of ``x``, backward a weighted mean loss.

    Returns ``(outputs (detached), grad_x or None, {param name: grad})``.
    """
    x = x.detach().clone().requires_grad_(x_grad)
    outs = as_tuple(block(x))
    if weights is None:
        weights = loss_weights(outs)
    loss = weighted_loss(outs, weights, use)
    params = dict(block.named_parameters())
    inputs = ([x] if x_grad else []) + list(params.values())
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    gx = grads[0] if x_grad else None
    pgrads = dict(zip(params, grads[1:] if x_grad else grads, strict=True))
    return tuple(o.detach() for o in outs), gx, pgrads


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        assert a is None and b is None, "one side has a gradient and the other none"
        return 0.0
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_close(a, b, tol: float, what: str) -> None:
    d = max_diff(a, b)
    assert d <= tol, f"{what}: max abs diff {d:.3g} > {tol:.1g}"


def assert_runs_match(run_a, run_b, tol: float, label: str = "") -> None:
    """Compare two ``run_block`` results: every output, grad_x and every parameter grad."""
    outs_a, gx_a, pg_a = run_a
    outs_b, gx_b, pg_b = run_b
    assert len(outs_a) == len(outs_b), f"{label}: {len(outs_a)} vs {len(outs_b)} outputs"
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b, strict=True)):
        assert_close(oa, ob, tol, f"{label} output {i}")
    assert_close(gx_a, gx_b, tol, f"{label} grad x")
    assert set(pg_a) == set(pg_b), f"{label}: parameter names differ"
    for name in pg_a:
        assert_close(pg_a[name], pg_b[name], tol, f"{label} grad {name}")
    # a parameter that takes part must receive a gradient
    for name, g in pg_a.items():
        assert g is not None, f"{label}: no gradient for {name}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def isclose_rel(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * abs(b)


def spy_masks(block) -> dict[str, torch.Tensor]:
    """The ``a_h``, ``a_w`` of the block's next forwards (the last one wins)."""
    seen: dict[str, torch.Tensor] = {}
    compute = block._masks

    def spy(*args, **kwargs):
        a_h, a_w = compute(*args, **kwargs)
        seen["a_h"], seen["a_w"] = a_h.detach(), a_w.detach()
        return a_h, a_w

    block._masks = spy
    return seen
