"""Speed and memory of the blocks' backends against the seed formulation, in one run.

    python benchmarks/blocks.py                        # CPU: fused vs seed (a few minutes)
    python benchmarks/blocks.py --quick                # fewer repeats
    python benchmarks/blocks.py --device cuda          # GPU: seed, compile(seed), plain, torch,
                                                       # triton, compile(triton); fp32 and bf16
    python benchmarks/blocks.py --device cuda --blocks dsa --shapes 128,1024,14,14 \\
        --dtypes bf16 --layouts nhwc --modes fwd+bwd --profile --json dsa.json
    python benchmarks/blocks.py --device cpu --smoke   # the GPU table's code on tiny shapes,
                                                       # Triton under its interpreter (no timing
                                                       # worth reading: a check that it runs)

CPU mode: the reference is the same block with ``backend="plain"``, which runs the seeds' code
op for op (tests/blocks checks it against a verbatim copy of the seeds). Variants are
interleaved (ref, fused, ref, fused, ...); the speed-up is the median of the ratios of
back-to-back pairs, the times the medians of each variant. glibc's allocator makes
CPU timings of large tensors swing with what ran before, so the script pins it with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (re-executing itself if needed).
Memory is the bytes allocated during one forward+backward, from torch.profiler's memory
accounting (self allocations of every op, so nested ops are not counted twice).

Device mode (``--device cuda``, or ``--smoke``): see :func:`device_main`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and "--smoke" in sys.argv and "cuda" not in sys.argv:
    # Triton's interpreter runs the kernels on CPU tensors; it must be set before triton is
    # imported (torch.compile imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
    os.environ.update(_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import benchmark  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.measure import (  # noqa: E402
    GPU_SHAPES,
    LAYOUTS,
    TABLE_HEADER,
    VariantGroup,
    copy_bandwidth,
    first,
    kernel_tables,
    parse_shape,
    table_row,
)
from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention  # noqa: E402

THREADS = 2
DSA_SHAPES = [(8, 64, 56, 56), (32, 64, 32, 32), (8, 256, 14, 14)]
COORD_SHAPES = [(8, 64, 56, 56), (32, 256, 14, 14)]
# (block, shape index, mode) -> minimum speed-up; memory targets are maximum ratios.
SPEED_TARGETS = {
    ("dsa", (8, 64, 56, 56), "fwd+bwd"): 1.6,
    ("dsa", (32, 64, 32, 32), "fwd+bwd"): 1.6,
    ("dsa", (8, 64, 56, 56), "fwd"): 1.4,
    ("dsa", (32, 64, 32, 32), "fwd"): 1.4,
    ("coord", (8, 64, 56, 56), "fwd+bwd"): 1.4,
    ("coord", (32, 256, 14, 14), "fwd+bwd"): 1.25,
}
MEMORY_TARGETS = {"dsa": 0.7, "coord": 0.5}


def make_block(kind: str, channels: int, fused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "dsa":
        return DynamicSpatialAttention(backend="torch" if fused else "plain")
    return CoordinateAttention(channels, backend="torch" if fused else "plain")


def step_fn(block, x, grad, backward: bool):
    if backward:
        def run():
            x.grad = None
            first(block(x)).backward(grad)
    else:
        def run():
            with torch.no_grad():
                first(block(x))
    return run


def allocated_bytes(block, x, grad) -> int:
    """Bytes allocated during one forward+backward, from torch.profiler's memory accounting.

    Each op's *self* allocations are summed (positive self memory), so an allocation made by
    an op nested in another (an autograd node calling ``aten::mul``) is counted once.
    """
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        first(block(x)).backward(grad)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def compare(kind: str, shape, mode: str, repeats: int, min_run_time: float):
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    blocks = {fused: make_block(kind, shape[1], fused) for fused in (False, True)}
    for b in blocks.values():
        b.load_state_dict(blocks[False].state_dict())
    backward = mode == "fwd+bwd"
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for _ in range(repeats):
        for fused in (False, True):
            timer = benchmark.Timer(
                stmt="run()", globals={"run": step_fn(blocks[fused], x, grad, backward)},
                num_threads=THREADS,
            )
            times[fused].append(timer.blocked_autorange(min_run_time=min_run_time).median)
        # Each pair ran back to back: its ratio cancels the machine's slow drifts.
        ratios.append(times[False][-1] / times[True][-1])
    row = {"block": kind, "shape": shape, "mode": mode,
           "ref_ms": statistics.median(times[False]) * 1e3,
           "fused_ms": statistics.median(times[True]) * 1e3,
           "speedup": statistics.median(ratios)}
    if backward:
        mem_ref = allocated_bytes(blocks[False], x, grad)
        mem_fast = allocated_bytes(blocks[True], x, grad)
        row["mem_ratio"] = mem_fast / mem_ref
        row["mem_ref_mb"] = mem_ref / 2**20
        row["mem_fused_mb"] = mem_fast / 2**20
    return row



# --------------------------------------------------------------------------------------
# Device mode: every backend against the seed code
# --------------------------------------------------------------------------------------

SMOKE_SHAPES = {"dsa": [(2, 5, 7, 9), (3, 4, 6, 6)], "coord": [(2, 8, 6, 7), (3, 16, 5, 5)]}
VARIANTS = ("seed", "compile(seed)", "plain", "torch", "triton", "compile(triton)")
#: "bf16": x and the blocks in bfloat16; "bf16 autocast": float32 x and weights under
#: torch.autocast (the blocks' small maps in bfloat16).
DTYPES = ("fp32", "bf16", "bf16 autocast")
#: The Triton path's goals on an H100, forward+backward.
GOALS = {"vs_seed": 2.5, "vs_compiled_seed": 2.0, "floor_share": 0.6, "memory_vs_seed": 0.7}


def configure_device(device) -> None:
    """TF32 off (the fp32 columns compare exact arithmetic) and room for the compiled
    variants' recompilations (shapes x autocast x grad mode per seed class)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else (
        "cache_size_limit")
    setattr(torch._dynamo.config, limit, 64)


