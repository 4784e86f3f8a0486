"""Backends agree on dtype: under autocast (bf16 and fp16) every backend returns the input's
dtype and the same mask dtypes as ``"plain"``, with the same values up to the autocast
dtype's rounding. (CoordinateAttention's ``"torch"`` and ``"triton"`` paths used to add the
float32 bias of ``conv_h`` / ``conv_w`` after a bf16 matrix product: float32 masks and a
float32 output for a bf16 input.)"""

from __future__ import annotations

import pytest
import torch

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

from ._util import BACKENDS

BLOCKS = {
    "dsa": lambda backend: DynamicSpatialAttention(backend=backend, return_router_weights=True),
    "coord": lambda backend: CoordinateAttention(8, backend=backend),
    "coord_axis_alpha_beta": lambda backend: CoordinateAttention(
        8, backend=backend, per_axis_alpha=True, alpha=0.7, beta=0.5, learnable_beta=True
    ),
    "coord_mean_max_spatial_gate": lambda backend: CoordinateAttention(
        8, backend=backend, pool="mean_max", axis_kernel=3, spatial_gate=True, alpha=0.6
    ),
}


def _run(name: str, backend: str, x: torch.Tensor, autocast: torch.dtype):
    """``y``, DSA's returned ``mask`` and ``rw`` (none for Coord), and ``x.grad``."""
    torch.manual_seed(0)
    block = BLOCKS[name](backend)
    with torch.autocast("cpu", dtype=autocast):
        out = block(x)
    y = out[0] if isinstance(out, tuple) else out
    extra = list(out[1:]) if isinstance(out, tuple) else []
    y.float().sum().backward()
    return y, extra, x.grad


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_backend_returns_the_input_dtype(name, backend, input_dtype, autocast) -> None:
    dtype = torch.float32 if input_dtype == "float32" else autocast
    base = torch.randn(2, 8, 6, 5)
    x = base.to(dtype).requires_grad_(True)
    x_plain = base.to(dtype).requires_grad_(True)
    y, masks, grad = _run(name, backend, x, autocast)
    y_plain, masks_plain, grad_plain = _run(name, "plain", x_plain, autocast)
    assert y.dtype == dtype == y_plain.dtype, (y.dtype, y_plain.dtype)
    assert grad.dtype == dtype
    assert [m.dtype for m in masks] == [m.dtype for m in masks_plain]
    tol = 2e-2 if autocast is torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.float(), y_plain.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), grad_plain.float(), rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
def test_coord_masks_have_the_plain_dtype_on_every_backend(backend, autocast, input_dtype):
    """The recorded masks (what the diagnostics read) have one dtype across backends."""
    seen = {}
    for b in ("plain", backend):
        block = CoordinateAttention(8, backend=b)
        original = block.record

        def spy(masks, *args, _b=b, _orig=original, **kwargs):
            seen[_b] = {k: v.dtype for k, v in masks.items()}
            return _orig(masks, *args, **kwargs)

        block.record = spy
        with torch.autocast("cpu", dtype=autocast):
            block(torch.randn(2, 8, 6, 5, dtype=autocast if input_dtype == "autocast" else None))
    assert seen[backend] == seen["plain"] == {"mask_h": autocast, "mask_w": autocast}
