"""CoordinateAttention(bounded=True): learnable alphas and betas as sigmoid of raw parameters,
kept in [0, 1] whatever the optimiser does; the same formula as the unbounded block."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_attn.blocks import CoordinateAttention

from ._util import BACKENDS

CASES = {
    "alpha": {"learnable_alpha": True, "alpha": 0.7},
    "per_axis": {"learnable_alpha": True, "per_axis_alpha": True, "alpha": 0.6},
    "beta": {"learnable_beta": True, "beta": 0.4, "alpha": 0.8},
    "per_axis_beta": {"learnable_alpha": True, "per_axis_alpha": True, "alpha": 0.3,
                      "learnable_beta": True, "beta": 0.5},
}


def _pair(kwargs: dict, backend: str) -> tuple[CoordinateAttention, CoordinateAttention]:
    """A bounded block and an unbounded one with the same weights and blend values."""
    torch.manual_seed(0)
    bounded = CoordinateAttention(8, reduction=2, bounded=True, backend=backend, **kwargs)
    torch.manual_seed(0)
    plain = CoordinateAttention(8, reduction=2, backend=backend, **kwargs)
    values = bounded.attention_parameters()
    with torch.no_grad():
        for name, param in plain.trainable_attention_parameters().items():
            param.copy_(values[name])
    return bounded, plain


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_same_outputs_as_the_unbounded_block_at_the_same_values(case, backend) -> None:
    bounded, plain = _pair(CASES[case], backend)
    x = torch.randn(3, 8, 6, 7)
    torch.testing.assert_close(bounded(x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_parameters_state_dict_and_diagnostics_view(case) -> None:
    kwargs = CASES[case]
    block = CoordinateAttention(8, reduction=2, bounded=True, **kwargs)
    trainable = block.trainable_attention_parameters()
    assert trainable and all(p.requires_grad for p in trainable.values())
    state = block.state_dict()
    for name, param in trainable.items():
        assert f"{name}_raw" in state and name not in state  # raw parameter replaces it
        assert param is getattr(block, f"{name}_raw")
        assert block.attention_parameters()[name].item() == pytest.approx(
            torch.sigmoid(param).item()
        )
    # Every blend starts at its value (inside (0, 1)).
    for name, value in block.attention_parameters().items():
        start = kwargs.get("beta" if name == "beta" else "alpha")
        assert value.item() == pytest.approx(start, abs=1e-6)
    assert "bounded=True" in repr(block)


def test_edge_values_start_just_inside() -> None:
    block = CoordinateAttention(8, learnable_alpha=True, per_axis_alpha=True, bounded=True)
    assert block.attention_parameters()["alpha_h"].item() == pytest.approx(0.99)  # alpha=1.0
    zero = CoordinateAttention(8, learnable_alpha=True, alpha=0.0, bounded=True)
    assert zero.attention_parameters()["alpha"].item() == pytest.approx(0.01)


def test_an_optimiser_pushing_alpha_out_of_the_unit_interval_cannot() -> None:
    """The drift of coord.yaml: a loss that wants the mask to amplify (a scale above 1 needs
    an alpha below 0). Unbounded, Adam takes the alphas out of [0, 1]; bounded, they stay."""
    values = {}
    for bounded in (False, True):
        torch.manual_seed(0)
        block = CoordinateAttention(8, reduction=2, learnable_alpha=True, per_axis_alpha=True,
                                    alpha=0.9, bounded=bounded)
        opt = torch.optim.Adam(block.trainable_attention_parameters().values(), lr=0.1)
        x = torch.rand(4, 8, 6, 6)
        for _ in range(30):
            loss = (block(x) - 3 * x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        values[bounded] = block.attention_parameters()
    assert any(not 0.0 <= v.item() <= 1.0 for v in values[False].values()), values[False]
    assert all(0.0 < v.item() < 1.0 for v in values[True].values()), values[True]


def test_copies_pickles_and_strict_reload() -> None:
    block = CoordinateAttention(8, reduction=2, bounded=True, **CASES["per_axis_beta"])
    x = torch.randn(2, 8, 5, 5)
    want = block(x)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        torch.testing.assert_close(clone(x), want)
    fresh = CoordinateAttention(8, reduction=2, bounded=True, **CASES["per_axis_beta"])
    fresh.load_state_dict(block.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), want)


@pytest.mark.slow  # compilation (aot_eager)
def test_compiles_without_graph_break(dynamo_reset) -> None:
    block = CoordinateAttention(8, reduction=2, bounded=True, **CASES["per_axis_beta"])
    x = torch.randn(2, 8, 5, 5)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bounded": True}, ValueError, "neither learnable_alpha nor learnable_beta is set"),
        ({"bounded": True, "beta": 0.5}, ValueError, "neither learnable_alpha"),
        ({"bounded": 1, "learnable_alpha": True}, TypeError, "bounded must be a bool, got 1"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        CoordinateAttention(8, **kwargs)
