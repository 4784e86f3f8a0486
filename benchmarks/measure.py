"""What the benchmark scripts share: the seed blocks and the library's on every backend with
the seed's weights, one forward+backward step, its time, its peak memory, the device's copy
bandwidth, a per-kernel profile, and the table of device rows.

Needs torch and this package only (no numpy, no Lightning): ``benchmarks/gpu_check.py``
runs on a machine where nothing else is installed.

Peak memory (:func:`peak_bytes`): the largest amount of memory held at any moment of one
step ``x.grad = None; block(x)[0].backward(grad)`` beyond what was held before it (``x``, the
upstream gradient and the weights are held before and not counted; ``y`` and the new
``x.grad`` are). ``x.grad`` is cleared first: a gradient left from the previous step would
be freed during the step and lower the figure by one ``x``.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the step.
- CPU: the running sum of torch.profiler's allocation events (``[memory]``, +bytes on
  allocation, -bytes on free) in time order, and its maximum. Autograd allocates the same
  tensors in the same order on a GPU, so the figure carries over (the caching allocator only
  rounds sizes up). Python's garbage collector is off during the step (it would free
  tensors of earlier steps at moments of its choosing), and Triton's interpreter is made to
  release each launch's arguments on return, as a compiled launch does
  (:func:`interpreter_frees_its_arguments`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

ROOT = Path(__file__).resolve().parents[1]
#: The GPU shapes of the Triton path's goals (W = 56, 32, 14, 7), for both blocks.
GPU_SHAPES = [(64, 256, 56, 56), (256, 64, 32, 32), (128, 1024, 14, 14), (8, 2048, 7, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
#: Full-size passes over x's bytes at the floor: 3 forward, 4 backward.
FLOOR_PASSES = {"fwd": 3, "fwd+bwd": 7}
#: The variant that the autotuned Triton path is measured as (``LIGHTNING_ATTN_TRITON_AUTOTUNE=1``
#: during its steps; every other ``triton`` row runs the fixed configuration per shape class).
TRITON_AUTOTUNE = "triton autotune"


def seed_module():
    """tests/blocks/seed_reference.py: the seeds' code, copied verbatim."""
    spec = importlib.util.spec_from_file_location(
        "seed_reference", ROOT / "tests" / "blocks" / "seed_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first(out):
    return out[0] if isinstance(out, tuple) else out


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--shapes takes B,C,H,W with positive sizes, got {text!r}"
        )
    return parts


def make_blocks(kind: str, channels: int, device, dtype, variants,
                compile_backend: str | None = None) -> dict[str, torch.nn.Module]:
    """The seed block and, with its weights, the library block on each backend of
    ``variants``; ``compile(seed)`` / ``compile(triton)`` wrap copies in ``torch.compile``
    (skipped when ``compile_backend`` is None); :data:`TRITON_AUTOTUNE` is a triton block."""
    torch.manual_seed(0)
    seed_mod = seed_module()
    seed = (seed_mod.DynamicSpatialAttention() if kind == "dsa"
            else seed_mod.CoordinateAtt(channels)).to(device=device, dtype=dtype)

    def library(backend: str) -> torch.nn.Module:
        block = (DynamicSpatialAttention(backend=backend) if kind == "dsa"
                 else CoordinateAttention(channels, backend=backend))
        block.load_state_dict(seed.state_dict(), strict=True)
        return block.to(device=device, dtype=dtype)

    blocks = {}
    for name in variants:
        if name == "seed":
            blocks[name] = seed
        elif name.startswith("compile("):
            if compile_backend is not None:
                inner = name[len("compile("):-1]
                base = seed if inner == "seed" else library(inner)
                blocks[name] = torch.compile(base, backend=compile_backend)
        else:
            blocks[name] = library("triton" if name == TRITON_AUTOTUNE else name)
    return blocks


@contextlib.contextmanager
def autotuning(on: bool):
    """``LIGHTNING_ATTN_TRITON_AUTOTUNE=1`` while inside, when ``on``."""
    if not on:
        yield
        return
    old = os.environ.get("LIGHTNING_ATTN_TRITON_AUTOTUNE")
    os.environ["LIGHTNING_ATTN_TRITON_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LIGHTNING_ATTN_TRITON_AUTOTUNE"]
        else:
            os.environ["LIGHTNING_ATTN_TRITON_AUTOTUNE"] = old


def train_step(block, x: torch.Tensor, grad: torch.Tensor, backward: bool = True,
               autocast: bool = False) -> Callable[[], torch.Tensor]:
    """One step of ``block`` on ``x``: forward (under bfloat16 autocast if asked) and, with
    ``backward``, ``x.grad = None`` first and the backward of ``grad``; returns ``y``."""
    def forward():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            return first(block(x))

    if backward:
        def run():
            x.grad = None
            y = forward()
            y.backward(grad.to(y.dtype))
            return y
    else:
        def run():
            with torch.no_grad():
                return forward()
    return run


