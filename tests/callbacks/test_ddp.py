"""2-process CPU DDP (gloo): logged statistics are those of the global batch, on every rank,
eager and compiled."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .cb_models import offline_stats

SCRIPT = Path(__file__).with_name("ddp_script.py")


def point_collectives(counted: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The collectives of each point that ``ddp_script.COLLECTIVES`` counted, after
    checking that reading the finished training points ran none (and did run)."""
    reads = [n for method, n in counted if method == "read_later"]
    assert reads and not any(reads), counted
    return [(method, n) for method, n in counted if method != "read_later"]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_ddp_statistics_equal_offline_on_concatenated_shards(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), mode],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): r for r in csv.DictReader(f) if r.get("attn/block/mask/std")}
    assert sorted(logged) == [1, 3]  # Lightning's logging steps (log_every_n_steps=2)

    # One collective per point (two training points and one validation run), on each rank,
    # when the point ends; none when the training points are read (a local host copy).
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    assert point_collectives(ranks[0]["collectives"]) == [
        ("finish_later", 1), ("finish_later", 1), ("finish", 1)]

    # Every rank computed the same global statistics (same warning decisions everywhere).
    assert [s.step for s in ranks[0]["stats"]] == [1, 3]
    assert ranks[0]["stats"] == ranks[1]["stats"]

    for step, row in logged.items():
        shards = [torch.cat([x for s, x in r["seen"] if s == step]) for r in ranks]
        assert not torch.equal(shards[0], shards[1])  # the ranks saw different data
        for name, value in offline_stats(torch.cat(shards), k=3).items():
            assert float(row[f"attn/block/{name}"]) == pytest.approx(value, rel=1e-5, abs=1e-6)
        # ``extra`` ran on rank 0 only: its statistics are those of rank 0's shard.
        for name, value in offline_stats(shards[0], k=2).items():
            assert float(row[f"attn/extra/{name}"]) == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert "attn/block/param/temperature_grad_norm" in row

    # The validation run's statistics are logged once, already reduced, at the step of the
    # module's own val/loss, without Lightning's per-tag sync_dist advice (our one collective
    # reduced them; they are written by the writer seam, not through LightningModule.log).
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val_rows = [r for r in rows if r.get("val/attn/block/mask/std")]
    loss_steps = {r["step"] for r in rows if r.get("val/loss")}
    assert len(val_rows) == 1 and val_rows[0]["step"] in loss_steps
    assert not [w for w in ranks[0]["warnings"] if "sync_dist=True" in w], ranks[0]["warnings"]
