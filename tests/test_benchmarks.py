"""The benchmark scripts' own code paths, on the CPU: what ``make gpu-check`` runs on a GPU.

No GPU here: the GPU command must fail at once with a clear message; its ``--device cpu
--smoke`` path (the same code on tiny shapes, Triton under its interpreter, the same time
budget) must run with nothing but torch, triton and pytest installed, and keep every row
that finished when the budget cuts it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    """benchmarks/gpu_check.py as a module (it imports neither torch nor the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: int = 600, python: str = sys.executable,
         env: dict | None = None) -> subprocess.CompletedProcess:
    if env is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _printed_rows(stdout: str) -> list[str]:
    """The table lines the steps printed as their rows finished."""
    return [ln for ln in stdout.splitlines() if re.match(r"\| (dsa|coord) \|", ln)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_fails_at_once_without_a_gpu():
    start = time.monotonic()
    done = _run("benchmarks/gpu_check.py", timeout=120)
    assert done.returncode == 2, done.stderr
    assert "gpu-check needs a CUDA GPU" in done.stderr
    assert "--device cpu --smoke" in done.stderr
    assert time.monotonic() - start < 60


def test_the_budget_goes_to_the_steps_in_order_of_value():
    """The tests leave half of the budget to the steps after them and the speed table a
    twentieth to the memory step; what a step leaves flows to the next; each keeps the
    report's seconds."""
    gc = _gpu_check()
    budget = 360
    assert gc.STEPS == ("tests", "speed", "memory", "extras")
    assert gc.step_limit("tests", budget, 0) == budget / 2 - gc.REPORT_S
    # the tests took 60 s: the speed table may run until 95 % of the budget
    assert gc.step_limit("speed", budget, 60) == 0.95 * budget - 60 - gc.REPORT_S
    assert gc.step_limit("memory", budget, 300) == budget - 300 - gc.REPORT_S
    assert gc.step_limit("extras", budget, 358) < gc.MIN_STEP_S  # not started
    limits, elapsed = {}, 0.0
    for step in gc.STEPS:  # every step running to its limit still ends inside the budget,
        limits[step] = gc.step_limit(step, budget, elapsed)
        elapsed += max(0.0, limits[step])
    assert elapsed + gc.REPORT_S <= budget
    # and the extras get only what the others leave
    assert min(limits["tests"], limits["speed"], limits["memory"]) > 0 == limits["extras"]


def test_a_cut_test_step_keeps_the_outcomes_of_the_tests_that_finished(tmp_path):
    """Step 1's pytest plugin saves each test's outcome as it finishes and runs the slow
    tests last; a step cut at its limit (its process group killed) still counts what
    finished and names what did not run."""
    gc = _gpu_check()
    tests = tmp_path / "test_cut.py"
    tests.write_text(
        "import time, pytest\n"
        "@pytest.mark.slow\n"
        "def test_slow_runs_last(): pass\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='skipped')\n"
        "def test_skipped(): pass\n"
        "def test_hangs(): time.sleep(600)\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), gc.OUTCOMES_ENV: str(rows)}
    start = time.monotonic()
    status, code = gc.run_step(
        [sys.executable, "-m", "pytest", str(tests), "-p", "benchmarks.gpu_check",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path)],
        limit=6, env=env, log=tmp_path / "log")
    assert (status, code) == ("cut", 124)
    assert time.monotonic() - start < 30
    summary = gc.tests_summary(gc.read_rows(rows))
    assert summary["collected"] == 5 and summary["not_run"] == 2  # hangs, then the slow one
    assert summary["counts"] == {"passed": 1, "failed": 1, "skipped": 1}, summary
    assert [f["test"].split("::")[1] for f in summary["failures"]] == ["test_fails"]
    assert "one is not two" in summary["failures"][0]["message"]
    assert gc._tests_line(summary) == "1 failed, 1 passed, 1 skipped, 2 not run (of 5)"


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_step_ends_itself_at_its_deadline_or_when_the_check_is_killed(tmp_path):
    """A step's process (in a session of its own, so that a cut kills its workers too) stops
    itself at its deadline, and as soon as the check that started it is gone: killed
    without the chance to stop it, it leaves nothing running on a lent machine."""
    gc = _gpu_check()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    step = ("import time; from benchmarks import gpu_check; gpu_check.start_watchdog(); "
            "time.sleep(60)")
    done = subprocess.run([sys.executable, "-c", step], cwd=ROOT, timeout=30,
                          env={**env, gc.DEADLINE_ENV: str(time.time() + 1)})
    assert done.returncode == 124
    check = subprocess.Popen(  # starts a step as run_step does, says its pid, waits
        [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen("
         "[sys.executable, '-c', sys.argv[1]], start_new_session=True); print(p.pid, "
         "flush=True); time.sleep(60)", step], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        text=True)
    pid = int(check.stdout.readline())
    assert not _gone(pid, 0.5)  # running while the check runs
    check.kill()
    check.wait()
    assert _gone(pid, 5), "the step outlived the check"


def _bare_python(tmp_path: Path) -> str:
    """A Python that sees torch, triton and pytest only (and numpy, which Triton's
    interpreter needs on a CPU), with what they require: a virtual environment without pip
    whose one path entry links exactly those distributions' files."""
    site = tmp_path / "site"
    site.mkdir()
    todo, seen = ["torch", "triton", "pytest", "numpy"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "bare.pth").write_text(f"{site}\n")
    return str(venv / "bin" / "python")


def test_a_budget_cut_smoke_run_keeps_its_rows_with_only_torch_triton_and_pytest(tmp_path):
    """``gpu_check.py --device cpu --smoke`` from the source tree in an environment with
    nothing but torch, triton and pytest (no Lightning, no install of this package, no
    PYTHONPATH), under a budget too small for its steps: the budget is kept, every row
    printed before the cut is in gpu-check.jsonl, .json and .md, and the report says which
    step was cut and which was not reached. (A budget in which not even the first row
    finishes on this machine, under its load, is doubled.)"""
    python = _bare_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    missing = _run("-c", "import lightning", python=python, env=env)
    assert missing.returncode == 1 and "No module named 'lightning'" in missing.stderr
    for budget in (16, 32, 64):
        out = tmp_path / f"out{budget}"
        start = time.monotonic()
        done = _run("benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--steps",
                    "speed", "memory", "--budget", str(budget), "--out", str(out),
                    python=python, env=env)
        seconds = time.monotonic() - start
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        report = json.loads((out / "gpu-check.json").read_text())
        if any(r["step"] == "speed" for r in report["rows"]):
            break
    assert seconds < budget + 20
    status = {step: v["status"] for step, v in report["steps"].items()}
    assert set(status.values()) <= {"done", "cut", "not reached"} and set(status) == {
        "speed", "memory"}
    assert status["memory"] != "done", status  # the budget was too small for both
    speed = [r for r in report["rows"] if r["step"] == "speed"]
    assert speed and all("ms" in r for r in speed), speed
    assert speed[0]["variant"] == "seed" and speed[0]["shape"] == [2, 8, 6, 7]
    printed = _printed_rows(done.stdout)
    saved = [json.loads(ln) for ln in (out / "gpu-check.jsonl").read_text().splitlines()]
    assert len(printed) == len(report["rows"]) == len([r for r in saved if "variant" in r])
    md = (out / "gpu-check.md").read_text()
    assert all(line in md for line in printed)
    assert f"Steps: speed {status['speed']}" in md and f"memory {status['memory']}" in md


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_in_its_budget(tmp_path):
    """The whole check on tiny CPU shapes (~2 minutes on an idle machine, 5 at a load of
    8; a budget that no load cuts): the tests on the device (their pass count shown), the
    speed table (seed, compile(seed), triton, torch, plain; fp32 and bf16; every column),
    peak memory in units of x, the extras (autotuned against fixed, compile(triton),
    channels_last, forward only, a per-kernel profile)."""
    done = _run("benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--budget", "1500",
                "--out", str(tmp_path), timeout=1600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert {s: v["status"] for s, v in report["steps"].items()} == dict.fromkeys(
        ("tests", "speed", "memory", "extras"), "done")
    assert report["seconds"] < report["budget_s"]
    tests = report["tests"]
    assert tests["collected"] >= 3 and tests["counts"] == {"passed": tests["collected"]}
    assert f"[gpu-check] tests: {tests['collected']} passed (of {tests['collected']})" in (
        done.stdout)
    rows = {step: [r for r in report["rows"] if r["step"] == step]
            for step in ("speed", "memory", "extras")}
    assert {(r["block"], r["dtype"], r["variant"]) for r in rows["speed"]} == {
        (b, d, v) for b in ("dsa", "coord") for d in ("fp32", "bf16")
        for v in ("seed", "compile(seed)", "triton", "torch", "plain")}
    for r in rows["speed"]:
        assert r["ms"] > 0 and r["peak_bytes"] > 0 and r["floor_share"] > 0, r
        assert r["vs_seed"] > 0 and r["mem_vs_seed"] > 0, r
        assert max(r["diff"]) < 0.1, r  # bf16 rounding apart from the seed, every backend
        if r["variant"] != "seed":
            assert r["vs_compiled_seed"] > 0, r
    assert {(r["layout"], r["variant"]) for r in rows["memory"]} == {
        (lay, v) for lay in ("nchw", "nhwc") for v in ("seed", "plain", "torch", "triton")}
    assert all(r["peak_x"] > 1 for r in rows["memory"])  # y and grad_x at least
    extras = {(r["layout"], r["mode"], r["variant"]) for r in rows["extras"]}
    assert {("nchw", "fwd+bwd", "triton autotune"), ("nchw", "fwd+bwd", "compile(triton)"),
            ("nhwc", "fwd+bwd", "triton"), ("nchw", "fwd", "triton")} <= extras
    assert any(r.get("kernels") for r in rows["extras"])
    md = (tmp_path / "gpu-check.md").read_text()
    assert ("| block | (B,C,H,W) | dtype | layout | pass | variant | ms | x seed | "
            "x compile(seed) | floor | peak MB | peak / seed | max diff y / grad x |") in md
    assert "| kernel | calls | self us |" in md
    assert all(line in md for line in _printed_rows(done.stdout))


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    """benchmarks/memory.py's command line on tiny shapes (the measurement itself, at a size
    where the goals mean something, is test_triton.py's peak-memory test)."""
    out = tmp_path / "memory.json"
    done = _run("benchmarks/memory.py", "--smoke", "--layouts", "nhwc", "--json", str(out),
                "--check")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows} == {"seed", "plain", "torch", "triton"}
    assert {r["block"] for r in rows} == {"dsa", "coord"} and len(rows) == 8
    assert all(r["peak_x"] > 1 for r in rows)  # y and grad_x at least
    assert "goals are not evaluated" in done.stdout


def test_the_accuracy_benchmark_runs_at_the_configs_budget():
    """``--budget config``: the epochs, images and logging interval of the shipped configs
    (the remedy claims at the budget the configs train with); the default stays short."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("accuracy", ROOT / "benchmarks/accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    config = yaml.safe_load((ROOT / "examples/configs/dsa_remedies.yaml").read_text())
    args = accuracy.parse_args(["--budget", "config", "--models", "DSA,DSA + both"])
    assert (args.epochs, args.num_train, args.log_every) == (
        config["trainer"]["max_epochs"], config["data"]["num_train"],
        config["trainer"]["log_every_n_steps"])
    short = accuracy.parse_args(["--epochs", "2"])
    assert (short.epochs, short.num_train, short.log_every) == (2, 4000, 20)
