"""``make gpu-check``: the Triton path on a GPU in one command and one time budget (6 minutes).

    python benchmarks/gpu_check.py                     # on a CUDA machine, from the source tree
    python benchmarks/gpu_check.py --budget 540        # more time, more rows
    python benchmarks/gpu_check.py --out gpu-check     # where the reports go (.)
    python benchmarks/gpu_check.py --device cpu --smoke  # the same code on tiny CPU shapes

Needs only torch, triton and pytest (no pip, no network, no ``make setup``): it runs from
the source tree, which it puts on ``PYTHONPATH`` itself (docs/performance.md: carrying the
package to a bare machine).

Steps, in order of value, under one budget (``--budget``, seconds, default 360):

1. ``tests``: ``tests/blocks/test_triton.py`` on the device (real kernels, TF32 off by the
   tests' own fixture): parity with the seeds' code, bitwise determinism, compile,
   CUDA-graph capture; the tests marked slow run last.
2. ``speed``: both blocks at the four goal shapes, fp32 and bf16, forward+backward: the seed,
   ``torch.compile(seed)``, ``triton``, ``torch`` and ``plain`` (the goal shape first).
   Per row: ms, speed-up against the seed and against compile(seed), share of the 7-pass
   floor, peak memory and its ratio to the seed's, the largest difference of ``y`` and
   ``grad_x`` from the seed's.
3. ``memory``: peak memory in units of ``x`` of seed, plain, torch and triton at the same
   shapes, NCHW and channels_last (``benchmarks/memory.py``'s measurement).
4. ``extras``: the Triton path autotuned (opt-in) against its fixed configurations,
   ``torch.compile(triton)``, channels_last speed, forward only, per-kernel profiles.

Each step runs in a child process with the time the budget has left (:func:`step_limit`: the
tests leave half of the budget to the steps after them, the speed table a twentieth to the
memory step) and is stopped when it is spent. Every row and every test outcome is printed
and appended to ``gpu-check.jsonl`` as it finishes, and ``gpu-check.json`` / ``gpu-check.md``
are rewritten after every step, so a cut run still gives its table; the report says which
step was cut and which were not reached.

Exit status: 2 without a GPU (at once), 1 when a test fails or a step crashes, 0 otherwise
(a cut step is reported, not fatal; missed goals are a measurement, not a failure).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
#: Default budget of the whole check, seconds: a lent GPU machine runs ten minutes.
BUDGET_S = 360
#: The steps, in order of value.
STEPS = ("tests", "speed", "memory", "extras")
#: Share of the budget held back for the steps after each one while it runs.
RESERVE_AFTER = {"tests": 0.5, "speed": 0.05, "memory": 0.0, "extras": 0.0}
#: Seconds kept to write the report at the end.
REPORT_S = 3.0
#: A step with less time than this is not started.
MIN_STEP_S = 2.0
#: The test step's selection on a GPU: all but the sm_90 compile tests, which need no GPU
#: (CI runs them) and would spend a minute of the budget in the compiler.
DEVICE_TESTS = "not compile_for_an_h100 and not every_autotune_config_compiles"
#: ... and in a smoke run (the interpreter runs the whole file in minutes).
SMOKE_TESTS = "ops_name_bad_arguments or grid_fills or opt_in"
SPEED_VARIANTS = ("seed", "compile(seed)", "triton", "torch", "plain")
MEMORY_VARIANTS = ("seed", "plain", "torch", "triton")
DTYPES = ("fp32", "bf16")
BLOCKS = ("dsa", "coord")
#: The smoke run's one shape, and its dtypes where the GPU's steps take both (step 2 keeps
#: both: the table's code for each).
SMOKE_SHAPES = [(2, 8, 6, 7)]
SMOKE_DTYPES = ("fp32",)
#: Where the pytest plugin of the test step writes its outcomes.
OUTCOMES_ENV = "GPU_CHECK_OUTCOMES"
#: When a step's process ends itself (epoch seconds), should this process be gone.
DEADLINE_ENV = "GPU_CHECK_DEADLINE"


def step_limit(step: str, budget: float, elapsed: float) -> float:
    """Seconds ``step`` may run when ``elapsed`` of ``budget`` are spent: what is left,
    minus the report's time and the share of the budget held for the steps after it."""
    return budget - elapsed - REPORT_S - RESERVE_AFTER[step] * budget