def goal_failures(rows) -> list[str]:
    """The Triton path's forward+backward rows that miss a goal of :data:`GOALS`."""
    out = []
    for r in rows:
        if r["variant"] != "triton" or r["mode"] != "fwd+bwd" or "ms" not in r:
            continue
        where = f"{r['block']} {tuple(r['shape'])} {r['dtype']} {r['layout']}"
        if r.get("vs_seed") is not None and r["vs_seed"] < GOALS["vs_seed"]:
            out.append(f"{where}: {r['vs_seed']:.2f}x the seed < {GOALS['vs_seed']}x")
        compiled = r.get("vs_compiled_seed")
        if compiled is not None and compiled < GOALS["vs_compiled_seed"]:
            out.append(f"{where}: {compiled:.2f}x torch.compile(seed) < "
                       f"{GOALS['vs_compiled_seed']}x")
        if r["floor_share"] < GOALS["floor_share"]:
            out.append(f"{where}: {r['floor_share']:.0%} of the 7-pass floor < "
                       f"{GOALS['floor_share']:.0%}")
        if r.get("mem_vs_seed") is not None and r["mem_vs_seed"] > GOALS["memory_vs_seed"]:
            out.append(f"{where}: peak memory {r['mem_vs_seed']:.2f}x the seed's > "
                       f"{GOALS['memory_vs_seed']}x")
    return out


