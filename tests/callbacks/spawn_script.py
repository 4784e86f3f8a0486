"""A 2-process ``ddp_spawn`` fit (CPU, gloo) for test_runs.py: after ``fit`` the main process's
callback must hold the run's state (run_id, points, latest statistics and problems).

Usage: ``python tests/callbacks/spawn_script.py OUT_DIR``. Writes ``OUT_DIR/rank0.json`` (the
callback in the rank-0 worker, at the end of its fit) and ``OUT_DIR/main.json`` (the main
process's callback after ``fit`` returned).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from cb_models import FakeNet, make_data  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

from lightning_attn.callbacks import AttentionDiagnostics  # noqa: E402


def summary(diag: AttentionDiagnostics) -> dict:
    return {
        "run_id": diag.run_id,
        "num_points": diag.num_points,
        "last_step": None if diag.last_stats is None else diag.last_stats.step,
        "reported": dict(diag._reporter.reported),
        "last_problems": [p.kind for p in diag.last_problems],
    }


class Dump(Callback):
    def __init__(self, diag: AttentionDiagnostics, out_dir: str) -> None:
        self.diag, self.out_dir = diag, out_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            with open(os.path.join(self.out_dir, "rank0.json"), "w") as f:
                json.dump(summary(self.diag), f)


def constant(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, 0.5)  # a collapsed mask on every rank


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    diag = AttentionDiagnostics(num_images=0, summary=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, log_every_n_steps=2,
        logger=False, callbacks=[diag, Dump(diag, out_dir)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(FakeNet(data=make_data(64), batch_size=4, transform=constant))
    with open(os.path.join(out_dir, "main.json"), "w") as f:
        json.dump(summary(diag), f)


if __name__ == "__main__":
    main(sys.argv[1])
