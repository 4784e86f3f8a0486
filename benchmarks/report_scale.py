"""The report on a long run: time, peak memory and page size.

Writes a synthetic run into a temporary folder (deleted afterwards, never committed): the
diagnostics of four attention blocks, 48 scalars a point in one event as the callback writes
them, plus ``train/loss`` and ``lr`` as Lightning writes them (an event each): 50 tags.
``--steps`` training steps logged every ``--every`` (Lightning's default 50), a collapse that
recovers, a NaN, a saturation at the end, and one attention-map image of ``--image-mb`` MB
(random pixels, so the PNG does not compress). Then runs ``lightning-attn report`` on it in
a fresh process per repeat and reports the median wall time, the process's peak resident
memory (``ru_maxrss``) and the size of ``report.html``::

    python benchmarks/report_scale.py                       # 10^6 steps / 50, 200 MB image
    python benchmarks/report_scale.py --every 1 --steps 100000 --image-mb 0
    python benchmarks/report_scale.py --compare /tmp/old    # the code at /tmp/old too,
                                                            # interleaved (a git archive)

Targets: under 20 s, under 500 MB, a page under 20 MB. The machine's load (``uptime``) is
printed before and after: the figures mean something only beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCKS = tuple(f"net.stages.{i}.attn" for i in range(4))
TARGETS = {"seconds": 20.0, "peak_mb": 500.0, "page_mb": 20.0}


def _block_values(i: int, steps: np.ndarray) -> dict[str, np.ndarray]:
    """The 12 scalars of block ``i`` at ``steps`` (router of 2 branches, one mask, alpha)."""
    rng = np.random.default_rng(i)
    n = len(steps)
    t = steps / max(int(steps[-1]), 1)
    mean = 0.5 + 0.1 * np.sin(8 * t + i) + 0.01 * rng.standard_normal(n)
    std = 0.2 + 0.02 * rng.standard_normal(n)
    sat_high = np.clip(0.02 + 0.01 * rng.standard_normal(n), 0, 1)
    if i == 1:  # a collapse between 30 % and 32 % of the run, then recovered
        std[(t >= 0.30) & (t < 0.32)] = 0.005
    if i == 2:  # saturated over the last tenth
        sat_high[t >= 0.9] = 0.7
    if i == 3:  # one NaN half way
        mean[n // 2] = math.nan
    usage0 = 0.5 + 0.05 * np.sin(3 * t + i)
    entropy = -(usage0 * np.log(usage0) + (1 - usage0) * np.log(1 - usage0))
    return {
        "router/entropy": entropy, "router/entropy_norm": entropy / math.log(2),
        "router/usage_0": usage0, "router/usage_1": 1 - usage0,
        "mask/mean": mean, "mask/std": std, "mask/min": mean - 2 * std,
        "mask/max": mean + 2 * std, "mask/sat_low": np.full(n, 0.01), "mask/sat_high": sat_high,
        "param/alpha": 0.5 + 0.3 * t, "param/alpha_grad_norm": 0.01 * (1 + t),
    }


def write_run(folder: Path, steps: int, every: int, image_mb: float) -> Path:
    """The synthetic run (see the module docstring); returns its event file."""
    from PIL import Image
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import text

    from lightning_attn.core.problems import HealthThresholds
    from lightning_attn.core.statistics import BlockInfo, StatisticsLayout
    from lightning_attn.report.records import encode_records

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "events.out.tfevents.0.synthetic"
    logged = np.arange(0, steps, every, dtype=np.int64)
    infos = [BlockInfo(b, StatisticsLayout(("mask",), 2), ("alpha",), ("alpha",)) for b in BLOCKS]
    config = {"run_id": "synthetic", "fn": "fit", "on_problem": "ignore",
              "thresholds": HealthThresholds().__dict__, "sections": ["router", "mask", "param"],
              "blocks": [info.to_json() for info in infos]}
    columns = {f"attn/{b}/{k}": v for i, b in enumerate(BLOCKS)
               for k, v in _block_values(i, logged).items()}
    loss = 2.0 * np.exp(-logged / max(steps / 4, 1)) + 0.05
    with open(path, "wb") as f:
        head = [Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString(),
                Event(wall_time=0.0, step=0, summary=text("attn/config", json.dumps(config)))
                .SerializeToString()]
        f.write(encode_records(head))
        tags = list(columns)
        matrix = np.stack([columns[t] for t in tags], axis=1)
        for start in range(0, len(logged), 5000):
            payloads = []
            for j in range(start, min(start + 5000, len(logged))):
                step = int(logged[j])
                values = [Summary.Value(tag=t, simple_value=float(v))
                          for t, v in zip(tags, matrix[j].tolist(), strict=True)]
                payloads.append(Event(wall_time=1.0 + j, step=step,
                                      summary=Summary(value=values)).SerializeToString())
                for tag, v in (("train/loss", loss[j]), ("lr", 1e-3)):
                    payloads.append(Event(wall_time=1.0 + j, step=step, summary=Summary(
                        value=[Summary.Value(tag=tag, simple_value=float(v))]))
                        .SerializeToString())
            f.write(encode_records(payloads))
        if image_mb > 0:
            side = int(math.sqrt(image_mb * 1e6 / 3))
            pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
            import io

            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG", compress_level=1)
            del pixels
            image = Summary.Image(height=side, width=side, colorspace=3,
                                  encoded_image_string=png.getvalue())
            del png
            event = Event(wall_time=2.0, step=int(logged[-1]),
                          summary=Summary(value=[Summary.Value(tag="attn/maps", image=image)]))
            del image
            f.write(encode_records([event.SerializeToString()]))
    return path


_CHILD = """
import resource, sys, time
start = time.perf_counter()
from lightning_attn.report.command import main
code = main([sys.argv[1], "--output", sys.argv[2], "--no-progress"])
usage = resource.getrusage(resource.RUSAGE_SELF)
import lightning_attn
print("BENCH", time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
      code, lightning_attn.__file__)