# ------------------------------------------------------------------------------------------
# Rows: printed and saved as each finishes
# ------------------------------------------------------------------------------------------


def append_row(path: str | Path, row: dict) -> None:
    """One JSON line, flushed at once (a killed step keeps every line written before)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def read_rows(path: Path) -> list[dict]:
    """Every complete line of ``path`` (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def start_watchdog() -> None:
    """In a step's process: end it at the deadline of :data:`DEADLINE_ENV`, or as soon as
    the check that started it is gone (killed without the chance to stop it), so that no
    step outlives the budget on a lent machine."""
    deadline = float(os.environ.get(DEADLINE_ENV, "inf"))
    parent = os.getppid()

    def watch():
        while time.time() < deadline and os.getppid() == parent:
            time.sleep(0.5)
        os._exit(124)

    threading.Thread(target=watch, name="gpu-check watchdog", daemon=True).start()


# ------------------------------------------------------------------------------------------
# Step 1's pytest plugin (``-p benchmarks.gpu_check``; inert without GPU_CHECK_OUTCOMES)
# ------------------------------------------------------------------------------------------


def pytest_configure(config) -> None:
    if os.environ.get(OUTCOMES_ENV):
        start_watchdog()


def pytest_collection_modifyitems(config, items) -> None:
    if os.environ.get(OUTCOMES_ENV):  # the slow tests last (a stable sort keeps the order)
        items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def pytest_collection_finish(session) -> None:
    if os.environ.get(OUTCOMES_ENV):
        append_row(os.environ[OUTCOMES_ENV], {"step": "tests", "collected": len(session.items)})


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get(OUTCOMES_ENV)
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    message = ""
    if report.failed:  # the exception's first line: "AssertionError: ..."
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else report.longreprtext
        message = (text.strip().splitlines() or [""])[0][:300]
    append_row(path, {"step": "tests", "test": report.nodeid, "outcome": outcome,
                      "when": report.when, "seconds": round(report.duration, 2),
                      "message": message})


# ------------------------------------------------------------------------------------------
# Steps 2-4, in the child process
# ------------------------------------------------------------------------------------------


class _Worker:
    """One step's measurements on one device: each row printed and saved when done."""

    def __init__(self, step: str, rows_path: str, device_name: str, smoke: bool) -> None:
        sys.path.insert(0, str(_ROOT))
        import torch

        from benchmarks import blocks, measure

        self.torch, self.measure, self.blocks = torch, measure, blocks
        self.step, self.rows_path, self.smoke = step, rows_path, smoke
        self.device = torch.device(device_name)
        blocks.configure_device(self.device)
        self.shapes = SMOKE_SHAPES if smoke else measure.GPU_SHAPES
        self.more_dtypes = SMOKE_DTYPES if smoke else DTYPES  # steps 3 and 4
        self.min_run_time = 0.005 if smoke else 0.1
        # inductor's C++ code generation takes minutes on a small CPU
        self.compile_backend = "aot_eager" if self.device.type == "cpu" else "inductor"
        self.bandwidth = None

    def emit(self, row: dict, line: str) -> None:
        append_row(self.rows_path, {"step": self.step, **row})
        print(line, flush=True)

    def group(self, kind, shape, dtype, layout, variants):
        if self.bandwidth is None:
            self.bandwidth = self.measure.copy_bandwidth(
                self.device, 2**22 if self.smoke else 2**28)
            append_row(self.rows_path, {"step": self.step, "meta": True,
                                        "bandwidth_gbs": self.bandwidth / 1e9})
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
        self.torch._dynamo.reset()
        compile_backend = self.compile_backend if any(
            v.startswith("compile(") for v in variants) else None
        return self.measure.VariantGroup(kind, shape, dtype, layout, self.device, variants,
                                         compile_backend, self.bandwidth)

    def rows(self, kind, shape, dtype, layout, variants, mode="fwd+bwd", kernels=False):
        group = self.group(kind, shape, dtype, layout, variants)
        for variant in variants:
            row = group.measure(variant, mode, self.min_run_time, kernels=kernels)
            self.emit(row, self.measure.table_row(row))
        del group

    def speed(self) -> None:
        print(self.measure.TABLE_HEADER, flush=True)
        for shape in self.shapes:
            for dtype in DTYPES:
                for kind in BLOCKS:
                    self.rows(kind, shape, dtype, "nchw", SPEED_VARIANTS)

    def memory(self) -> None:
        from benchmarks import memory

        print(MEMORY_HEADER, flush=True)
        for shape in self.shapes:
            for dtype in self.more_dtypes:
                for layout in ("nchw", "nhwc"):
                    for kind in BLOCKS:
                        for row in memory.measure_rows(kind, shape, dtype, layout,
                                                       self.device, MEMORY_VARIANTS):
                            self.emit(row, memory_line(row))

    def extras(self) -> None:
        goal = self.shapes[0]
        autotune = self.measure.TRITON_AUTOTUNE
        print(self.measure.TABLE_HEADER, flush=True)
        for dtype in self.more_dtypes:
            for kind in BLOCKS:
                self.rows(kind, goal, dtype, "nchw", ("seed", "triton", autotune))
        for dtype in self.more_dtypes:
            for kind in BLOCKS:
                self.rows(kind, goal, dtype, "nchw", ("seed", "compile(triton)"))
        for dtype in self.more_dtypes:
            for kind in BLOCKS:
                self.rows(kind, goal, dtype, "nhwc", ("seed", "triton", "torch", "plain"))
        for kind in BLOCKS:
            self.rows(kind, goal, "fp32", "nchw", ("seed", "triton", "torch", "plain"), "fwd")
        for kind in BLOCKS:
            self.rows(kind, goal, "fp32", "nchw", ("seed", "triton"), kernels=True)


MEMORY_HEADER = ("| block | (B,C,H,W) | dtype | layout | variant | peak MB | peak (x) | "
                 "/ seed |\n" + "|---" * 8 + "|")


def memory_line(r: dict) -> str:
    ratio = "-" if r.get("vs_seed") is None else f"{r['vs_seed']:.2f}"
    return (f"| {r['block']} | {tuple(r['shape'])} | {r['dtype']} | {r['layout']} | "
            f"{r['variant']} | {r['peak_bytes'] / 2**20:.3g} | {r['peak_x']:.2f} | {ratio} |")


def worker_main(step: str, rows_path: str, device: str, smoke: bool) -> int:
    start_watchdog()
    worker = _Worker(step, rows_path, device, smoke)
    getattr(worker, step)()
    return 0


# ------------------------------------------------------------------------------------------
# The parent: steps under the budget, the report
# ------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """SIGTERM or SIGINT: stop the running step, write the report."""


def _stop(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def _kill(proc: subprocess.Popen) -> None:
    """The step's process and everything it started (inductor's compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_step(cmd: list[str], limit: float, env: dict, log: Path | None = None) -> tuple[str, int]:
    """``(status, exit code)``: ``"done"``, ``"failed"`` or ``"cut"`` (after ``limit``
    seconds, the process group killed; exit code 124). The step's output goes to this
    process's stdout, or to ``log``."""
    sys.stdout.flush()
    env = {**env, DEADLINE_ENV: str(time.time() + limit + 5)}  # its own stop, should we die
    out = open(log, "w") if log else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT if out else None, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        return ("done" if code == 0 else "failed"), code
    except subprocess.TimeoutExpired:
        _kill(proc)
        return "cut", 124
    except BaseException:
        _kill(proc)
        raise
    finally:
        if out:
            out.close()


def _child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    env.pop("LIGHTNING_ATTN_TRITON_AUTOTUNE", None)  # the default: fixed configurations
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # real kernels
    return env


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def tests_summary(rows: list[dict]) -> dict:
    """Counts of the test step's outcomes, the tests not run, and the failures."""
    collected = next((r["collected"] for r in rows if "collected" in r), None)
    outcomes = [r for r in rows if "outcome" in r]
    counts: dict[str, int] = {}
    for r in outcomes:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    ran = {r["test"] for r in outcomes}
    return {"collected": collected, "counts": counts,
            "not_run": None if collected is None else collected - len(ran),
            "failures": [r for r in outcomes if r["outcome"] in ("failed", "error")]}


def _tests_line(summary: dict) -> str:
    if summary["collected"] is None:
        return "not collected"
    parts = [f"{n} {k}" for k, n in sorted(summary["counts"].items())] or ["none finished"]
    if summary["not_run"]:
        parts.append(f"{summary['not_run']} not run")
    return ", ".join(parts) + f" (of {summary['collected']})"


def write_report(out: Path, report: dict, rows: list[dict]) -> None:
    """gpu-check.json (everything) and gpu-check.md (the tables), from what is there."""
    from benchmarks import blocks, measure
    from lightning_attn.blocks.kernels.backend import rules_from_measurement

    by_step = {s: [r for r in rows if r.get("step") == s and not r.get("meta")] for s in STEPS}
    # compared with the seed (and compile(seed)) of their own group when measured
    speed, extras = by_step["speed"], by_step["extras"]
    tests = tests_summary(by_step["tests"])
    report["tests"] = tests
    report["bandwidth_gbs"] = next((r["bandwidth_gbs"] for r in rows if r.get("meta")), None)
    report["rows"] = speed + by_step["memory"] + extras
    smoke = report["smoke"]
    report["goal_failures"] = [] if smoke else blocks.goal_failures(speed)
    rules = [] if smoke else rules_from_measurement([r for r in speed if "ms" in r])
    report["auto_rules"] = [rule.__dict__ for rule in rules]
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))

    steps = "; ".join(f"{name} {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s
                                                   else "")
                      for name, s in report["steps"].items())
    md = [f"# gpu-check: {report['device']}", "",
          f"torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}, "
          f"Python {report['python']}; budget {report['budget_s']:.0f} s, "
          f"{report.get('seconds', 0):.0f} s used; load average (1, 5, 15 min) at the start "
          f"{report['load_start']}, at the end {report.get('load_end', '-')}; copy bandwidth "
          + (f"{report['bandwidth_gbs']:.0f} GB/s" if report["bandwidth_gbs"] else "-"),
          "", f"Steps: {steps}.", "",
          "## 1. Tests (tests/blocks/test_triton.py)", "", _tests_line(tests)]
    md += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"]]
    md += ["", "## 2. Speed, forward+backward", "", measure.markdown_table(speed), "",
           "ms: median; x seed, x compile(seed): speed-up against them; floor: share of 7 "
           "passes over x's bytes at the copy bandwidth; peak: memory the step holds beyond "
           "its inputs; max diff: against the seed's y and grad_x.", "",
           "Triton goals (>= 2.5x the seed, >= 2x compile(seed), >= 60 % of the floor, peak "
           "<= 0.7x): " + ("not evaluated (smoke run)" if smoke else "met" if not
                           report["goal_failures"] else "missed: "
                           + "; ".join(report["goal_failures"])), "",
           "`auto` rules the rows imply (backend.CUDA_RULES / use_measured_rules):", ""]
    md += [f"- {rule!r}" for rule in rules] or ["- none: plain stays the default"]
    md += ["", "## 3. Peak memory, in units of x", "", MEMORY_HEADER,
           *(memory_line(r) for r in by_step["memory"]), "",
           "## 4. Extras", "", measure.markdown_table(extras), "",
           measure.kernel_tables(extras)]
    (out / "gpu-check.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true",
                        help="with --device cpu: tiny shapes, a few tests (checks the script)")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S})")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS,
                        help="which steps (default all, in this order)")
    parser.add_argument("--out", default=".", help="folder for gpu-check.json, .md, .jsonl")
    parser.add_argument("--worker", choices=STEPS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.rows, args.device, args.smoke)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu only with --smoke (the GPU check needs a GPU)")
    if args.budget <= 0:
        parser.error(f"--budget must be positive seconds, got {args.budget}")
    started = time.monotonic()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())

    import torch  # after argument errors: importing torch takes seconds

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Run it where "
              "a GPU is visible; `python benchmarks/gpu_check.py --device cpu --smoke` checks "
              "the script itself on a CPU.", file=sys.stderr)
        return 2
    sys.path.insert(0, str(_ROOT))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "gpu-check.jsonl"
    rows_path.unlink(missing_ok=True)
    env = _child_env(args.smoke)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke)"
    report = {"device": device_name, "torch": torch.__version__, "triton": _version("triton"),
              "cuda": torch.version.cuda, "python": platform.python_version(),
              "smoke": args.smoke, "budget_s": args.budget, "load_start": load_start,
              "steps": {s: {"status": "not reached"} for s in args.steps}}
    print(f"[gpu-check] {device_name}; torch {torch.__version__}, triton {report['triton']}; "
          f"budget {args.budget:.0f} s; load {load_start}", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    failed = False
    try:
        for step in args.steps:
            elapsed = time.monotonic() - started
            limit = step_limit(step, args.budget, elapsed)
            if limit < MIN_STEP_S:
                print(f"[gpu-check] {step}: not reached ({elapsed:.0f} s of the budget spent)",
                      flush=True)
                continue
            print(f"\n[gpu-check] {step} (at most {limit:.0f} s)", flush=True)
            start = time.monotonic()
            if step == "tests":
                cmd = [sys.executable, "-m", "pytest", "tests/blocks/test_triton.py",
                       "-p", "benchmarks.gpu_check", "-p", "no:cacheprovider"]
                cmd += ["-k", SMOKE_TESTS if args.smoke else DEVICE_TESTS]
                status, code = run_step(cmd, limit, {**env, OUTCOMES_ENV: str(rows_path)},
                                        log=out / "gpu-check-tests.log")
                status = "done" if code == 1 else status  # test failures: counted below
                summary = tests_summary([r for r in read_rows(rows_path)
                                        if r.get("step") == "tests"])
                failed |= bool(summary["failures"])
                print(f"[gpu-check] tests: {_tests_line(summary)}", flush=True)
                for f in summary["failures"]:
                    print(f"  FAILED {f['test']}: {f['message']}", flush=True)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", step,
                       "--rows", str(rows_path), "--device", args.device]
                status, code = run_step(cmd + (["--smoke"] if args.smoke else []), limit, env)
            seconds = time.monotonic() - start
            report["steps"][step] = {"status": status, "seconds": round(seconds, 1),
                                     "limit": round(limit, 1), "exit": code}
            failed |= status == "failed"
            print(f"[gpu-check] {step}: {status} ({seconds:.0f} s)", flush=True)
            report["seconds"] = time.monotonic() - started
            write_report(out, report, read_rows(rows_path))
    except (_Stopped, KeyboardInterrupt) as exc:
        print(f"[gpu-check] stopped ({exc or 'interrupt'}): writing what was measured",
              flush=True)
        failed = True
    report["seconds"] = time.monotonic() - started
    report["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    write_report(out, report, read_rows(rows_path))
    print(f"\n[gpu-check] wrote {out / 'gpu-check.md'}, .json and .jsonl "
          f"({report['seconds']:.0f} s of {args.budget:.0f})")
    print("".join(f"[gpu-check] {s}: {v['status']}\n" for s, v in report["steps"].items()),
          end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
