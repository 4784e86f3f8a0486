"""``backend="auto"``: per-shape rules from GPU measurements (block, H*W, C, dtype).

No GPU is needed: :func:`auto_backend` takes the device type and sizes, and the rules come
from benchmark rows (``benchmarks/blocks.py --device cuda --json``, ``make gpu-check``).
"""

from __future__ import annotations

import pytest
import torch

from lightning_attn.blocks.kernels import backend as B


def _rows(block, shape, dtype, ms: dict[str, float]) -> list[dict]:
    return [{"block": block, "shape": list(shape), "dtype": dtype, "mode": "fwd+bwd",
             "variant": v, "ms": t} for v, t in ms.items()]


def test_without_a_measurement_auto_never_picks_triton():
    assert all(rule.backend != "triton" for rule in B.CUDA_RULES)
    for block in ("dsa", "coord"):
        for hw in (49, 196, 1024, 3136):
            for dtype in ("fp32", "bf16"):
                assert B.auto_backend(block, "cuda", hw, 256, dtype, False) != "triton"


def test_auto_on_cpu_and_under_compile():
    assert B.auto_backend("dsa", "cpu", 196, 64, "fp32", compiling=False) == "torch"
    assert B.auto_backend("dsa", "cpu", 196, 64, "fp32", compiling=True) == "plain"
    assert B.auto_backend("coord", "mps", 196, 64, "fp32", compiling=False) == "plain"
    x = torch.randn(2, 8, 5, 5)
    assert B.resolve_backend("auto", "coord", x) == "torch"
    assert B.resolve_backend("triton", "coord", x) == "triton"


def test_the_shipped_rule_is_issue_9s_measurement():
    # CoordinateAttention's torch fused path on maps of at least 32x32 (H100, torch 2.11)
    assert B.auto_backend("coord", "cuda", 56 * 56, 256, "fp32", False) == "torch"
    assert B.auto_backend("coord", "cuda", 32 * 32, 64, "bf16", False) == "torch"
    assert B.auto_backend("coord", "cuda", 14 * 14, 1024, "fp32", False) == "plain"
    assert B.auto_backend("dsa", "cuda", 56 * 56, 256, "fp32", False) == "plain"
    # the torch path's autograd functions cannot be traced: plain under torch.compile
    assert B.auto_backend("coord", "cuda", 56 * 56, 256, "fp32", True) == "plain"


def test_rules_from_a_measured_table(monkeypatch):
    rows = (
        _rows("dsa", (64, 256, 56, 56), "fp32", {"seed": 9.0, "plain": 8.0, "torch": 7.0,
                                                 "triton": 3.0})
        + _rows("dsa", (8, 2048, 7, 7), "fp32", {"plain": 1.0, "torch": 1.2, "triton": 0.99})
        + _rows("coord", (128, 1024, 14, 14), "bf16 autocast",
                {"plain": 2.0, "torch": 1.5, "triton": 1.0})
    )
    rules = B.rules_from_measurement(rows)
    assert [(r.block, r.backend, r.dtypes) for r in rules] == [
        ("coord", "triton", ("bf16",)), ("dsa", "triton", ("fp32",))]
    monkeypatch.setattr(B, "CUDA_RULES", ())
    B.use_measured_rules(rules)
    auto = B.auto_backend
    assert auto("dsa", "cuda", 56 * 56, 256, "fp32", False) == "triton"
    assert auto("dsa", "cuda", 48 * 48, 128, "fp32", True) == "triton"  # near, compiled
    assert auto("dsa", "cuda", 56 * 56, 256, "bf16", False) == "plain"  # not measured
    assert auto("dsa", "cuda", 7 * 7, 2048, "fp32", False) == "plain"  # 1 % is no win
    assert auto("dsa", "cuda", 112 * 112, 256, "fp32", False) == "plain"  # too far in H*W
    assert auto("dsa", "cuda", 56 * 56, 2048, "fp32", False) == "plain"  # too far in C
    assert auto("coord", "cuda", 14 * 14, 1024, "bf16", False) == "triton"
    assert auto("dsa", "cpu", 56 * 56, 256, "fp32", False) == "torch"  # CUDA rules only


def test_the_nearest_matching_rule_decides(monkeypatch):
    wide = B.AutoRule("dsa", "torch", hw=(1, 10**6), channels=(1, 10**6), dtypes=("fp32",),
                      source="test")
    near = B.AutoRule("dsa", "triton", hw=(1000, 4000), channels=(64, 512), dtypes=("fp32",),
                      source="test")
    monkeypatch.setattr(B, "CUDA_RULES", (wide, near))
    assert B.auto_backend("dsa", "cuda", 2000, 200, "fp32", False) == "triton"
    assert B.auto_backend("dsa", "cuda", 10, 8, "fp32", False) == "torch"


def test_bad_rules_are_refused(monkeypatch):
    monkeypatch.setattr(B, "CUDA_RULES", B.CUDA_RULES)
    with pytest.raises(ValueError, match="AutoRule objects naming plain, torch or triton"):
        B.use_measured_rules([("dsa", "triton")])
