"""2-process CPU DDP (gloo): the head statistics of the five transformers are those of the
global batch, on every rank, exact to the float64 oracle; one collective per point."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..blocks.head_models import FiveTransformers, hidden_below
from ..blocks.head_oracle import captured_sdpa, head_error, oracle_heads
from .test_ddp import point_collectives

SCRIPT = Path(__file__).with_name("heads_ddp_script.py")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_head_statistics_equal_the_oracle_on_concatenated_shards(tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=Path(__file__).parents[2], env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["collectives"] == ranks[1]["collectives"]
    assert point_collectives(ranks[0]["collectives"]) == [("finish_later", 1)] * 2
    assert [s.step for s in ranks[0]["stats"]] == [1, 3]
    assert ranks[0]["stats"] == ranks[1]["stats"]  # every rank has the global statistics
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): r for r in csv.DictReader(f)
                  if r.get("attn/net.vit.blocks.0.attn/heads/max_logit")}
    assert sorted(logged) == [1, 3]

    names = list(ranks[0]["stats"][0].blocks)
    assert len(names) == 6  # vit, swin's two window attentions, encoder, llama, bert
    worst = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same float32 sums in every kernel
    try:
        for stats in ranks[0]["stats"]:
            shards = [next(b for s, b in r["seen"] if s == stats.step) for r in ranks]
            assert not torch.equal(shards[0]["images"], shards[1]["images"])
            model = FiveTransformers()
            model.load_state_dict(ranks[0]["weights"][stats.step])
            per_shard = []
            for shard in shards:  # each rank's forward (with autograd: the same SDPA
                with captured_sdpa() as calls:  # kernels), then the global batch's sums
                    model(**shard)
                per_shard.append([oracle_heads(c, hidden_below(n))
                                  for n, c in zip(names, calls, strict=True)])
            row = logged[stats.step]
            for i, name in enumerate(names):
                heads = stats.blocks[name].heads
                worst = max(worst, head_error(heads, _combined([p[i] for p in per_shard])))
                assert float(row[f"attn/{name}/heads/max_logit"]) == pytest.approx(
                    heads.max_logit)
                assert float(row[f"attn/{name}/heads/entropy_min"]) == pytest.approx(
                    heads.entropy_min)
    finally:
        torch.set_num_threads(threads)
    assert worst < 1e-6, worst


def _combined(shards: list[list[dict]]) -> list[dict]:
    """Per-head oracle values of several shards as one batch: counted means, the max."""
    out = []
    for heads in zip(*shards, strict=True):
        count = sum(h["count"] for h in heads)
        out.append({
            "count": count, "max_logit": max(h["max_logit"] for h in heads),
            **{q: sum(h[q] * h["count"] for h in heads if h["count"]) / count
               for q in ("entropy", "sink")},
        })
    return out
