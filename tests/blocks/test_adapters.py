"""The attention already in users' models records through adapters: real timm and
torchvision models (random init, nothing downloads), statistics against an offline
computation from forward hooks, eager and compiled; outputs and state dicts untouched."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch._dynamo.testing
from torch import nn

from lightning_attn.blocks import RecordingMixin, register_attention_adapter
from lightning_attn.blocks.adapters import AdapterRecorder, adapters_in_force
from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.core.statistics import RecordingConfig, block_stats

timm = pytest.importorskip("timm")  # installed by the project's set-up (scripts/bootstrap.sh)
torchvision = pytest.importorskip("torchvision")

CONFIG = RecordingConfig(histogram_bins=0)


def _ge_resnet18():
    # timm 1.0.31's create_attn("ge") passes the device dict by position into ConvMlp and
    # fails to build; the same module without its MLP builds.
    from timm.layers.gather_excite import GatherExcite

    return timm.create_model(
        "resnet18", block_args=dict(attn_layer=functools.partial(GatherExcite, use_mlp=False)))


def _ghost_v3():
    # ghostnetv3's own build takes a minute on two cores: its DFC module alone (the
    # "shortcut" mode, the one with the gate), behind a stem.
    from timm.models.ghostnet import GhostModuleV3

    return nn.Sequential(GhostModuleV3(3, 8, mode="shortcut"), GhostModuleV3(8, 8))


def _bat_resnet18():
    # BAT's blocks of 7 need maps divisible by 7: blocks of 2 fit a 64 x 64 input's maps.
    from timm.layers.non_local_attn import BatNonLocalAttn

    return timm.create_model(
        "resnet18", block_args=dict(attn_layer=functools.partial(BatNonLocalAttn, block_size=2)))


#: name -> (build, attention class, number of such modules, masks, has a router); other
#: attention in the same model (GhostNet's squeeze-excite) is checked as well
MODELS = {
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), "SqueezeExcite", 16,
                        ["mask"], False),
    "mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100"),
                              "SqueezeExcite", 9, ["mask"], False),
    "resnet18 se": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="se")),
                    "SEModule", 8, ["mask"], False),
    "resnet18 eca": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="eca")),
                     "EcaModule", 8, ["mask"], False),
    "resnet18 cbam": (lambda: timm.create_model("resnet18",
                                                block_args=dict(attn_layer="cbam")),
                      "CbamModule", 8, ["channel", "spatial"], False),
    "resnet18 ge": (_ge_resnet18, "GatherExcite", 8, ["mask"], False),
    "resnet18 coord": (lambda: timm.create_model("resnet18",
                                                 block_args=dict(attn_layer="coord")),
                       "CoordAttn", 8, ["mask_h", "mask_w"], False),
    "skresnet18": (lambda: timm.create_model("skresnet18"), "SelectiveKernel", 8, [], True),
    "resnest14d": (lambda: timm.create_model("resnest14d"), "SplitAttn", 4, [], True),
    "resnet18 scoord": (lambda: timm.create_model("resnet18",
                                                  block_args=dict(attn_layer="scoord")),
                        "SimpleCoordAttn", 8, ["mask"], False),
    "resnet18 ela": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="ela")),
                     "EfficientLocalAttn", 8, ["mask_h", "mask_w"], False),
    "resnet18 strip": (lambda: timm.create_model("resnet18",
                                                 block_args=dict(attn_layer="strip")),
                       "StripAttn", 8, ["mask"], False),
    "resnet18 bat": (_bat_resnet18, "BatNonLocalAttn", 8, ["mask_h", "mask_w"], False),
    "legacy_seresnet18": (lambda: timm.create_model("legacy_seresnet18"), "SEModule", 8,
                          ["mask"], False),
    "hgnet_tiny": (lambda: timm.create_model("hgnet_tiny"), "EseModule", 5, ["mask"], False),
    "ghostnetv2_100": (lambda: timm.create_model("ghostnetv2_100"), "GhostModuleV2", 14,
                       ["mask"], False),
    "GhostModuleV3 shortcut": (_ghost_v3, "GhostModuleV3", 1, ["mask"], False),
    "torchvision efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(),
                                    "SqueezeExcitation", 16, ["mask"], False),
    "torchvision regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(),
                                   "SqueezeExcitation", 16, ["mask"], False),
}


def _offline(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Each attention module's masks / router weights, caught by plain forward hooks on the
    submodules the adapters name, independent of the adapters' code."""
    caught: dict[str, dict[str, list[torch.Tensor]]] = {}
    handles = []
    for name, module in model.named_modules():
        adapter = next((a for a in adapters_in_force() if a.matches(module)), None)
        if adapter is None:
            continue
        paths = {p: [] for p in adapter.masks.values()}
        if adapter.router:
            paths[adapter.router] = []
        for path in paths:
            def hook(sub, inputs, out, _path=path, _name=name, _adapter=adapter):
                convert = _adapter.convert.get(_path)
                value = convert(sub, inputs, out) if convert else out
                caught.setdefault(_name, {}).setdefault(_path, []).append(value.detach())
            handles.append(module.get_submodule(path).register_forward_hook(hook))
    model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, by_path in caught.items():
        module = model.get_submodule(name)
        adapter = next(a for a in adapters_in_force() if a.matches(module))
        values: dict[str, torch.Tensor] = {}
        order: dict[str, int] = {}
        for mask, path in adapter.masks.items():
            values[mask] = by_path[path][order.get(path, 0)]
            order[path] = order.get(path, 0) + 1
        if adapter.router:
            values["<router>"] = by_path[adapter.router][0]
        out[name] = values
    return out


