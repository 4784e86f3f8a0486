"""The benchmark scripts' own code paths, on the CPU: what ``make gpu-check`` runs on a GPU.

No GPU here: the GPU command must fail at once with a clear message, and its ``--device cpu
--smoke`` path (the same code on tiny shapes, Triton under its interpreter) must produce the
JSON and Markdown it writes on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_check_fails_at_once_without_a_gpu():
    start = time.monotonic()
    done = _run("benchmarks/gpu_check.py", timeout=120)
    assert done.returncode == 2, done.stderr
    assert "gpu-check needs a CUDA GPU" in done.stderr
    assert "--device cpu --smoke" in done.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_gpu_check_smoke_writes_the_json_and_markdown(tmp_path):
    """The benchmark step of ``make gpu-check`` (both blocks, every variant, a per-kernel
    profile, x.grad cleared before the memory base) on a tiny shape (~40 s)."""
    done = _run("benchmarks/gpu_check.py", "--device", "cpu", "--smoke", "--skip-tests",
                "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["smoke"] and report["benchmarks"]["dsa"]["returncode"] == 0
    variants = {(r["block"], r["variant"]) for r in report["rows"]}
    for block in ("dsa", "coord"):
        for v in ("seed", "compile(seed)", "plain", "torch", "triton", "compile(triton)"):
            assert (block, v) in variants
    for r in report["rows"]:
        assert r["dtype"] == "bf16" and r["layout"] == "nhwc" and r["mode"] == "fwd+bwd"
        assert r["kernels"] and r["ms"] > 0
        # bf16 rounding apart from the seed, every backend
        assert max(r["diff"]) < 0.1, r
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| block | (B,C,H,W) | dtype | layout | pass | variant |" in md
    assert "| kernel | calls | self us |" in md
    assert not list(tmp_path.glob("gpu-check-*.json"))  # the per-block parts are merged


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
