"""Adversarial table for the blocks: every bad or edge input tried against
DynamicSpatialAttention and CoordinateAttention, with its outcome class; and the recording's
execution patterns and degenerate numbers (:mod:`.recording_rows`).

- ``clear``: an exception of the named type whose message names the argument (or the tensor
  property) and the value — what a user can act on.
- ``correct``: the block does the right thing (builds, runs, keeps the dtype ...), checked.

No row may be ``raw`` (an error from deep inside torch that names neither) or ``silent`` (a
wrong value accepted without a word): :func:`test_outcome_counts` pins the counts, so the
numbers in the issue's table are reproducible (``pytest tests/blocks/test_adversarial.py``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest
import timm
import torch
from torch import nn

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

from ..adversarial import Case, assert_outcome, clear, correct
from .recording_rows import DEGENERATE_CASES, EXECUTION_CASES

NAN = float("nan")


def x(*shape: int, **kw) -> torch.Tensor:
    return torch.randn(*shape, **kw)


def y_of(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def under_autocast(block: nn.Module, inp: torch.Tensor, dtype: torch.dtype) -> object:
    with torch.autocast("cpu", dtype=dtype):
        return block(inp)


D, C = DynamicSpatialAttention, CoordinateAttention

DSA_CASES = [
    # -- booleans take only a bool ------------------------------------------------------------
    clear("dsa use_dilated='false'", lambda: D(use_dilated="false"), TypeError,
          "use_dilated must be a bool, got 'false'"),
    clear("dsa learnable_temperature='no'", lambda: D(learnable_temperature="no"), TypeError,
          "learnable_temperature must be a bool, got 'no'"),
    clear("dsa return_mask=0", lambda: D(return_mask=0), TypeError, "return_mask", "0"),
    clear("dsa return_router_weights=None", lambda: D(return_router_weights=None), TypeError,
          "return_router_weights", "None"),
    clear("dsa bias='True'", lambda: D(bias="True"), TypeError, "bias", "'True'"),
    clear("dsa fused='yes'", lambda: D(fused="yes"), TypeError, "fused", "'yes'"),
    # -- sizes that would allocate absurd memory ----------------------------------------------
    clear("dsa kernels=(10**9,)", lambda: D(kernels=(10**9,)), ValueError,
          "kernels[0]=1000000000", "255", "MAX_KERNEL_SIZE"),
    clear("dsa kernels=(3,)*100", lambda: D(kernels=(3,) * 100), ValueError,
          "100 entries", "64", "MAX_BRANCHES"),
    clear("dsa dilated_kernel=10**6", lambda: D(dilated_kernel=10**6), ValueError,
          "dilated_kernel=1000000", "MAX_KERNEL_SIZE"),
    clear("dsa dilated_d=10**9", lambda: D(dilated_d=10**9), ValueError,
          "dilated_d=1000000000", "1023", "MAX_KERNEL_EXTENT"),
    clear("dsa dilated span 200*(7-1)+1", lambda: D(dilated_d=200), ValueError,
          "dilated_d * (dilated_kernel - 1) + 1=1201", "MAX_KERNEL_EXTENT"),
    clear("dsa router_hidden=10**9", lambda: D(router_hidden=10**9), ValueError,
          "router_hidden=1000000000", "4096", "MAX_ROUTER_HIDDEN"),
    clear("dsa channels=10**9", lambda: D(10**9), ValueError, "channels=1000000000",
          "MAX_CHANNELS"),
    correct("dsa kernels=(255,) at the limit", lambda: D(kernels=(255,), use_dilated=False),
            lambda b: b.kernel_sizes == (255,)),
    # -- other bad values ---------------------------------------------------------------------
    clear("dsa channels=0", lambda: D(0), ValueError, "channels must be >= 1, got 0"),
    clear("dsa channels=64.0", lambda: D(64.0), TypeError, "channels must be an int", "64.0"),
    clear("dsa channels='64'", lambda: D("64"), TypeError, "channels must be an int", "'64'"),
    clear("dsa kernels positional and kernels=", lambda: D((3, 5), kernels=(7,)), TypeError,
          "first argument is now channels", "kernels=(7,)"),
    clear("dsa old positional (3, 5), False", lambda: D((3, 5), False), TypeError,
          "first argument is now channels", "by keyword"),
    clear("dsa temperature=nan", lambda: D(temperature=NAN), ValueError, "temperature", "nan"),
    clear("dsa gate='tanh'", lambda: D(gate="tanh"), ValueError, "gate", "'tanh'"),
    clear("dsa gate_layer=nn.Tanh", lambda: D(gate_layer=nn.Tanh), ValueError, "gate_layer",
          "[0, 1]", "Tanh"),
    clear("dsa act_layer='prelu'", lambda: D(act_layer="prelu"), ValueError, "act_layer",
          "prelu", "parameters"),
    clear("dsa act_layer=nn.Linear", lambda: D(act_layer=nn.Linear), ValueError, "act_layer",
          "Linear"),
    correct("dsa rd_ratio=0.25 (timm's reduction: checked, not used)",
            lambda: D(rd_ratio=0.25, rd_divisor=8), lambda b: _same_layout(b, D())),
    clear("dsa rd_ratio=2", lambda: D(rd_ratio=2), ValueError, "rd_ratio", "(0, 1]"),
    clear("dsa device='gpu0'", lambda: D(device="gpu0"), ValueError, "device='gpu0'"),
    clear("dsa dtype=torch.int64", lambda: D(dtype=torch.int64), TypeError, "dtype",
          "torch.int64"),
    clear("dsa dtype='float16'", lambda: D(dtype="float16"), TypeError, "dtype", "'float16'"),
    clear("dsa backend='cuda'", lambda: D(backend="cuda"), ValueError, "backend", "'cuda'"),
    clear("dsa eps=-1", lambda: D(eps=-1.0), ValueError, "eps", "-1.0"),
    correct("dsa kernels first positionally (one more release)",
            lambda: _warns(lambda: D((3, 5))), lambda b: b.kernel_sizes == (3, 5)),
    # -- inputs -------------------------------------------------------------------------------
    clear("dsa meta input into a CPU block", lambda: D()(x(2, 4, 6, 6, device="meta")),
          RuntimeError, "parameters on cpu", "input on meta"),
    clear("dsa CPU input into a meta block", lambda: D(device="meta")(x(2, 4, 6, 6)),
          RuntimeError, "parameters on meta", "input on cpu"),
    clear("dsa float64 input, float32 block", lambda: D()(x(2, 4, 6, 6).double()), TypeError,
          "torch.float32 parameters", "torch.float64 input"),
    clear("dsa float64 input under bf16 autocast",
          lambda: under_autocast(D(), x(2, 4, 6, 6).double(), torch.bfloat16), TypeError,
          "torch.float64 input", "never casts float64"),
    clear("dsa wrong channels (channels=8)", lambda: D(8)(x(2, 4, 6, 6)), ValueError,
          "(B, 8, H, W)", "channels=8", "(2, 4, 6, 6)"),
    clear("dsa int input", lambda: D()(torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError,
          "floating-point", "torch.int64"),
    clear("dsa 3-D input", lambda: D()(x(4, 6, 6)), ValueError, "4-D", "(4, 6, 6)"),
    clear("dsa C=0", lambda: D()(x(2, 0, 6, 6)), ValueError, "C = 0"),
    clear("dsa list input", lambda: D()([[1.0]]), TypeError, "torch.Tensor", "list"),
    correct("dsa B=0 runs", lambda: D()(x(0, 4, 6, 6)), lambda o: o[0].shape == (0, 4, 6, 6)),
    correct("dsa bf16 input under bf16 autocast keeps bf16",
            lambda: under_autocast(D(), x(2, 4, 6, 6, dtype=torch.bfloat16), torch.bfloat16),
            lambda o: o[0].dtype == torch.bfloat16),
    correct("dsa fp16 input under fp16 autocast keeps fp16 (plain)",
            lambda: under_autocast(D(backend="plain"), x(2, 4, 6, 6, dtype=torch.float16),
                                   torch.float16),
            lambda o: o[0].dtype == torch.float16),
    correct("dsa 1x1 map with the 7x7 dilated branch", lambda: D()(x(2, 4, 1, 1)),
            lambda o: o[0].shape == (2, 4, 1, 1) and torch.isfinite(o[0]).all()),
    correct("dsa channels_last input", lambda: _same_as_contiguous(D()),
            lambda ok: ok),
    correct("dsa NaN input propagates to y (no crash, as any layer)",
            lambda: D()(torch.full((1, 2, 3, 3), NAN)), lambda o: torch.isnan(o[0]).all()),
    correct("dsa meta block on meta input (shape only)",
            lambda: D(device="meta")(x(2, 4, 6, 6, device="meta")),
            lambda o: o[0].shape == (2, 4, 6, 6) and o[0].device.type == "meta"),
]

COORD_CASES = [
    # -- booleans -------------------------------------------------------------------------------
    clear("coord per_axis_alpha='no'", lambda: C(8, per_axis_alpha="no"), TypeError,
          "per_axis_alpha must be a bool, got 'no'"),
    clear("coord learnable_alpha='yes'", lambda: C(8, learnable_alpha="yes"), TypeError,
          "learnable_alpha", "'yes'"),
    clear("coord learnable_beta=1", lambda: C(8, beta=0.5, learnable_beta=1), TypeError,
          "learnable_beta", "1"),
    clear("coord spatial_gate='false'", lambda: C(8, spatial_gate="false"), TypeError,
          "spatial_gate", "'false'"),
    clear("coord bias=None", lambda: C(8, bias=None), TypeError, "bias", "None"),
    # -- sizes --------------------------------------------------------------------------------
    clear("coord channels=10**9", lambda: C(10**9), ValueError, "channels=1000000000",
          "65536", "MAX_CHANNELS"),
    clear("coord min_mid_channels=10**9", lambda: C(8, min_mid_channels=10**9), ValueError,
          "min_mid_channels=1000000000", "MAX_CHANNELS"),
    clear("coord rd_channels=10**9", lambda: C(8, rd_channels=10**9), ValueError,
          "rd_channels=1000000000", "MAX_CHANNELS"),
    clear("coord channels=65536, reduction=1", lambda: C(65536, reduction=1), ValueError,
          "parameters", "MAX_BLOCK_PARAMETERS"),
    clear("coord channels=20000, spatial_gate", lambda: C(20000, spatial_gate=True),
          ValueError, "spatial_gate=True", "MAX_BLOCK_PARAMETERS"),
    clear("coord axis_kernel=10**6+1", lambda: C(8, axis_kernel=10**6 + 1), ValueError,
          "axis_kernel=1000001", "MAX_KERNEL_SIZE"),
    clear("coord axis_dilation=10**6", lambda: C(8, axis_kernel=3, axis_dilation=10**6),
          ValueError, "axis_dilation=1000000", "MAX_KERNEL_EXTENT"),
    clear("coord axis span 600*(3-1)+1", lambda: C(8, axis_kernel=3, axis_dilation=600),
          ValueError, "axis_dilation * (axis_kernel - 1) + 1=1201", "MAX_KERNEL_EXTENT"),
    correct("coord reduction=10**9 is harmless (mid = min_mid_channels)",
            lambda: C(64, reduction=10**9), lambda b: b.mid_channels == 8),
    correct("coord channels=4096, spatial_gate (16.8M parameters) builds",
            lambda: C(4096, spatial_gate=True, device="meta"),
            lambda b: sum(p.numel() for p in b.parameters()) > 16_000_000),
    # -- other bad values -------------------------------------------------------------------------
    clear("coord channels=0", lambda: C(0), ValueError, "channels must be >= 1, got 0"),
    clear("coord channels=16.0", lambda: C(16.0), TypeError, "channels", "16.0"),
    clear("coord no channels", lambda: C(), TypeError, "needs channels"),
    clear("coord channels and in_channels", lambda: C(8, in_channels=8), TypeError,
          "both channels=8 and in_channels=8"),
    clear("coord rd_ratio=nan", lambda: C(8, rd_ratio=NAN), ValueError, "rd_ratio", "nan"),
    clear("coord rd_ratio=2", lambda: C(8, rd_ratio=2), ValueError, "rd_ratio", "(0, 1]"),
    clear("coord rd_divisor=0", lambda: C(8, rd_ratio=0.25, rd_divisor=0), ValueError,
          "rd_divisor must be >= 1, got 0"),
    clear("coord rd_ratio contradicts reduction", lambda: C(8, rd_ratio=0.25, reduction=8),
          ValueError, "rd_ratio=0.25 contradicts reduction=8"),
    clear("coord act='relu' with act_layer=nn.GELU", lambda: C(8, act="relu",
                                                               act_layer=nn.GELU),
          ValueError, "act_layer gives 'gelu' but act='relu'"),
    clear("coord act='swishy'", lambda: C(8, act="swishy"), ValueError, "act", "'swishy'"),
    clear("coord gate_layer='relu'", lambda: C(8, gate_layer="relu"), ValueError,
          "gate_layer", "'relu'"),
    clear("coord head_groups=3", lambda: C(16, head_groups=3), ValueError, "head_groups=3",
          "16", "mid=8"),
    clear("coord alpha=1.5", lambda: C(8, alpha=1.5), ValueError, "alpha", "1.5", "[0, 1]"),
    clear("coord bottleneck_layers=True", lambda: C(8, bottleneck_layers=True), ValueError,
          "bottleneck_layers", "True"),
    clear("coord se_factor (timm-only name)", lambda: C(8, se_factor=0.5), TypeError,
          "se_factor"),
    correct("coord act='gelu' (timm's set)", lambda: C(8, act="gelu"),
            lambda b: isinstance(b.act, nn.GELU)),
    # -- inputs -------------------------------------------------------------------------------
    clear("coord meta input into a CPU block", lambda: C(8)(x(2, 8, 5, 5, device="meta")),
          RuntimeError, "parameters on cpu", "input on meta"),
    clear("coord wrong channels", lambda: C(8)(x(2, 6, 5, 5)), ValueError, "(B, 8, H, W)",
          "(2, 6, 5, 5)"),
    clear("coord float64 input under fp16 autocast",
          lambda: under_autocast(C(8), x(2, 8, 5, 5).double(), torch.float16), TypeError,
          "torch.float64 input", "never casts float64"),
    clear("coord bf16 input outside autocast", lambda: C(8)(x(2, 8, 5, 5).bfloat16()),
          TypeError, "torch.bfloat16 input", "outside autocast"),
    correct("coord bf16 input under bf16 autocast keeps bf16 (torch backend)",
            lambda: under_autocast(C(8, backend="torch"), x(2, 8, 5, 5).bfloat16(),
                                   torch.bfloat16),
            lambda o: o.dtype == torch.bfloat16),
    correct("coord fp16 input under fp16 autocast keeps fp16 (torch backend)",
            lambda: under_autocast(C(8, backend="torch"), x(2, 8, 5, 5).half(), torch.float16),
            lambda o: o.dtype == torch.float16),
    correct("coord B=1, H=W=1 in training mode", lambda: C(8).train()(x(1, 8, 1, 1)),
            lambda o: o.shape == (1, 8, 1, 1) and torch.isfinite(o).all()),
    correct("coord B=0 runs", lambda: C(8)(x(0, 8, 5, 5)), lambda o: o.shape == (0, 8, 5, 5)),
    correct("coord float64 block on float64 input", lambda: C(8, dtype=torch.float64)(
        x(2, 8, 5, 5, dtype=torch.float64)), lambda o: o.dtype == torch.float64),
]

# -- surgery: the blocks as timm's attn_layer / se_layer, with what timm's configs pass ---------
DSA_LAYER = partial(D, return_mask=False)  # timm wants a tensor back


def _timm(name: str, layer: Callable, cls: type) -> list[nn.Module]:
    model = timm.create_model(name, pretrained=False, num_classes=3, attn_layer=layer)
    return [m for m in model.modules() if isinstance(m, cls)]


SURGERY_CASES = [
    clear("dsa rd_divisor without rd_ratio", lambda: D(rd_divisor=8), ValueError,
          "rd_divisor=8 needs rd_ratio"),
    clear("dsa rd_channels=0", lambda: D(rd_channels=0), ValueError,
          "rd_channels must be >= 1, got 0"),
    clear("dsa rd_ratio='0.25'", lambda: D(rd_ratio="0.25"), TypeError, "rd_ratio", "'0.25'"),
    clear("coord block_size=8 (BatNonLocalAttn's keyword)", lambda: C(8, block_size=8),
          TypeError, "block_size"),
    clear("dsa block_size=8 (BatNonLocalAttn's keyword)", lambda: D(8, block_size=8),
          TypeError, "block_size"),
    correct("dsa as nf_regnet_b0's attn_layer (rd_ratio=0.5)",
            lambda: _timm("nf_regnet_b0", DSA_LAYER, D), lambda blocks: len(blocks) == 16),
    correct("dsa as regnetz_b16's attn_layer (rd_ratio=0.25)",
            lambda: _timm("regnetz_b16", DSA_LAYER, D), lambda blocks: len(blocks) == 22),
    correct("coord as test_nfnet's attn_layer (rd_ratio=0.25, rd_divisor=8)",
            lambda: _timm("test_nfnet", C, C),
            lambda blocks: [(b.in_channels, b.mid_channels) for b in blocks][:2]
            == [(32, 8), (64, 16)]),
]

CASES = DSA_CASES + COORD_CASES + SURGERY_CASES + EXECUTION_CASES + DEGENERATE_CASES


def _warns(make: Callable[[], object]) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = make()
    assert [w.category for w in caught] == [FutureWarning]
    return out


def _same_layout(block: nn.Module, reference: nn.Module) -> bool:
    """The same state-dict keys and shapes: the same computation up to the weights."""
    shapes = {k: v.shape for k, v in block.state_dict().items()}
    return shapes == {k: v.shape for k, v in reference.state_dict().items()}


def _same_as_contiguous(block: nn.Module) -> bool:
    inp = x(2, 4, 6, 6)
    y_cl = y_of(block(inp.contiguous(memory_format=torch.channels_last)))
    return torch.allclose(y_cl, y_of(block(inp)), atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_adversarial_input(case: Case) -> None:
    assert_outcome(case, one_line=True)


def test_outcome_counts() -> None:
    """The counts the issue's adversarial table reports for the blocks."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert Counter(c.outcome for c in CASES) == {"clear": 75, "correct": 21 + 21 + 18}
    assert Counter(c.outcome for c in SURGERY_CASES) == {"clear": 5, "correct": 3}
    assert (len(EXECUTION_CASES), len(DEGENERATE_CASES)) == (21, 18)


@pytest.mark.parametrize("make", [lambda: D(8), lambda: C(8)], ids=["dsa", "coord"])
def test_input_checks_keep_one_graph_under_compile(make, dynamo_reset) -> None:
    """The device/dtype/channel checks are guards, not graph breaks: one graph under
    fullgraph=True, no recompile for a second input; compiled without fullgraph, a meta
    input still gets the block's own message."""
    from torch._dynamo.testing import CompileCounterWithBackend

    block = make()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    inp = x(2, 8, 6, 6)
    torch.testing.assert_close(y_of(compiled(inp)), y_of(block(inp)))
    compiled(inp + 1)
    assert counter.frame_count == 1
    loose = torch.compile(make(), backend="aot_eager")
    with pytest.raises(RuntimeError, match="parameters on cpu but got an input on meta"):
        loose(x(2, 8, 6, 6, device="meta"))
