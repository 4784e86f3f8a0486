"""Speed and memory of the fused blocks against the seed formulation, in one run.

    python benchmarks/blocks.py            # full table (a few minutes on 2 cores)
    python benchmarks/blocks.py --quick    # fewer repeats

The reference is the same block with ``backend="plain"``, which runs the seeds' code op for op
(tests/blocks checks it against a verbatim copy of the seeds). Variants are interleaved
(ref, fused, ref, fused, ...); the speed-up is the median of the ratios of
back-to-back pairs, the times the medians of each variant. glibc's allocator makes
CPU timings of large tensors swing with what ran before, so the script pins it with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (re-executing itself if needed).
Memory is the bytes allocated during one forward+backward, from torch.profiler's memory
accounting (self allocations of every op, so nested ops are not counted twice).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
    os.environ.update(_MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import benchmark  # noqa: E402

from lightning_attn import CoordinateAttention, DynamicSpatialAttention  # noqa: E402

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


def first(out):
    return out[0] if isinstance(out, tuple) else out


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    args = parser.parse_args()
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
