"""Peak memory of one forward+backward of each block, per backend, in units of ``x``.

    python benchmarks/memory.py                       # CPU: seed, plain, torch and triton
                                                      # (Triton under its interpreter)
    python benchmarks/memory.py --device cuda         # the same on a GPU (real kernels)
    python benchmarks/memory.py --shapes 4,64,28,28 --dtypes fp32 bf16 --layouts nchw nhwc
    python benchmarks/memory.py --json memory.json --check   # exit 1 if a goal is missed

What is measured: the largest amount of memory held at any moment of one step
``x.grad = None; block(x)[0].backward(grad)`` beyond what was held before it (``x``, the
upstream gradient and the weights are held before and not counted; ``y`` and the new
``x.grad`` are), divided by ``x``'s bytes. ``x.grad`` is cleared first: a gradient left from
the previous step would be freed during the step and lower the figure by one ``x``.

- CPU: the running sum of torch.profiler's allocation events (``[memory]``, +bytes on
  allocation, -bytes on free) in time order, and its maximum. Autograd allocates the same
  tensors in the same order on a GPU, so the figure carries over (the caching allocator only
  rounds sizes up). Python's garbage collector is off during the step (it would free
  tensors of earlier steps at moments of its choosing), and Triton's interpreter is made to
  release each launch's arguments on return, as a compiled launch does (see
  :func:`_interpreter_frees_its_arguments`).
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the step.

The seed is the seeds' own code (``tests/blocks/seed_reference.py``); the library blocks load
its weights. Goals: the Triton path at most
0.7x the seed and no more than the ``torch`` backend, for both blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and ("--device" not in sys.argv or "cpu" in sys.argv):
    # The Triton path runs on CPU tensors under Triton's interpreter, which must be switched
    # on before triton is imported (imported as a module, the importer decides).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention  # noqa: E402
from lightning_attn.blocks.kernels import triton_importable  # noqa: E402

VARIANTS = ("seed", "plain", "torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
#: CPU default: large enough that the maps are small next to x, small enough for the
#: interpreter (about 5 s for all rows on one core).
CPU_SHAPES = {"dsa": [(4, 64, 28, 28)], "coord": [(4, 64, 28, 28)]}
CUDA_SHAPES = {
    "dsa": [(64, 256, 56, 56), (256, 64, 32, 32), (128, 1024, 14, 14), (8, 2048, 7, 7)],
    "coord": [(64, 256, 56, 56), (256, 64, 32, 32), (128, 1024, 14, 14), (8, 2048, 7, 7)],
}
SMOKE_SHAPES = {"dsa": [(2, 6, 5, 7)], "coord": [(2, 16, 5, 7)]}
#: The Triton path's peak memory: at most this share of the seed's ...
GOAL_VS_SEED = 0.7
#: ... and at most the torch backend's (plus rounding of the small maps).
GOAL_VS_TORCH = 1.0


def seed_module():
    """tests/blocks/seed_reference.py: the seeds' code, copied verbatim."""
    spec = importlib.util.spec_from_file_location(
        "seed_reference", _ROOT / "tests" / "blocks" / "seed_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def triton_runs_on(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make_blocks(kind: str, channels: int, device, dtype, variants) -> dict[str, torch.nn.Module]:
    """The seed block and, with its weights, the library block on each backend."""
    seed_mod = seed_module()
    torch.manual_seed(0)
    seed = seed_mod.DynamicSpatialAttention() if kind == "dsa" else seed_mod.CoordinateAtt(
        channels
    )
    blocks = {}
    for name in variants:
        if name == "seed":
            blocks[name] = seed
            continue
        block = (
            DynamicSpatialAttention(backend=name) if kind == "dsa"
            else CoordinateAttention(channels, backend=name)
        )
        block.load_state_dict(seed.state_dict(), strict=True)
        blocks[name] = block
    return {n: b.to(device=device, dtype=dtype) for n, b in blocks.items()}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _cpu_peak(run) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _cuda_peak(run, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@contextlib.contextmanager
def _interpreter_frees_its_arguments():
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


def peak_bytes(block, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak bytes held during one forward+backward beyond what was held before it."""

    def step():
        x.grad = None  # the unbiased base: no gradient of an earlier step to free
        _first(block(x)).backward(grad)

    interpreted = x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    with _interpreter_frees_its_arguments() if interpreted else contextlib.nullcontext():
        step()  # warm-up: Triton compiles, lazy buffers are made, outside the measurement
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


def measure(kind: str, shape, dtype_name: str, layout: str, device, variants) -> list[dict]:
    """One row per variant: peak bytes and peak in units of ``x``."""
    dtype = DTYPES[dtype_name]
    blocks = make_blocks(kind, shape[1], device, dtype, variants)
    torch.manual_seed(1)
    x = torch.randn(*shape, device=device, dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    grad = torch.randn_like(x)
    x_bytes = x.numel() * x.element_size()
    rows = []
    for name, block in blocks.items():
        peak = peak_bytes(block, x, grad)
        rows.append({
            "block": kind, "shape": list(shape), "dtype": dtype_name, "layout": layout,
            "variant": name, "peak_bytes": peak, "peak_x": peak / x_bytes,
        })
    seed = next(r for r in rows if r["variant"] == "seed")
    for r in rows:
        r["vs_seed"] = r["peak_x"] / seed["peak_x"]
    return rows


def goal_failures(rows: list[dict]) -> list[str]:
    """The rows where the Triton path misses a memory goal."""
    out = []
    key = ("block", "dtype", "layout")
    for r in rows:
        if r["variant"] != "triton":
            continue
        same = [q for q in rows if all(q[k] == r[k] for k in key) and q["shape"] == r["shape"]]
        where = f"{r['block']} {tuple(r['shape'])} {r['dtype']} {r['layout']}"
        if r["vs_seed"] > GOAL_VS_SEED:
            out.append(f"{where}: triton {r['vs_seed']:.2f}x the seed > {GOAL_VS_SEED}x")
        torch_row = next((q for q in same if q["variant"] == "torch"), None)
        if torch_row is not None and r["peak_x"] > GOAL_VS_TORCH * torch_row["peak_x"] + 0.02:
            out.append(f"{where}: triton {r['peak_x']:.2f} x > torch {torch_row['peak_x']:.2f} x")
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| block | (B,C,H,W) | dtype | layout | " + " | ".join(
        f"{v} (x)" for v in VARIANTS) + " | triton / seed |", "|---" * (5 + len(VARIANTS)) + "|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(
            (r["block"], tuple(r["shape"]), r["dtype"], r["layout"]), {}
        )[r["variant"]] = r
    for (block, shape, dtype, layout), by in groups.items():
        cells = [f"{by[v]['peak_x']:.2f}" if v in by else "-" for v in VARIANTS]
        ratio = f"{by['triton']['vs_seed']:.2f}" if "triton" in by else "-"
        lines.append(f"| {block} | {shape} | {dtype} | {layout} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--shapes takes B,C,H,W with positive sizes, got {text!r}"
        )
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--blocks", nargs="+", default=["dsa", "coord"], choices=("dsa", "coord"))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="B,C,H,W of x (default: per device)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=tuple(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=tuple(LAYOUTS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks it runs)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the Triton path misses a memory goal")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    variants = [v for v in VARIANTS if v != "triton" or triton_runs_on(device)]
    defaults = SMOKE_SHAPES if args.smoke else CPU_SHAPES if device.type == "cpu" else CUDA_SHAPES
    rows = []
    for kind in args.blocks:
        for shape in args.shapes or defaults[kind]:
            for dtype_name in args.dtypes:
                for layout in args.layouts:
                    rows += measure(kind, shape, dtype_name, layout, device, variants)
    print(f"peak memory of one forward+backward beyond its inputs, in units of x "
          f"({device.type}{', Triton interpreted' if device.type == 'cpu' else ''})")
    print()
    print(markdown(rows))
    failures = [] if args.smoke else goal_failures(rows)
    print()
    if args.smoke:
        print("smoke run: x is as small as the weights' gradients; the goals are not evaluated")
    elif "triton" in variants:
        print("memory goals (triton <= 0.7x seed and <= torch): " + (
            "met" if not failures else "missed:\n  " + "\n  ".join(failures)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
