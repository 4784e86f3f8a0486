"""Peak memory of one forward+backward of each block, per backend, in units of ``x``.

    python benchmarks/memory.py                       # CPU: seed, plain, torch and triton
                                                      # (Triton under its interpreter)
    python benchmarks/memory.py --device cuda         # the same on a GPU (real kernels)
    python benchmarks/memory.py --shapes 4,64,28,28 --dtypes fp32 bf16 --layouts nchw nhwc
    python benchmarks/memory.py --json memory.json --check   # exit 1 if a goal is missed

What is measured: the largest amount of memory held at any moment of one step
``x.grad = None; block(x)[0].backward(grad)`` beyond what was held before it, divided by
``x``'s bytes (:func:`benchmarks.measure.peak_bytes`: on the CPU from torch.profiler's
allocation events, Triton's interpreter made to free its arguments as a GPU launch does; on
CUDA ``torch.cuda.max_memory_allocated``).

The seed is the seeds' own code (``tests/blocks/seed_reference.py``); the library blocks load
its weights. Goals: the Triton path at most
0.7x the seed and no more than the ``torch`` backend, for both blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__" and ("--device" not in sys.argv or "cpu" in sys.argv):
    # The Triton path runs on CPU tensors under Triton's interpreter, which must be switched
    # on before triton is imported (imported as a module, the importer decides).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.measure import (  # noqa: E402
    DTYPES,
    GPU_SHAPES,
    LAYOUTS,
    make_blocks,
    parse_shape,
    peak_bytes,
    train_step,
)
from lightning_attn.blocks.kernels import triton_importable  # noqa: E402

VARIANTS = ("seed", "plain", "torch", "triton")
#: CPU default: large enough that the maps are small next to x, small enough for the
#: interpreter (about 5 s for all rows on one core).
CPU_SHAPES = {"dsa": [(4, 64, 28, 28)], "coord": [(4, 64, 28, 28)]}
CUDA_SHAPES = {"dsa": GPU_SHAPES, "coord": GPU_SHAPES}
SMOKE_SHAPES = {"dsa": [(2, 6, 5, 7)], "coord": [(2, 16, 5, 7)]}
#: The Triton path's peak memory: at most this share of the seed's ...
GOAL_VS_SEED = 0.7
#: ... and at most the torch backend's (plus rounding of the small maps).
GOAL_VS_TORCH = 1.0


def triton_runs_on(device: torch.device) -> bool:
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def measure_rows(kind: str, shape, dtype_name: str, layout: str, device,
                 variants) -> Iterator[dict]:
    """One row per variant, as each is measured (the seed first): peak bytes, peak in units
    of ``x`` and the ratio to the seed's."""
    dtype = DTYPES[dtype_name]
    blocks = make_blocks(kind, shape[1], device, dtype, variants)
    torch.manual_seed(1)
    x = torch.randn(*shape, device=device, dtype=dtype)
    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    grad = torch.randn_like(x)
    x_bytes = x.numel() * x.element_size()
    seed_x = None
    for name, block in blocks.items():
        peak = peak_bytes(train_step(block, x, grad), x)
        row = {"block": kind, "shape": list(shape), "dtype": dtype_name, "layout": layout,
               "variant": name, "peak_bytes": peak, "peak_x": peak / x_bytes}
        seed_x = row["peak_x"] if name == "seed" else seed_x
        row["vs_seed"] = row["peak_x"] / seed_x if seed_x else None
        yield row


def measure(kind: str, shape, dtype_name: str, layout: str, device, variants) -> list[dict]:
    """:func:`measure_rows`, all at once."""
    return list(measure_rows(kind, shape, dtype_name, layout, device, variants))


def goal_failures(rows: list[dict]) -> list[str]:
    """The rows where the Triton path misses a memory goal."""
    out = []
    key = ("block", "dtype", "layout")
    for r in rows:
        if r["variant"] != "triton":
            continue
        same = [q for q in rows if all(q[k] == r[k] for k in key) and q["shape"] == r["shape"]]
        where = f"{r['block']} {tuple(r['shape'])} {r['dtype']} {r['layout']}"
        if r["vs_seed"] is not None and r["vs_seed"] > GOAL_VS_SEED:
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
        ratio = (f"{by['triton']['vs_seed']:.2f}"
                 if by.get("triton", {}).get("vs_seed") is not None else "-")
        lines.append(f"| {block} | {shape} | {dtype} | {layout} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return "\n".join(lines)


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
