"""Rows of the blocks' adversarial table about recording: execution patterns (recomputation,
copies, repeated and shared modules) and degenerate numbers (one value, values outside the
contract). Each row runs real modules — this package's blocks and timm's attention through
its adapters — and compares what was recorded with what the forwards computed."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Callable

import torch
import torch.utils.checkpoint as checkpointing
from torch import nn

from lightning_attn.blocks import (
    CoordinateAttention,
    DynamicSpatialAttention,
    RecordingMixin,
    attention_adapter,
    quick_mask_check,
)
from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.core import MaskCollapseWarning
from lightning_attn.core.statistics import (
    BlockStats,
    RecordingConfig,
    block_stats,
    contract_breaches,
)
from lightning_attn.modules import OutputOnly

from ..adversarial import correct

CONFIG = RecordingConfig(histogram_bins=10)


# -- recording helpers -------------------------------------------------------------------------
def recorded(blocks: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, BlockStats]:
    """Each of ``blocks``' statistics over what ``run`` does with recording on; the blocks
    are left without recording state (adapters' hooks removed)."""
    try:
        for block in blocks.values():
            block.configure_recording(CONFIG, "cpu")
            block.start_recording()
        run()
        return {name: block_stats(b.statistics_layout, b.recorded_statistics().tolist())
                for name, b in blocks.items()}
    finally:
        for block in blocks.values():
            block.clear_recording()


def of_model(model: nn.Module, run: Callable[[], object], adapters=()) -> dict[str, BlockStats]:
    """``recorded`` for every block of ``model`` (timm's through the built-in adapters)."""
    blocks, _ = find_attention_blocks(model, third_party=True, adapters=adapters)
    assert blocks, "the row's model has no block"
    return recorded(blocks, run)


def same(got: dict[str, BlockStats], want: dict[str, BlockStats]) -> bool:
    """The same statistics block by block: forwards, counts, moments, extremes, histograms."""
    assert got.keys() == want.keys()
    for name, g in got.items():
        w = want[name]
        assert g.forwards == w.forwards, (name, g.forwards, w.forwards)
        assert g.masks.keys() == w.masks.keys()
        for mask, gm in g.masks.items():
            wm = w.masks[mask]
            assert gm.count == wm.count, (name, mask, gm.count, wm.count)
            for field in ("mean", "std", "min", "max", "sat_low", "sat_high"):
                a, b = getattr(gm, field), getattr(wm, field)
                assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (name, mask, field, a, b)
        assert g.histograms == w.histograms, name
        assert (g.router is None) == (w.router is None)
        if g.router is not None:
            assert g.router.count == w.router.count
            assert math.isclose(g.router.entropy, w.router.entropy, rel_tol=1e-6)
    return True


def stats_of(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().double().flatten()
    return {"count": v.numel(), "mean": v.mean().item(), "std": v.std().item()}


def matches(got, values: torch.Tensor) -> bool:
    want = stats_of(values)
    assert got.count == want["count"], (got.count, want["count"])
    assert math.isclose(got.mean, want["mean"], rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(got.std, want["std"], rel_tol=1e-5, abs_tol=1e-9)
    return True


# -- models ------------------------------------------------------------------------------------
def ours() -> nn.Sequential:
    """DSA then CoordinateAttention (two masks), 4 channels."""
    torch.manual_seed(0)
    return nn.Sequential(OutputOnly(DynamicSpatialAttention(4, kernels=(3,))),
                         CoordinateAttention(4, min_mid_channels=4))


def timm_module(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "se":
        from timm.layers.squeeze_excite import SEModule
        return SEModule(8, rd_ratio=0.5)
    if kind == "cbam":
        from timm.layers.cbam import CbamModule
        return CbamModule(8, rd_ratio=0.5)
    from timm.layers.coord_attn import CoordAttn
    return CoordAttn(8, rd_ratio=0.5).eval()


def inputs(channels: int = 4, batch: int = 3, size: int = 6) -> torch.Tensor:
    return torch.randn(batch, channels, size, size,
                       generator=torch.Generator().manual_seed(1)).requires_grad_()


# -- execution patterns ------------------------------------------------------------------------
def checkpointed(make: Callable[[], nn.Module], channels: int, **kwargs) -> bool:
    """Two steps (forward and backward) under torch.utils.checkpoint record what they record
    without: the recomputation adds nothing, and leaves nothing for the next step."""
    model, x = nn.Sequential(make()), inputs(channels)  # the root itself is never a block

    def steps(forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for scale in (1.0, 3.0):
            forward(scale * x).sum().backward()

    plain = of_model(model, lambda: steps(model))
    again = of_model(model, lambda: steps(lambda v: checkpointing.checkpoint(model, v,
                                                                             **kwargs)))
    return same(again, plain)


def checkpointed_sequential(reentrant: bool) -> bool:
    model, x = ours(), inputs()
    plain = of_model(model, lambda: model(x).sum().backward())
    again = of_model(model, lambda: checkpointing.checkpoint_sequential(
        model, 2, x, use_reentrant=reentrant).sum().backward())
    return same(again, plain)


def without_early_stop() -> bool:
    with checkpointing.set_checkpoint_early_stop(False):
        return checkpointed(ours, 4, use_reentrant=False)


def timm_grad_checkpointing() -> bool:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    plain = of_model(model, lambda: model(x).sum().backward())
    model.set_grad_checkpointing(True)
    again = of_model(model, lambda: model(x).sum().backward())
    return same(again, plain)


def outputs_of(submodule: nn.Module, run: Callable[[], object]) -> list[torch.Tensor]:
    """What ``submodule`` returned at each call during ``run`` (a plain hook, not ours)."""
    seen: list[torch.Tensor] = []
    handle = submodule.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        run()
    handle.remove()
    return seen


def called(times: int, module: nn.Module, mask_module: nn.Module, channels: int) -> bool:
    """A module called ``times`` times in one forward records ``times`` forwards: the
    statistics of all its calls' masks together."""
    xs = [inputs(channels, batch=2) * (i + 1) for i in range(times)]
    caught = outputs_of(mask_module, lambda: [module(x) for x in xs])
    (s,) = of_model(nn.Sequential(module), lambda: [module(x) for x in xs]).values()
    return s.forwards == times and matches(s.masks["mask"], torch.cat([c.flatten()
                                                                        for c in caught]))


def dsa_called(times: int) -> bool:
    torch.manual_seed(0)
    dsa = DynamicSpatialAttention(4, kernels=(3,))
    xs = [inputs(4, batch=2) * (i + 1) for i in range(times)]
    with torch.no_grad():
        masks = [dsa(x)[1] for x in xs]  # DSA returns (y, mask)
    (s,) = of_model(nn.Sequential(dsa), lambda: [dsa(x) for x in xs]).values()
    return s.forwards == times and matches(s.masks["mask"], torch.cat([m.flatten()
                                                                        for m in masks]))


def coord_attn_called_twice() -> bool:
    """timm's CoordAttn gates H then W with one ``gate``: two calls of the module keep each
    call's maps apart (mask_h from the first gate call of each forward, mask_w the second)."""
    module, xs = timm_module("coord"), [inputs(8, batch=2), 3 * inputs(8, batch=2)]
    seen = outputs_of(module.gate, lambda: [module(x) for x in xs])
    (s,) = of_model(nn.Sequential(module), lambda: [module(x) for x in xs]).values()
    return (s.forwards == 2
            and matches(s.masks["mask_h"], torch.cat([seen[0].flatten(), seen[2].flatten()]))
            and matches(s.masks["mask_w"], torch.cat([seen[1].flatten(), seen[3].flatten()])))


class Gate(nn.Module):
    """A user's gate whose ``act`` gives the mask; ``act`` may be shared."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.conv(x))


class Shared(nn.Module):
    """Two gates given one ``nn.Sigmoid``, which a plain branch also uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        act = nn.Sigmoid()
        self.first, self.second = Gate(4, act), Gate(4, act)
        self.squash = act  # the same module, outside any gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) + self.squash(x)


GATE = attention_adapter(Gate, masks={"mask": "act"})


def shared_submodule() -> bool:
    model, x = Shared(), inputs(batch=2)
    stats = of_model(model, lambda: model(x), adapters=[GATE])
    with torch.no_grad():
        first = torch.sigmoid(model.first.conv(x))
        second = torch.sigmoid(model.second.conv(model.first(x)))
    return (stats["first"].forwards == stats["second"].forwards == 1
            and matches(stats["first"].masks["mask"], first)
            and matches(stats["second"].masks["mask"], second))


def copy_while_recording(how: str) -> bool:
    """A copy of an adapted model made while it records (an EMA, an averaged model, a
    snapshot, a pickle of the model): the original records only its own forwards, the copies
    nothing, and they keep no hook once they ran."""
    from timm.utils import ModelEmaV3
    from torch.optim.swa_utils import AveragedModel

    model, x = nn.Sequential(timm_module("cbam"), timm_module("se")), inputs(8, batch=2)
    blocks, _ = find_attention_blocks(model, third_party=True)
    want = recorded(blocks, lambda: model(x))
    blocks, _ = find_attention_blocks(model, third_party=True)

    def run() -> None:
        made = {"deepcopy": lambda: copy.deepcopy(model), "ModelEmaV3": lambda: ModelEmaV3(
            model).module, "AveragedModel": lambda: AveragedModel(model).module}[how]()
        with torch.no_grad():
            for p in made.parameters():
                p.add_(0.5)  # the copy computes other masks
        made(x)
        model(x)
        made(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # the hooked original pickles: its hooks load inert
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        loaded(x)
        run.copies = (made, loaded)

    got = recorded(blocks, run)
    return same(got, want) and not any(m._forward_hooks or m._forward_pre_hooks
                                       for made in run.copies for m in made.modules())


def block_copy_while_recording() -> bool:
    model, x = ours(), inputs()
    blocks, _ = find_attention_blocks(model)
    want = recorded(blocks, lambda: model(x))
    twin = []
    got = recorded(blocks, lambda: (model(x), twin.append(copy.deepcopy(model)), twin[0](x)))
    return same(got, want) and not twin[0][1].recording


def forward_that_raises() -> bool:
    """A forward that raises inside an adapted module after one of its parts ran (an
    out-of-memory error, caught and retried) leaves nothing behind: the retry records its
    own masks only."""
    module, x = timm_module("coord"), inputs(8, batch=2)
    want = of_model(nn.Sequential(module), lambda: module(x))

    def fail(*args: object) -> None:
        raise RuntimeError("out of memory (planned)")

    def run() -> None:
        handle = module.gate.register_forward_hook(fail)  # runs after ours took mask_h
        with contextlib.suppress(RuntimeError):
            module(3 * x)
        handle.remove()
        module(x)

    return same(of_model(nn.Sequential(module), run), want)


EXECUTION_CASES = [
    correct("dsa + coord under checkpoint (reentrant)",
            lambda: checkpointed(ours, 4, use_reentrant=True), bool),
    correct("dsa + coord under checkpoint (non-reentrant)",
            lambda: checkpointed(ours, 4, use_reentrant=False), bool),
    correct("dsa + coord under checkpoint (non-reentrant, no early stop)", without_early_stop,
            bool),
    correct("checkpoint_sequential over dsa, coord (reentrant)",
            lambda: checkpointed_sequential(True), bool),
    correct("checkpoint_sequential over dsa, coord (non-reentrant)",
            lambda: checkpointed_sequential(False), bool),
    *(correct(f"timm {name} under checkpoint ({mode})",
              lambda kind=kind, reentrant=reentrant: checkpointed(
                  lambda: timm_module(kind), 8, use_reentrant=reentrant), bool)
      for kind, name in (("se", "SEModule"), ("cbam", "CbamModule"),
                         ("coord", "CoordAttn (one gate, two maps)"))
      for reentrant, mode in ((True, "reentrant"), (False, "non-reentrant"))),
    correct("timm resnet18 cbam with set_grad_checkpointing(True)", timm_grad_checkpointing,
            bool),
    correct("dsa called 3 times in one forward", lambda: dsa_called(3), bool),
    correct("timm SEModule called twice in one forward",
            lambda: (lambda se: called(2, se, se.gate, 8))(timm_module("se")), bool),
    correct("timm CoordAttn (one gate, two maps) called twice", coord_attn_called_twice, bool),
    correct("two gates sharing one nn.Sigmoid, also used outside them", shared_submodule,
            bool),
    correct("copy.deepcopy of an adapted model while it records",
            lambda: copy_while_recording("deepcopy"), bool),
    correct("timm ModelEmaV3 of an adapted model while it records",
            lambda: copy_while_recording("ModelEmaV3"), bool),
    correct("torch AveragedModel of an adapted model while it records",
            lambda: copy_while_recording("AveragedModel"), bool),
    correct("copy.deepcopy of dsa + coord while they record", block_copy_while_recording,
            bool),
    correct("a forward raising between an adapted module's parts", forward_that_raises, bool),
]


# -- degenerate numbers ------------------------------------------------------------------------
class Recorder(RecordingMixin, nn.Module):
    """Records what it is given: ``forward(masks, router_weights)``."""

    mask_names = ("mask",)

    def __init__(self, num_branches: int | None = None) -> None:
        super().__init__()
        self.num_branches = num_branches

    def forward(self, mask=None, router_weights=None):
        self.record({} if mask is None else {"mask": mask}, router_weights)


def record(mask=None, router_weights=None, k=None) -> BlockStats:
    block = Recorder(k)
    (stats,) = recorded({"b": block}, lambda: block(mask, router_weights)).values()
    return stats


def undefined_std(mask: torch.Tensor) -> bool:
    stats = record(mask).masks["mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskCollapseWarning)
        checked = quick_mask_check(DynamicSpatialAttention(4, kernels=(3,)),
                                   torch.zeros(1, 4, 1, 1))
    return (stats.count == mask.numel() and math.isnan(stats.std) and not stats.std_defined
            and stats.nonfinite == 0 and math.isnan(checked["mask"].std))


def breach(mask=None, router_weights=None, k=None, *words: str) -> bool:
    seen = " ".join(contract_breaches(record(mask, router_weights, k)))
    assert all(w in seen for w in words), (seen, words)
    return bool(seen) == bool(words)


G = torch.Generator().manual_seed(3)
LOGITS = torch.randn(6, 3, generator=G) * 4

DEGENERATE_CASES = [
    correct("one mask value (batch 1, 1x1 map): std undefined, no collapse",
            lambda: undefined_std(torch.full((1, 1, 1, 1), 0.5)), bool),
    correct("one-channel gate of batch 1: std undefined",
            lambda: undefined_std(torch.full((1, 1, 1, 1), 0.97)), bool),
    correct("two mask values: std defined",
            lambda: record(torch.tensor([0.2, 0.4])).masks["mask"],
            lambda m: m.std_defined and math.isclose(m.std, math.sqrt(0.02), rel_tol=1e-6)),
    correct("a constant mask of many values: std 0, defined",
            lambda: record(torch.full((4, 1, 3, 3), 0.5)).masks["mask"],
            lambda m: m.std_defined and m.std < 1e-9),
    correct("mask 2*sigmoid (values up to 2): breach named",
            lambda: breach(2 * torch.sigmoid(LOGITS), None, None, "mask 'mask'",
                           "outside [0, 1]"), bool),
    correct("mask tanh (negative values): breach named",
            lambda: breach(torch.tanh(LOGITS), None, None, "mask 'mask'", "-"), bool),
    correct("histograms leave out values outside [0, 1]",
            lambda: record(torch.tensor([-0.5, 0.25, 0.75, 1.5])),
            lambda s: sum(s.histograms["mask"]) == 2 and s.masks["mask"].count == 4),
    correct("hard 0/1 mask: no breach",
            lambda: breach((LOGITS > 0).float()), bool),
    correct("fp16 mask reaching exactly 1.0: no breach",
            lambda: breach(torch.sigmoid(20 * LOGITS).half()), bool),
    correct("NaN mask: nonfinite, not a breach",
            lambda: record(torch.tensor([0.5, math.nan, 2.0])),
            lambda s: s.masks["mask"].nonfinite == 1 and contract_breaches(s) == []),
    correct("Inf mask: nonfinite, not a breach",
            lambda: record(torch.tensor([0.5, math.inf])),
            lambda s: s.masks["mask"].nonfinite == 1 and contract_breaches(s) == []),
    correct("router logits in place of weights: breach named",
            lambda: breach(None, LOGITS, 3, "router weight", "not 1"), bool),
    correct("router per-branch sigmoid (rows not summing to 1): breach named",
            lambda: breach(None, torch.sigmoid(LOGITS), 3, "rows summing to"), bool),
    correct("router weights with a negative entry, rows summing to 1: breach named",
            lambda: breach(None, torch.tensor([[1.5, -0.5, 0.0], [0.2, 0.3, 0.5]]), 3,
                           "below 0"), bool),
    correct("router softmax in bf16: on the simplex within tolerance",
            lambda: breach(None, torch.softmax(LOGITS, 1).bfloat16(), 3), bool),
    correct("router one-hot (argmax routing): no breach, entropy 0",
            lambda: record(None, nn.functional.one_hot(LOGITS.argmax(1), 3).float(), 3),
            lambda s: contract_breaches(s) == [] and s.router.entropy == 0.0),
    correct("router of one branch: no breach",
            lambda: breach(None, torch.ones(4, 1), 1), bool),
    correct("router of batch 1: entropy defined",
            lambda: record(None, torch.softmax(LOGITS[:1], 1), 3).router,
            lambda r: r.count == 1 and math.isfinite(r.entropy_norm)),
]
