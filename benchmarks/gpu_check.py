"""``make gpu-check``: the Triton path's GPU tests and benchmark in one command (< 8 minutes).

    python benchmarks/gpu_check.py                     # on a CUDA machine
    python benchmarks/gpu_check.py --out gpu-check     # where gpu-check.json/.md go (.)
    python benchmarks/gpu_check.py --device cpu --smoke  # the same code on tiny CPU shapes

Steps, each with a time limit so that the whole stays under 8 minutes on an H100/H200:

1. CUDA or a clear error at once (exit 2).
2. ``tests/blocks/test_triton.py`` on the GPU (real kernels, TF32 off by the tests' own
   fixture): parity with the seeds' code, compile, CUDA-graph capture, two-GPU placement.
3. ``benchmarks/blocks.py --device cuda`` per block (one process each, so that one block's
   compilations and memory never weigh on the other's): seed, compile(seed), plain, torch,
   triton and compile(triton), forward+backward, at (64,256,56,56), (256,64,32,32),
   (128,1024,14,14) and (8,2048,7,7), fp32 and bf16, NCHW, with a per-kernel profile of each
   step. The compile rows are fp32 at (64,256,56,56) and (128,1024,14,14) only: inductor's
   compilations (and Triton's autotuning, 4 configurations per kernel and shape) dominate
   the time. ``benchmarks/blocks.py --device cuda`` alone measures every row.
4. ``gpu-check.json`` (device, test outcome, every row, the goals missed and the ``auto``
   rules the rows imply: :func:`~lightning_attn.blocks.kernels.backend.rules_from_measurement`)
   and ``gpu-check.md`` (the tables).

Exit status: 1 when the tests fail, 0 otherwise (missed goals are reported, not fatal: this
is a measurement). ``--smoke`` runs a subset of the tests under Triton's interpreter and the
benchmark on tiny shapes, to check this script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
#: Seconds for each step: the whole stays under 8 minutes whatever the machine (a benchmark
#: cut short keeps the shapes it finished; the report says which step was cut).
LIMITS = {"tests": 180, "bench": 140}
SMOKE_LIMITS = {"tests": 300, "bench": 300}


def _run(cmd: list[str], limit: int, env: dict) -> tuple[int, str, float]:
    """``(returncode, output tail, seconds)``; 124 when cut at ``limit`` seconds."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = 124
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(
            exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n(cut after {limit} s)"
    return code, out[-4000:], time.monotonic() - start


def _env(smoke: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # real kernels
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true",
                        help="with --device cpu: tiny shapes, a few tests (checks the script)")
    parser.add_argument("--out", default=".", help="folder for gpu-check.json and .md")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark only")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu only with --smoke (the GPU check needs a GPU)")

    import torch  # after argument errors: importing torch takes seconds

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run it where "
              "a GPU is visible; `python benchmarks/gpu_check.py --device cpu --smoke` checks "
              "the script itself on a CPU.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = SMOKE_LIMITS if args.smoke else LIMITS
    env = _env(args.smoke)
    py = sys.executable
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke)"
    report: dict = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke}
    started = time.monotonic()

    if not args.skip_tests:
        tests = [py, "-m", "pytest", "tests/blocks/test_triton.py", "-q", "-x",
                 "-p", "no:cacheprovider"]
        if args.smoke:
            tests += ["-k", "ops_name_bad_arguments or grid_fills"]
        print(f"[gpu-check] tests on {device_name} ...", flush=True)
        code, tail, secs = _run(tests, limits["tests"], env)
        summary = tail.strip().splitlines()[-1] if tail.strip() else ""
        report["tests"] = {"returncode": code, "seconds": round(secs, 1), "summary": summary,
                           "tail": tail if code else ""}
        print(f"[gpu-check] tests: {summary} ({secs:.0f} s)", flush=True)

    rows, failures, benches = [], [], {}
    for block in ("dsa", "coord"):
        part = out / f"gpu-check-{block}.json"
        part.unlink(missing_ok=True)
        bench = [py, "benchmarks/blocks.py", "--blocks", block, "--modes", "fwd+bwd",
                 "--profile", "--json", str(part)]
        if args.smoke:
            bench += ["--device", "cpu", "--smoke", "--shapes", "2,16,5,7", "--dtypes", "bf16",
                      "--layouts", "nhwc"]
        else:
            bench += ["--device", "cuda", "--dtypes", "fp32", "bf16", "--min-run-time", "0.05",
                      "--compile-dtypes", "fp32", "--compile-shapes", "64,256,56,56",
                      "128,1024,14,14"]
        print(f"[gpu-check] benchmark {block} ...", flush=True)
        code, tail, secs = _run(bench, limits["bench"], env)
        benches[block] = {"returncode": code, "seconds": round(secs, 1),
                          "tail": tail if code else ""}
        if part.exists():  # written after every shape: a cut run keeps what it measured
            data = json.loads(part.read_text())
            rows += data["rows"]
            failures += data["meta"].get("goal_failures", [])
            part.unlink()
        print(f"[gpu-check] benchmark {block}: exit {code} ({secs:.0f} s)", flush=True)
    report["benchmarks"] = benches
    report["rows"] = rows
    report["goal_failures"] = [] if args.smoke else failures

    sys.path.insert(0, str(_ROOT))
    from benchmarks.blocks import kernel_tables, markdown_table
    from lightning_attn.blocks.kernels.backend import rules_from_measurement

    rules = [] if args.smoke else rules_from_measurement(rows)
    report["auto_rules"] = [rule.__dict__ for rule in rules]
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    tests = report.get("tests", {})
    md = [f"# gpu-check: {device_name}", "",
          f"torch {torch.__version__}; {report['seconds']:.0f} s in all; tests: "
          f"{tests.get('summary', 'skipped')}", "", markdown_table(rows), "",
          "Triton goals (fwd+bwd): " + ("met" if not report["goal_failures"] else
                                        "missed: " + "; ".join(report["goal_failures"])),
          "", "auto rules the measurement implies (paste into backend.CUDA_RULES):", ""]
    md += [f"- {rule!r}" for rule in rules] or ["- none: plain stays the default"]
    md += ["", kernel_tables(rows)]
    (out / "gpu-check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:6 + len(rows)]))
    print(f"[gpu-check] wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'} "
          f"({report['seconds']:.0f} s)")
    return 1 if tests.get("returncode", 0) not in (0,) else 0


if __name__ == "__main__":
    sys.exit(main())