def device_main(args) -> int:
    """Seed code, torch.compile(seed), plain, torch, triton and torch.compile(triton) on one
    device, same weights (:class:`benchmarks.measure.VariantGroup`).

    For each block, shape, dtype (``fp32``; ``bf16``: x and weights in bfloat16; ``bf16
    autocast``) and layout, forward and forward+backward: median ms (``torch.utils.benchmark``,
    which synchronises CUDA), speed against the seed and torch.compile(seed), share of the
    floor (3 forward / 7 forward+backward passes over ``x``'s bytes, against the bandwidth of
    a large device copy measured in the same run), peak memory beyond what the step's inputs
    hold and its ratio to the seed's, and the largest difference of ``y`` and ``grad_x`` from
    the seed's (TF32 off, so fp32 columns compare exact arithmetic); with ``--profile`` the
    kernels of one step, by self time. ``--smoke`` runs the same code on tiny CPU shapes.
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    configure_device(device)
    bandwidth = copy_bandwidth(device, 2**22 if args.smoke else 2**28)
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "bandwidth_gbs": bandwidth / 1e9, "smoke": args.smoke}
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}; TF32 off; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    if args.smoke:
        print("SMOKE RUN: tiny shapes, Triton under its interpreter: these times mean nothing")
    print()
    print(TABLE_HEADER, flush=True)
    rows = []

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for kind in args.blocks:
        shapes = args.shapes or (SMOKE_SHAPES[kind] if args.smoke else GPU_SHAPES)
        for shape in shapes:
            for dtype_name in args.dtypes:
                for layout in args.layouts:
                    compile_here = not args.no_compile and dtype_name in args.compile_dtypes and (
                        args.compile_shapes is None or tuple(shape) in args.compile_shapes)
                    group = VariantGroup(kind, shape, dtype_name, layout, device,
                                         args.variants, args.compile if compile_here else None,
                                         bandwidth)
                    for mode in args.modes:
                        for variant in group.blocks:
                            rows.append(group.measure(variant, mode, args.min_run_time,
                                                      kernels=args.profile))
                            print(table_row(rows[-1]), flush=True)
                    save()  # a run cut short still leaves what it measured
    print()
    print("times: medians (torch.utils.benchmark); x seed, x compile(seed): speed relative to "
          "the seed code and torch.compile of it; floor: 3 (fwd) or 7 (fwd+bwd) passes over "
          "x's bytes at the copy bandwidth; peak: memory a step holds beyond its inputs; "
          "diff: max |y - y_seed| / max |grad_x - grad_x_seed|")
    if args.profile:
        print()
        print(kernel_tables(rows))
    print()
    failures = goal_failures(rows)
    meta["goal_failures"] = failures
    save()
    if args.smoke:
        print("smoke run: the GPU goals are not evaluated")
        return 0
    print("triton goals on a GPU (fwd+bwd): "
          + ("all met" if not failures else "missed:\n  " + "\n  ".join(failures)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu (default): fused vs seed on 2 threads; cuda: every backend")
    parser.add_argument("--smoke", action="store_true",
                        help="the device table's code on tiny shapes (checks it runs)")
    parser.add_argument("--compile", default="inductor", help="torch.compile backend of the "
                        "compile(...) rows (default inductor; the smoke run uses aot_eager)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile rows")
    parser.add_argument("--compile-dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                        help="device mode: the dtypes with compile rows (default all)")
    parser.add_argument("--compile-shapes", nargs="+", type=parse_shape, default=None,
                        help="device mode: the shapes with compile rows (default all)")
    parser.add_argument("--blocks", nargs="+", default=["dsa", "coord"], choices=("dsa", "coord"),
                        help="device mode: which blocks (default both)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="device mode: B,C,H,W of x (default: the goal shapes)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES,
                        help="device mode (default fp32 bf16)")
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=tuple(LAYOUTS),
                        help="device mode: memory layout of x (default nchw)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"],
                        choices=("fwd", "fwd+bwd"), help="device mode (default both)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="device mode (default all; seed is the reference)")
    parser.add_argument("--profile", action="store_true",
                        help="device mode: per-kernel table of one forward+backward")
    parser.add_argument("--json", metavar="PATH", help="device mode: also write rows as JSON")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per measurement in device mode (default 0.3)")
    args = parser.parse_args(argv)
    if args.device == "cuda" or args.smoke:
        if "seed" not in args.variants:
            args.variants = ["seed", *args.variants]
        if args.smoke and args.compile == "inductor":
            args.compile = "aot_eager"  # inductor's C++ codegen takes minutes on a small CPU
        if args.min_run_time is None:
            args.min_run_time = 0.01 if args.smoke else 0.3
        return device_main(args)
    torch.set_num_threads(THREADS)
    repeats, min_run = (3, 0.3) if args.quick else (9, 0.4)

    rows = []
    for kind, shapes in (("dsa", DSA_SHAPES), ("coord", COORD_SHAPES)):
        for shape in shapes:
            for mode in ("fwd", "fwd+bwd"):
                rows.append(compare(kind, shape, mode, repeats, min_run))
                r = rows[-1]
                print(f"  measured {kind} {shape} {mode}: x{r['speedup']:.2f}", file=sys.stderr)

    print(f"torch {torch.__version__}, {THREADS} threads; times: medians of {repeats} "
          "interleaved runs; speed-up: median of the per-pair ratios")
    print()
    print("| block | (B,C,H,W) | pass | seed ms | fused ms | speed-up | target | "
          "memory fused/seed | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for r in rows:
        target = SPEED_TARGETS.get((r["block"], r["shape"], r["mode"]))
        speed_ok = target is None or r["speedup"] >= target
        mem = r.get("mem_ratio")
        mem_target = MEMORY_TARGETS[r["block"]] if mem is not None else None
        mem_ok = mem is None or mem <= mem_target
        if not speed_ok:
            failures.append(f"{r['block']} {r['shape']} {r['mode']} speed-up "
                            f"{r['speedup']:.2f} < {target}")
        if not mem_ok:
            failures.append(f"{r['block']} {r['shape']} memory ratio {mem:.2f} > {mem_target}")
        speed_cell = f">= {target:.2f}x" if target else "-"
        mem_cell = (
            f"{mem:.2f} ({r['mem_fused_mb']:.0f}/{r['mem_ref_mb']:.0f} MB)" if mem else "-"
        )
        mem_target_cell = f"<= {mem_target:.1f}" if mem_target else "-"
        print(
            f"| {r['block']} | {r['shape']} | {r['mode']} | {r['ref_ms']:.2f} | "
            f"{r['fused_ms']:.2f} | {r['speedup']:.2f}x | "
            f"{speed_cell}{'' if speed_ok else ' MISSED'} | {mem_cell} | "
            f"{mem_target_cell}{'' if mem_ok else ' MISSED'} |"
        )
    print()
    print("all targets met" if not failures else "targets missed:\n  " + "\n  ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