"""


def run_report(code: Path, run: Path, out: Path) -> dict:
    """One report in a fresh process with ``code`` first on its path: wall time (from
    before the import), peak resident memory, page size."""
    env = dict(os.environ, PYTHONPATH=str(code))
    started = time.perf_counter()
    # run from the run's folder: `python -c` puts its working directory first on the path
    done = subprocess.run([sys.executable, "-c", _CHILD, str(run), str(out)], env=env,
                          capture_output=True, text=True, cwd=run)
    wall = time.perf_counter() - started
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH")), None)
    if done.returncode or line is None:
        raise SystemExit(f"the report failed ({code}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    _, seconds, cpu, maxrss_kb, status, package = line.split()
    if not Path(package).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"the report ran {package}, not the code at {code}")
    page = out / "report.html"
    return {"seconds": float(seconds), "cpu_seconds": float(cpu), "process_seconds": wall,
            "peak_mb": int(maxrss_kb) / 1024, "page_mb": page.stat().st_size / 1e6,
            "status": int(status), "verdicts": _verdicts(out / "report.md")}


def _verdicts(markdown: Path) -> list[str]:
    """The verdict line of each block, from ``report.md`` (the page can be hundreds of MB:
    reading it here would raise this process's memory, which the next report process would
    count as its own)."""
    return [line.replace("**", "") for line in markdown.read_text(encoding="utf-8").splitlines()
            if line.startswith("**") and "**: " in line]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000, help="training steps of the run")
    p.add_argument("--every", type=int, default=50, help="log every N steps (Lightning: 50)")
    p.add_argument("--image-mb", type=float, default=200.0, help="size of the image (0: none)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the report (median)")
    p.add_argument("--compare", type=Path, action="append", default=[],
                   help="also run the code at this path (a source tree), interleaved")
    p.add_argument("--compare-repeats", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # the child that writes
    args = p.parse_args(argv)
    if args.write:
        write_run(args.write, args.steps, args.every, args.image_mb)
        return 0

    load_before = _uptime()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        # written by a child process: a report process started from this one would count
        # this one's peak memory as its own (ru_maxrss survives fork and exec)
        subprocess.run([sys.executable, __file__, "--write", str(tmp / "run"), "--steps",
                        str(args.steps), "--every", str(args.every), "--image-mb",
                        str(args.image_mb)], check=True)
        event_file = next((tmp / "run").iterdir())
        points = len(range(0, args.steps, args.every))
        print(f"synthetic run: {args.steps} steps logged every {args.every} ({points} points x "
              f"50 tags = {points * 50:,} values), image {args.image_mb:g} MB; event file "
              f"{event_file.stat().st_size / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        codes = [("this code", ROOT, args.repeats)] + [
            (str(c), c, args.compare_repeats) for c in args.compare]
        results: dict[str, list[dict]] = {name: [] for name, _, _ in codes}
        for r in range(max(n for _, _, n in codes)):
            for name, code, n in codes:  # interleaved
                if r < n:
                    res = run_report(code, tmp / "run", tmp / f"out-{len(results[name])}")
                    results[name].append(res)
                    print(f"  {name}: {res['seconds']:.1f} s ({res['cpu_seconds']:.1f} s of "
                          f"CPU), {res['peak_mb']:.0f} MB, page {res['page_mb']:.2f} MB  "
                          f"[{_uptime()}]", flush=True)
    load_after = _uptime()
    print(f"\nload before: {load_before}\nload after:  {load_after}\n")
    print("| code | runs | time (s) | CPU time (s) | peak memory (MB) | page (MB) | verdicts |")
    print("|---|---:|---:|---:|---:|---:|---|")
    summary = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in (
            "seconds", "cpu_seconds", "peak_mb", "page_mb")}
        summary[name] = {**med, "runs": runs}
        words = ", ".join(v.split()[0] for v in runs[0]["verdicts"])
        print(f"| {name} | {len(runs)} | {med['seconds']:.1f} | {med['cpu_seconds']:.1f} | "
              f"{med['peak_mb']:.0f} | {med['page_mb']:.2f} | {words} |")
    print("(medians)")
    mine = summary["this code"]
    missed = [k for k, limit in TARGETS.items() if mine[k] > limit]
    for name in summary:
        if name != "this code" and summary[name]["runs"][0]["verdicts"] != mine["runs"][0][
                "verdicts"]:
            print(f"verdicts differ from {name}")
    print("\ntargets: " + ", ".join(f"{k} <= {v:g}" for k, v in TARGETS.items()) + " -> " + (
        "all met" if not missed else "missed: " + ", ".join(missed)))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "load_before": load_before, "load_after": load_after,
                                         "results": summary}, indent=1))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
