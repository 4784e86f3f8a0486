"""Auxiliary router losses: each term against a hand computation, gradients to the router,
zero weight adds nothing, compiled blocks, and a planted router collapse that the balance
loss undoes."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_attn.blocks import (
    AUX_TERMS,
    AuxLossWeights,
    CoordinateAttention,
    DynamicSpatialAttention,
    RouterAuxMixin,
    attention_aux_loss,
    attention_aux_terms,
    find_router_blocks,
    router_aux_terms,
)
from lightning_attn.core import RecordingConfig
from lightning_attn.core.statistics import block_stats


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


LOGITS = [[0.0, math.log(3.0), 0.0], [2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]]


def _by_hand(rows: list[list[float]]) -> dict[str, float]:
    """The four terms written out with Python floats (no torch)."""
    b, k = len(rows), len(rows[0])
    p = [_softmax(r) for r in rows]
    usage = [sum(p[i][j] for i in range(b)) / b for j in range(k)]  # P_k
    importance = [sum(p[i][j] for i in range(b)) for j in range(k)]  # I_k
    mean_i = sum(importance) / k
    cv2 = sum((v - mean_i) ** 2 for v in importance) / k / mean_i**2
    top = [max(range(k), key=p[i].__getitem__) for i in range(b)]
    f = [top.count(j) / b for j in range(k)]
    balance = k * sum(f[j] * usage[j] for j in range(k))
    entropy = sum(-sum(q * math.log(q) for q in p[i]) for i in range(b)) / b
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / b
    return {"importance": cv2, "balance": balance, "entropy": 1 - entropy / math.log(k),
            "z_loss": z}


def test_each_term_matches_a_hand_computation() -> None:
    got = router_aux_terms(torch.tensor(LOGITS))
    want = _by_hand(LOGITS)
    assert list(got) == list(AUX_TERMS)
    for term in AUX_TERMS:
        assert got[term].shape == () and got[term].dtype == torch.float32
        assert got[term].item() == pytest.approx(want[term], rel=1e-5), term
    # A value worked out on paper: rows p = (1/4, 3/4) and (1/2, 1/2) give usage (3/8, 5/8),
    # CV^2 = (1/64) / (1/4) = 1/16; top branches 1 and 0 (tie -> first): balance = 1.
    two = router_aux_terms(torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]))
    assert two["importance"].item() == pytest.approx(1 / 16)
    assert two["balance"].item() == pytest.approx(1.0)


def test_terms_at_balance_and_at_collapse() -> None:
    k = 3
    uniform = router_aux_terms(torch.zeros(5, k))
    assert uniform["importance"].item() == pytest.approx(0.0, abs=1e-7)
    assert uniform["balance"].item() == pytest.approx(1.0)  # every sample's top is branch 0
    assert uniform["entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert uniform["z_loss"].item() == pytest.approx(math.log(k) ** 2)
    collapsed = router_aux_terms(torch.tensor([[30.0, 0.0, 0.0]] * 5))
    assert collapsed["importance"].item() == pytest.approx(k - 1, rel=1e-5)  # the worst case
    assert collapsed["balance"].item() == pytest.approx(k, rel=1e-5)
    assert collapsed["entropy"].item() == pytest.approx(1.0, abs=1e-6)
    # Finite where softmax underflows to exactly 0 (p log p from log_softmax).
    huge = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    terms = router_aux_terms(huge)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values()) and torch.isfinite(huge.grad).all()


def test_only_requested_terms_are_computed_and_edge_shapes() -> None:
    z = torch.randn(4, 3)
    assert list(router_aux_terms(z, ["z_loss", "balance"])) == ["z_loss", "balance"]
    assert router_aux_terms(z, ()) == {}
    empty = router_aux_terms(torch.zeros(0, 3))
    assert all(v.item() == 0.0 for v in empty.values())
    single = router_aux_terms(torch.randn(4, 1))  # one branch: nothing to balance
    assert single["importance"].item() == 0.0 and single["balance"].item() == 1.0
    assert single["entropy"].item() == 0.0
    half = router_aux_terms(torch.randn(4, 3, dtype=torch.bfloat16))
    assert all(v.dtype == torch.float32 for v in half.values())


@pytest.mark.parametrize("term", AUX_TERMS)
@pytest.mark.parametrize("backend", ["plain", "torch"])
def test_gradients_flow_to_the_router_and_only_there(term, backend) -> None:
    block = DynamicSpatialAttention(backend=backend)
    with torch.no_grad():  # an unbalanced start, so that every term has a gradient
        block.router[3].bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    block(torch.randn(6, 4, 10, 10))
    attention_aux_loss(block, **{term: 1.0}).backward()
    router = [p for n, p in block.named_parameters() if n.startswith("router.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router), term
    assert all(p.grad is None for p in block.branches.parameters())  # the router alone


def test_block_aux_terms_equal_the_terms_of_its_router_logits() -> None:
    block = DynamicSpatialAttention(return_router_weights=True)
    assert block.router_logits is None
    with pytest.raises(RuntimeError, match="has not run a forward yet"):
        block.aux_terms()
    _, _, rw = block(torch.randn(5, 4, 8, 8))
    logits = block.router_logits
    assert logits.shape == (5, 3) and logits.grad_fn is not None
    torch.testing.assert_close(torch.softmax(logits, dim=1), rw)  # the logits behind rw
    for term, value in block.aux_terms().items():
        torch.testing.assert_close(value, router_aux_terms(logits)[term])
    block.clear_router_logits()
    assert block.router_logits is None


def test_helper_averages_over_blocks_and_weights_each_term() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        DynamicSpatialAttention(return_mask=False),
        CoordinateAttention(4, min_mid_channels=2),  # no router: not counted
        DynamicSpatialAttention(kernels=(3,), return_mask=False),  # K = 2
    )
    net(torch.randn(3, 1, 8, 8))
    blocks = find_router_blocks(net)
    assert list(blocks) == ["1", "3"]
    per_block = [b.aux_terms() for b in blocks.values()]
    terms = attention_aux_terms(net)
    for term in AUX_TERMS:
        torch.testing.assert_close(terms[term], (per_block[0][term] + per_block[1][term]) / 2)
    loss = attention_aux_loss(net, balance=0.01, z_loss=1e-3)
    torch.testing.assert_close(loss, 0.01 * terms["balance"] + 1e-3 * terms["z_loss"])


def test_a_block_that_has_not_run_is_left_out() -> None:
    first, second = DynamicSpatialAttention(), DynamicSpatialAttention()
    net = nn.ModuleDict({"first": first, "second": second})
    with pytest.raises(RuntimeError, match="no router block of ModuleDict has run"):
        attention_aux_loss(net, balance=1.0)
    first(torch.randn(2, 3, 6, 6))
    torch.testing.assert_close(attention_aux_loss(net, balance=1.0), first.aux_terms()["balance"])


def test_zero_weights_add_no_graph_nodes() -> None:
    """Keeping the logits costs no operation; zero-weight terms are never computed."""

    class NoKeep(DynamicSpatialAttention):
        def keep_router_logits(self, logits: torch.Tensor) -> None:
            pass

    x = torch.randn(2, 4, 8, 8)
    counts = []
    for cls in (DynamicSpatialAttention, NoKeep):
        torch.manual_seed(0)
        block = cls(backend="plain")
        with OpCounter() as mode:
            y, _ = block(x)
            y.sum().backward()
        counts.append(mode.ops)
    assert counts[0] == counts[1]  # the forward and backward graphs are unchanged

    block = DynamicSpatialAttention()
    block(x)
    with OpCounter() as mode:
        zero = attention_aux_loss(block)  # every weight 0
    assert zero.item() == 0.0 and zero.grad_fn is None
    assert sum(mode.ops.values()) == 1  # one constant: nothing reads the router logits
    with OpCounter() as mode:
        attention_aux_loss(block, z_loss=1.0)
    assert "logsumexp" in mode.ops and "_log_softmax" not in mode.ops  # no softmax for z
    with OpCounter() as mode:
        attention_aux_loss(block, balance=1.0)
    assert "logsumexp" not in mode.ops and "argmax" in mode.ops


@pytest.mark.slow  # ~2-5 s of compilation (aot_eager)
def test_compiled_block_keeps_its_logits_with_the_same_gradients(dynamo_reset) -> None:
    torch.manual_seed(0)
    eager = DynamicSpatialAttention(return_mask=False)
    compiled_block = copy.deepcopy(eager)
    compiled = torch.compile(compiled_block, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 4, 8, 8)
    grads = []
    for fn, block in ((eager, eager), (compiled, compiled_block)):
        for step in range(2):  # a second call reuses the graph and replaces the logits
            y = fn(x * (1 + step))
            loss = y.mean() + attention_aux_loss(block, balance=0.5, z_loss=0.1, entropy=0.2,
                                                 importance=0.3)
        block.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in block.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_copies_and_pickles_drop_the_kept_logits() -> None:
    block = DynamicSpatialAttention()
    block(torch.randn(2, 3, 6, 6))  # logits with a graph: a deep copy of them would fail
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert clone.router_logits is None
        assert set(clone.state_dict()) == set(block.state_dict())
    assert block.router_logits is not None  # the original keeps them


def test_user_block_joins_with_the_mixin() -> None:
    class MyRouted(RouterAuxMixin, nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, 4)
            logits = self.router(x)
            self.keep_router_logits(logits)
            w = torch.softmax(logits, dim=1)
            return x * w[:, :1] + x.flip(1) * w[:, 1:]

    block = MyRouted()
    block(torch.randn(3, 4))
    attention_aux_loss(block, importance=1.0).backward()
    assert block.router.weight.grad is not None


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: attention_aux_loss(m, balance=-0.1), ValueError,
         "balance must be a finite number >= 0, got -0.1"),
        (lambda m: attention_aux_loss(m, z_loss=float("nan")), ValueError, "z_loss must be"),
        (lambda m: attention_aux_loss(m, entropy=True), TypeError, "entropy must be a number"),
        (lambda m: attention_aux_terms(m, ["balance", "gini"]), ValueError,
         r"unknown auxiliary terms \['gini'\]"),
        (lambda m: attention_aux_loss(nn.Linear(2, 2), balance=0.1), ValueError,
         "holds no attention block with a router"),
        (lambda m: attention_aux_loss("net", balance=0.1), TypeError, "must be an nn.Module"),
        (lambda m: router_aux_terms(torch.zeros(3)), ValueError, r"\(B, K\) tensor"),
    ],
)
def test_bad_input_names_the_problem(call, error, match) -> None:
    block = DynamicSpatialAttention()
    block(torch.randn(2, 3, 6, 6))
    with pytest.raises(error, match=match):
        call(block)


def test_weights_dataclass() -> None:
    weights = AuxLossWeights(balance=0.01, z_loss=1e-3)
    assert weights.nonzero() == {"balance": 0.01, "z_loss": 1e-3}
    assert AuxLossWeights.coerce({"balance": 0.01}) == AuxLossWeights(balance=0.01)
    assert AuxLossWeights.coerce(None) == AuxLossWeights()
    with pytest.raises(TypeError, match=r"unknown keys \['gini'\]"):
        AuxLossWeights.coerce({"gini": 1.0})
    with pytest.raises(TypeError, match="must be an AuxLossWeights or a dict"):
        AuxLossWeights.coerce(0.01)
    with pytest.raises(ValueError, match="importance must be a finite number >= 0, got -1"):
        AuxLossWeights(importance=-1)


# --------------------------------------------------------------------------------------
# A planted collapse: the router sends (nearly) every sample to branch 0
# --------------------------------------------------------------------------------------


def _entropy_norm(block: DynamicSpatialAttention, x: torch.Tensor) -> float:
    """The diagnostics' normalised router entropy, from the block's own recording."""
    block.configure_recording(RecordingConfig(histogram_bins=0), "cpu")
    block.start_recording("test")
    with torch.no_grad():
        block(x)
    values = block.recorded_statistics().tolist()
    block.stop_recording("test")
    block.clear_recording()
    return block_stats(block.statistics_layout, values).router.entropy_norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balance_loss_lifts_a_planted_router_collapse(seed) -> None:
    threshold = 0.1  # HealthThresholds.router_collapse_threshold
    entropies = {}
    for weight in (0.0, 0.01):
        torch.manual_seed(seed)
        block = DynamicSpatialAttention(backend="plain")
        with torch.no_grad():  # router logits favour branch 0 by 10 for every input
            block.router[3].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
        g = torch.Generator().manual_seed(seed + 10)
        x = torch.randn(32, 4, 8, 8, generator=g)
        # The task rewards the collapse: its target is what branch 0 alone produces.
        teacher = copy.deepcopy(block)
        with torch.no_grad():
            teacher.router[3].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
            target = teacher(x)[0]
        assert _entropy_norm(block, x) < threshold  # collapsed at the start
        opt = torch.optim.Adam(block.parameters(), lr=0.03)
        for _ in range(40):
            y, _ = block(x)
            loss = F.mse_loss(y, target) + attention_aux_loss(block, balance=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        entropies[weight] = _entropy_norm(block, x)
    assert entropies[0.0] < threshold < entropies[0.01], entropies
