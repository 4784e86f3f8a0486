"""The attention inside real timm and torchvision models, diagnosed through the adapters.

For each model (random init; nothing downloads): the attention modules found, the tags one
training point logs, the largest difference between the recorded statistics and the same
statistics computed offline from plain forward hooks (eager, and under
``torch.compile(fullgraph=True)``), and dynamo's graphs, recompiles and graph breaks over
four forwards with recording toggled on and off::

    python benchmarks/third_party.py [--backend aot_eager|inductor] [--size 64]
"""

from __future__ import annotations

import argparse
import functools
import math

import timm
import torch
import torch._dynamo.testing
import torchvision

from lightning_attn.blocks.adapters import adapters_in_force
from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.core.statistics import GlobalStats, RecordingConfig, block_stats
from lightning_attn.core.tags import scalar_metrics


def _ge_resnet18():
    from timm.layers.gather_excite import GatherExcite  # timm 1.0.31's "ge" fails to build

    return timm.create_model(
        "resnet18", block_args=dict(attn_layer=functools.partial(GatherExcite, use_mlp=False)))


MODELS = {
    "timm efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100"),
    "timm resnet18 attn_layer=se": lambda: timm.create_model(
        "resnet18", block_args=dict(attn_layer="se")),
    "timm resnet18 attn_layer=eca": lambda: timm.create_model(
        "resnet18", block_args=dict(attn_layer="eca")),
    "timm resnet18 attn_layer=cbam": lambda: timm.create_model(
        "resnet18", block_args=dict(attn_layer="cbam")),
    "timm resnet18 attn_layer=ge (no mlp)": _ge_resnet18,
    "timm resnet18 attn_layer=coord": lambda: timm.create_model(
        "resnet18", block_args=dict(attn_layer="coord")),
    "timm skresnet18": lambda: timm.create_model("skresnet18"),
    "timm resnest14d": lambda: timm.create_model("resnest14d"),
    "torchvision efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "torchvision regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(),
}


def _offline(model, x):
    """Mask / router values per module, from plain forward hooks (not the adapters')."""
    caught, handles = {}, []
    for name, module in model.named_modules():
        adapter = next((a for a in adapters_in_force() if a.matches(module)), None)
        if adapter is None:
            continue
        paths = set(adapter.masks.values()) | ({adapter.router} if adapter.router else set())
        for path in paths:
            def hook(sub, inputs, out, _p=path, _n=name, _a=adapter):
                convert = _a.convert.get(_p)
                caught.setdefault(_n, {}).setdefault(_p, []).append(
                    (convert(sub, inputs, out) if convert else out).detach().double())
            handles.append(module.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, by_path in caught.items():
        adapter = next(a for a in adapters_in_force() if a.matches(model.get_submodule(name)))
        order, values = {}, {}
        for mask, path in adapter.masks.items():
            values[mask] = by_path[path][order.get(path, 0)]
            order[path] = order.get(path, 0) + 1
        if adapter.router:
            values["<router>"] = by_path[adapter.router][0]
        out[name] = values
    return out


def _difference(stats, offline) -> float:
    worst = 0.0
    for name, bs in stats.items():
        for mask, m in bs.masks.items():
            v = offline[name][mask].flatten()
            for got, want in ((m.mean, v.mean()), (m.std, v.std()), (m.min, v.min()),
                              (m.max, v.max())):
                worst = max(worst, abs(got - want.item()))
        if bs.router is not None:
            w = offline[name]["<router>"]
            entropy = -(w * w.clamp_min(1e-300).log()).sum(1).mean().item()
            worst = max(worst, abs(bs.router.entropy - entropy),
                        abs(bs.router.entropy_norm - entropy / math.log(w.shape[1])),
                        *(abs(a - b) for a, b in zip(bs.router.usage, w.mean(0).tolist(),
                                                     strict=True)))
    return worst


def _read(blocks):
    return {n: block_stats(b.statistics_layout, b.recorded_statistics().tolist())
            for n, b in blocks.items()}


def measure(name, build, size, backend):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, size, size)
    blocks, _ = find_attention_blocks(model, third_party=True)
    try:
        for b in blocks.values():
            b.configure_recording(RecordingConfig(histogram_bins=0), "cpu")
            b.start_recording()
        with torch.no_grad():
            model(x)
        eager = _read(blocks)
        offline = _offline(model, x)
        tags = len(scalar_metrics(GlobalStats(0, eager), ("mask", "router", "param")))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        diffs = []
        with torch.no_grad():
            for step in range(4):
                on = step % 2 == 1
                for b in blocks.values():
                    (b.start_recording if on else b.stop_recording)()
                compiled(x)
                if on:
                    diffs.append(_difference(_read(blocks), offline))
        recompiles = sum(torch._dynamo.utils.counters["recompiles"].values())
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        kinds = sorted({type(b.module).__name__ for b in blocks.values()})
        return (name, f"{len(blocks)} {'/'.join(kinds)}", tags,
                f"{_difference(eager, offline):.1e}", f"{max(diffs):.1e}",
                counter.frame_count, recompiles, breaks)
    finally:
        for b in blocks.values():
            b.clear_recording()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    head = ("model", "modules found", "tags", "max diff eager", f"max diff {args.backend}",
            "graphs", "recompiles", "breaks")
    print(f"torch {torch.__version__}, timm {timm.__version__}, torchvision "
          f"{torchvision.__version__}, input (2, 3, {args.size}, {args.size}), CPU")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, build in MODELS.items():
        print("| " + " | ".join(map(str, measure(name, build, args.size, args.backend))) + " |",
              flush=True)


if __name__ == "__main__":
    main()