def _check(stats, offline):
    for mask, m in stats.masks.items():
        v = offline[mask].double().flatten()
        assert m.count == v.numel()
        assert m.mean == pytest.approx(v.mean().item(), rel=1e-5, abs=1e-7)
        assert m.std == pytest.approx(v.std().item(), rel=1e-4, abs=1e-6)
        assert (m.min, m.max) == (pytest.approx(v.min().item()), pytest.approx(v.max().item()))
    if "<router>" in offline:
        w = offline["<router>"].double()
        entropy = -(w * w.clamp_min(1e-300).log()).sum(1).mean().item()
        assert stats.router.count == w.shape[0]
        assert stats.router.entropy == pytest.approx(entropy, rel=1e-5, abs=1e-7)
        assert stats.router.entropy_norm == pytest.approx(entropy / math.log(w.shape[1]),
                                                          rel=1e-5, abs=1e-7)
        assert stats.router.usage == pytest.approx(tuple(w.mean(0).tolist()), rel=1e-5)


def _record(blocks, model, x):
    for b in blocks.values():
        b.configure_recording(CONFIG, "cpu")
        b.start_recording()
    y = model(x)
    stats = {n: block_stats(b.statistics_layout, b.recorded_statistics().tolist())
             for n, b in blocks.items()}
    for b in blocks.values():
        b.stop_recording()
    return y, stats


@pytest.mark.parametrize("name", list(MODELS))
def test_every_attention_module_is_found_and_measured_exactly(name):
    build, cls, count, masks, routed = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        blocks, _ = find_attention_blocks(model, third_party=True)
        try:
            assert sum(type(b.module).__name__ == cls for b in blocks.values()) == count
            y, stats = _record(blocks, model, x)
            offline = _offline(model, x)
        finally:
            for b in blocks.values():
                b.clear_recording()
    assert torch.equal(y, reference)  # outputs untouched
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for block, s in stats.items():
        if type(blocks[block].module).__name__ == cls:
            assert s.forwards == 1 and sorted(s.masks) == sorted(masks)
            assert (s.router is not None) == routed
        _check(s, offline[block])
    # the hooks are gone once the diagnostics stop
    assert not any(m._forward_hooks for m in model.modules())


def test_nothing_is_found_without_third_party_and_nothing_is_attached():
    model = timm.create_model("resnet18", block_args=dict(attn_layer="se"))
    assert find_attention_blocks(model)[0] == {}
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18 cbam", "skresnet18"])
def test_compiled_records_the_same_with_one_extra_graph(name):
    build, *_ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32)
    blocks, _ = find_attention_blocks(model, third_party=True)
    try:
        for b in blocks.values():
            b.configure_recording(CONFIG, "cpu")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        got = []
        with torch.no_grad():
            for step in range(4):  # a logging step every other step
                on = step % 2 == 1
                for b in blocks.values():
                    (b.start_recording if on else b.stop_recording)()
                compiled(x)
                if on:
                    got.append({n: block_stats(b.statistics_layout,
                                               b.recorded_statistics().tolist())
                                for n, b in blocks.items()})
            offline = _offline(model, x)
        assert counter.frame_count == 2  # without and with recording: no recompile after
        assert torch._dynamo.utils.counters["graph_break"] == {}
        for stats in got:
            for block, s in stats.items():
                _check(s, offline[block])
    finally:
        for b in blocks.values():
            b.clear_recording()