def time_ms(run: Callable, min_run_time: float) -> float:
    """Median milliseconds of ``run()`` (``torch.utils.benchmark``, which synchronises CUDA),
    after two warm-up calls (Triton and torch.compile compile there)."""
    from torch.utils import benchmark

    run()
    run()
    timer = benchmark.Timer(stmt="run()", globals={"run": run})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@contextlib.contextmanager
def interpreter_frees_its_arguments():
    """Make Triton's interpreter release each launch's arguments when it returns.

    The interpreter (CPU only) keeps the storages of a launch's tensor arguments in a
    reference cycle of its own (a closure over a dict of storages), so that they live on
    until Python's garbage collector runs, at a moment that depends on everything else in
    the process. A compiled launch on a GPU holds nothing. Collecting right after each
    interpreted launch gives the GPU's lifetimes, deterministically (the collector is off
    during the measured step, see :func:`peak_bytes`).
    """
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def run_and_collect(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        finally:
            gc.collect()

    InterpretedFunction.run = run_and_collect
    try:
        yield
    finally:
        InterpretedFunction.run = run


def _cpu_peak(step: Callable) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _cuda_peak(step: Callable, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(step: Callable, x: torch.Tensor, warm_up: bool = True) -> int:
    """Peak bytes held during ``step()`` (one forward+backward that clears ``x.grad`` first,
    :func:`train_step`) beyond what was held before it; after one warm-up step (Triton
    compiles, lazy buffers are made) unless ``warm_up`` is False."""
    interpreted = x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    with interpreter_frees_its_arguments() if interpreted else contextlib.nullcontext():
        if warm_up:
            step()
        x.grad = None
        # A garbage collection inside the measured step could free tensors of earlier steps
        # and lower the figure: collect now, and not during the step.
        gc.collect()
        gc.disable()
        try:
            if x.device.type == "cuda":
                return _cuda_peak(step, x.device)
            return _cpu_peak(step)
        finally:
            gc.enable()


@contextlib.contextmanager
def attached_blocks(model: torch.nn.Module, config, device, record: bool):
    """The model's attention (the adapters' hooks attached, ``config`` configured), recording
    while inside if ``record``; every hook removed on the way out."""
    from lightning_attn.blocks.discovery import find_attention_blocks

    blocks, _ = find_attention_blocks(model, third_party=True)
    try:
        for block in blocks.values():
            block.configure_recording(config, device)
            if record:
                block.start_recording("benchmark")
        yield blocks
    finally:
        for block in blocks.values():
            block.clear_recording()


def copy_bandwidth(device, numel: int) -> float:
    """Bytes per second of a large device copy (read + write), the peak the floor is set
    against."""
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 0.2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def kernel_profile(run: Callable, device, rows: int = 12) -> list[dict]:
    """The kernels of one step by self time (torch.profiler): name, calls, microseconds."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    run()
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"kernel": e.key, "calls": e.count, "us": getattr(e, attr)} for e in events[:rows]]


class VariantGroup:
    """Every variant of one block at one (shape, dtype, layout) on one device: the same
    weights (the seed's), the same ``x`` and upstream gradient. :meth:`measure` gives one
    row at a time, compared with the group's seed row (measure ``"seed"`` first)."""

    def __init__(self, kind: str, shape, dtype_name: str, layout: str, device,
                 variants, compile_backend: str | None, bandwidth: float) -> None:
        self.kind, self.shape, self.dtype_name, self.layout = kind, tuple(shape), dtype_name, layout
        self.device, self.bandwidth = torch.device(device), bandwidth
        self.autocast = dtype_name == "bf16 autocast"
        dtype = torch.float32 if self.autocast else DTYPES[dtype_name]
        self.blocks = make_blocks(kind, shape[1], self.device, dtype, variants, compile_backend)
        torch.manual_seed(1)
        x = torch.randn(*shape, device=self.device, dtype=dtype)
        self.x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
        self.grad = torch.randn(*shape, device=self.device, dtype=dtype)
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows: dict[tuple[str, str], dict] = {}

    def measure(self, variant: str, mode: str = "fwd+bwd", min_run_time: float = 0.1,
                memory: bool = True, kernels: bool = False) -> dict:
        """One row: ``ms`` (median), ``floor_share`` (of 3 or 7 passes over x's bytes at the
        copy bandwidth), for forward+backward ``diff`` (max |y - y_seed|, max |grad_x -
        grad_x_seed|) and ``peak_bytes``, the ratios to the group's seed (and
        compile(seed)) rows measured so far (:func:`compare`); ``error`` instead when the
        variant fails (the group goes on)."""
        row = {"block": self.kind, "shape": list(self.shape), "dtype": self.dtype_name,
               "layout": self.layout, "mode": mode, "variant": variant}
        block = self.blocks.get(variant)
        if block is None:
            return {**row, "error": "not built (no compile backend)"}
        backward = mode == "fwd+bwd"
        run = train_step(block, self.x, self.grad, backward, self.autocast)
        try:
            with autotuning(variant == TRITON_AUTOTUNE):
                if backward:
                    y = run().detach()
                    got = (y, self.x.grad.detach().clone())
                    if variant == "seed":
                        self.reference = got
                    if self.reference is not None:
                        row["diff"] = [float((a.float() - b.float()).abs().max())
                                       for a, b in zip(got, self.reference, strict=True)]
                    del y, got
                row["ms"] = time_ms(run, min_run_time)
                x_bytes = self.x.numel() * self.x.element_size()
                row["floor_share"] = (FLOOR_PASSES[mode] * x_bytes / (row["ms"] * 1e-3)
                                      / self.bandwidth)
                if backward and memory:
                    row["peak_bytes"] = peak_bytes(run, self.x, warm_up=False)
                    row["peak_x"] = row["peak_bytes"] / x_bytes
                if backward and kernels:
                    row["kernels"] = kernel_profile(run, self.device)
        except Exception as exc:  # one variant failing must not end the measurement
            row = {k: v for k, v in row.items() if k not in ("ms", "diff")}
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows[(mode, variant)] = row
        compare([*self.rows.values()])
        return row


def _group_key(r: dict) -> tuple:
    return (r["block"], tuple(r["shape"]), r["dtype"], r["layout"], r["mode"])


def compare(rows: list[dict]) -> list[dict]:
    """Set each row's ``vs_seed`` and ``vs_compiled_seed`` (speed-ups: the reference's ms /
    the row's) and ``mem_vs_seed`` (peak / the seed's peak) from the rows of the same
    block, shape, dtype, layout and pass; returns ``rows``."""
    refs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "ms" in r:
            refs.setdefault(_group_key(r), {})[r["variant"]] = r
    for r in rows:
        if "ms" not in r:
            continue
        group = refs.get(_group_key(r), {})
        for name, field in (("seed", "vs_seed"), ("compile(seed)", "vs_compiled_seed")):
            if name in group:
                r[field] = group[name]["ms"] / r["ms"]
        seed_peak = group.get("seed", {}).get("peak_bytes")
        if r.get("peak_bytes") is not None and seed_peak:
            r["mem_vs_seed"] = r["peak_bytes"] / seed_peak
    return rows


TABLE_HEADER = ("| block | (B,C,H,W) | dtype | layout | pass | variant | ms | x seed | "
                "x compile(seed) | floor | peak MB | peak / seed | max diff y / grad x |\n"
                + "|---" * 13 + "|")


def _cell(value, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value, fmt) + unit


def table_row(r: dict) -> str:
    """One device row as a Markdown table line (:data:`TABLE_HEADER`'s columns)."""
    head = (f"| {r['block']} | {tuple(r['shape'])} | {r['dtype']} | {r['layout']} | "
            f"{r['mode']} | {r['variant']} |")
    if "error" in r:
        return head + f" {r['error']} |" + " - |" * 6
    peak = r.get("peak_bytes")
    diff = "/".join(f"{d:.1e}" for d in r["diff"]) if "diff" in r else "-"
    return (head + f" {r['ms']:.3f} | {_cell(r.get('vs_seed'), '.2f', 'x')} | "
            f"{_cell(r.get('vs_compiled_seed'), '.2f', 'x')} | {r['floor_share']:.0%} | "
            f"{_cell(None if peak is None else peak / 2**20, '.3g')} | "
            f"{_cell(r.get('mem_vs_seed'), '.2f')} | {diff} |")


def markdown_table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEADER, *(table_row(r) for r in rows)])


def kernel_tables(rows: list[dict]) -> str:
    """Markdown: the per-kernel profile of one forward+backward step of each row that has
    one."""
    out = []
    for r in rows:
        if not r.get("kernels"):
            continue
        out.append(f"{r['block']} {tuple(r['shape'])} {r['dtype']} {r['layout']} "
                   f"{r['variant']}, one forward+backward:\n")
        out.append("| kernel | calls | self us |\n|---|---|---|")
        out += [f"| {k['kernel'][:70]} | {k['calls']} | {k['us']:.0f} |" for k in r["kernels"]]
        out.append("")
    return "\n".join(out)

