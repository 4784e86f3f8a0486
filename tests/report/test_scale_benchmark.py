"""``benchmarks/report_scale.py``'s own code path on a tiny run (the figures come from the
full size, see docs/performance.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_benchmark_writes_a_run_reports_it_and_measures(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "benchmarks/report_scale.py", "--steps", "3000", "--image-mb", "3",
         "--repeats", "1", "--json", str(tmp_path / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: a target missed (a busy box)
    result = json.loads((tmp_path / "out.json").read_text())["results"]["this code"]
    assert result["peak_mb"] > 50 and 0 < result["cpu_seconds"] <= result["seconds"] * 2
    assert 0 < result["page_mb"] < 20
    (run,) = result["runs"]
    assert len(run["verdicts"]) == 4 and run["verdicts"][2].startswith("problem: saturated")
    assert "load before:" in done.stdout and "| this code | 1 |" in done.stdout