class Gate(nn.Module):
    """A user's gate: its ``sigmoid`` submodule gives the mask."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.conv(x))


def test_a_users_gate_joins_with_one_line():
    with register_attention_adapter(Gate, masks={"mask": "sigmoid"}):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), Gate(4))
        (name, recorder), = find_attention_blocks(model, third_party=True)[0].items()
        assert name == "1" and isinstance(recorder, AdapterRecorder)
        assert not isinstance(recorder, nn.Module) and isinstance(recorder, RecordingMixin)
        x = torch.randn(2, 3, 9, 9)
        _, stats = _record({name: recorder}, model, x)
        mask = torch.sigmoid(model[1].conv(model[0](x))).double()
        assert stats[name].masks["mask"].mean == pytest.approx(mask.mean().item(), rel=1e-6)
        recorder.start_capture()
        model(x)
        assert recorder.captured_map.shape == (2, 1, 7, 7)  # a spatial mask has a map
        recorder.clear_recording()


def test_registration_is_checked():
    with pytest.raises(TypeError, match="target"):
        register_attention_adapter("SEModule", masks={"mask": "gate"})
    with pytest.raises(ValueError, match="masks"):
        register_attention_adapter(Gate)
    with pytest.raises(ValueError, match="num_branches"):
        register_attention_adapter(Gate, router="sigmoid")


def test_gates_sharing_one_submodule_are_measured_apart_compiled(dynamo_reset):
    # Two gates given one nn.Sigmoid (also used outside them): each recorder takes only the
    # calls made inside its own module's forward — one pre-hook more, still one graph.
    from .recording_rows import GATE, Shared, inputs, matches

    model, x = Shared(), inputs(batch=2)
    blocks, _ = find_attention_blocks(model, third_party=True, adapters=[GATE])
    assert {n: b.scoped for n, b in blocks.items()} == {"first": True, "second": True}
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    try:
        for b in blocks.values():
            b.configure_recording(CONFIG, "cpu")
        for step in range(4):  # a logging step every other step
            on = step % 2 == 1
            for b in blocks.values():
                (b.start_recording if on else b.stop_recording)()
            compiled(x)
            if not on:
                continue
            stats = {n: block_stats(b.statistics_layout, b.recorded_statistics().tolist())
                     for n, b in blocks.items()}
            with torch.no_grad():
                first = torch.sigmoid(model.first.conv(x))
                second = torch.sigmoid(model.second.conv(x * first))
            assert matches(stats["first"].masks["mask"], first)
            assert matches(stats["second"].masks["mask"], second)
        assert counter.frame_count == 2
        assert torch._dynamo.utils.counters["graph_break"] == {}
    finally:
        for b in blocks.values():
            b.clear_recording()


def _softmax_oracle(logits: torch.Tensor) -> tuple[float, float, float]:
    """(normalised entropy, first-key mass, max logit) of softmax rows ``(rows, keys)``,
    float64, every key visible."""
    p = logits.double().softmax(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(logits.shape[-1])
    return entropy.mean().item(), p[:, 0].mean().item(), logits.double().max().item()


#: name -> (build, class, count, masks): gates whose attention is a softmax over positions
HEAD_GATES = {
    "resnet18 gc": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="gc")),
                    "GlobalContext", 8, ["mask"]),
    "resnet18 gca": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="gca")),
                     "GlobalContext", 8, []),
    "gcresnet33ts": (lambda: timm.create_model("gcresnet33ts"), "GlobalContext", 10, []),
    "resnet18 nl": (lambda: timm.create_model("resnet18", block_args=dict(attn_layer="nl")),
                    "NonLocalAttn", 8, []),
}


@pytest.mark.parametrize("name", list(HEAD_GATES))
def test_softmax_gates_record_their_positions_as_one_head(name):
    """GlobalContext's softmax over positions (one query) and NonLocalAttn's softmax over
    positions (one query per position): entropy, sink share and max logit against the softmax
    of the logits computed offline from plain hooks on their convolutions; GlobalContext's
    channel gate as a mask."""
    build, cls, count, masks = HEAD_GATES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)
    caught: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for module_name, module in model.named_modules():
        if type(module).__name__ != cls:
            continue
        parts = {"conv_attn": module.conv_attn, "gate": module.gate} if cls == "GlobalContext" \
            else {"t": module.t, "p": module.p}
        for part, sub in parts.items():
            if sub is not None:
                handles.append(sub.register_forward_hook(
                    lambda m, i, o, _n=module_name, _p=part: caught.setdefault(_n, {}).update(
                        {_p: o.detach()})))
    with torch.no_grad():
        reference = model(x)
    for h in handles:
        h.remove()
    blocks, _ = find_attention_blocks(model, third_party=True)
    assert sorted(blocks) == sorted(caught) and len(blocks) == count
    with torch.no_grad():
        y, stats = _record(blocks, model, x)
    for b in blocks.values():
        b.clear_recording()
    assert torch.equal(y, reference)
    for block, s in stats.items():
        parts = caught[block]
        if cls == "GlobalContext":
            logits = parts["conv_attn"].flatten(1)  # one query per sample, positions as keys
        else:
            t, p = (parts[k].flatten(2) for k in ("t", "p"))  # (B, C', HW)
            logits = (t.transpose(1, 2) @ p * model.get_submodule(block).scale).flatten(0, 1)
        entropy, sink, max_logit = _softmax_oracle(logits)
        assert s.heads.head_count == (logits.shape[0],)
        assert s.heads.head_entropy[0] == pytest.approx(entropy, abs=1e-6)
        assert s.heads.head_sink[0] == pytest.approx(sink, abs=1e-6)
        assert s.heads.head_max_logit[0] == pytest.approx(max_logit, abs=1e-5)
        assert sorted(s.masks) == masks
        if masks:
            gate = parts["gate"].double()
            assert s.masks["mask"].mean == pytest.approx(gate.mean().item(), rel=1e-6)
