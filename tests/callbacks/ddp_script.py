"""2-process CPU DDP run for test_cb_ddp.py (Lightning's launcher re-executes this script).

Usage: ``python tests/callbacks/ddp_script.py OUT_DIR [compiled]``. Each rank writes
``OUT_DIR/rank<r>.pt`` with the batches its blocks saw and the statistics its callback
computed; rank 0's CSVLogger writes what was logged. With ``compiled``, the main block runs
under ``torch.compile`` (inductor) in every process.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from cb_models import FakeBlock, FakeNet, make_data  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightning_attn.callbacks import AttentionDiagnostics  # noqa: E402
from lightning_attn.callbacks.collector import StatisticsCollector  # noqa: E402

#: Collectives run inside each StatisticsCollector.finish / finish_later (one entry per
#: logging point) and read_later (one per batch of training points read): (method, count).
COLLECTIVES: list[tuple[str, int]] = []
_NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "barrier", "broadcast",
          "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list")


def _count_collectives() -> None:
    counting = {"on": False, "n": 0}
    for name in _NAMES:
        original = getattr(torch.distributed, name)

        def wrapped(*args, _original=original, **kwargs):
            if counting["on"]:
                counting["n"] += 1
            return _original(*args, **kwargs)

        setattr(torch.distributed, name, wrapped)
    for method in ("finish", "finish_later", "read_later"):
        original = getattr(StatisticsCollector, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            counting.update(on=True, n=0)
            try:
                return _original(self, *args, **kwargs)
            finally:
                counting["on"] = False
                COLLECTIVES.append((_method, counting["n"]))

        setattr(StatisticsCollector, method, counted)


class TwoBlockNet(FakeNet):
    """FakeNet plus ``extra``, a block that runs a forward on rank 0 only.

    Rank 1 must still join every reduction with zeros for it (no deadlock), and its
    statistics are those of rank 0's batches alone.
    """

    def __init__(self, compiled: bool = False) -> None:
        super().__init__(data=make_data(64), batch_size=4, keep_batches=True)
        self.extra = FakeBlock(num_branches=2)
        self.extra.gain.requires_grad_(False)
        if compiled:
            self.block = torch.compile(self.block, fullgraph=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.global_rank == 0:
            self.extra(x)
        return out

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(make_data(16, seed=1), batch_size=4)


class Dump(Callback):
    def __init__(self, diag: AttentionDiagnostics, out_dir: str) -> None:
        self.diag, self.out_dir, self.stats = diag, out_dir, []
        self.warnings: list[str] = []  # filled by main()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = self.diag.last_stats
        if last is not None and (not self.stats or self.stats[-1].step != last.step):
            self.stats.append(last)

    def on_train_end(self, trainer, pl_module) -> None:
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt")
        torch.save({"seen": pl_module.seen, "stats": self.stats, "warnings": self.warnings,
                    "collectives": list(COLLECTIVES)}, path)


def main(out_dir: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    _count_collectives()
    diag = AttentionDiagnostics(num_images=0, summary=False)
    dump = Dump(diag, out_dir)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        log_every_n_steps=2,
        val_check_interval=4,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=CSVLogger(out_dir, name="csv", version=0),
        callbacks=[diag, dump],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TwoBlockNet(compiled))
    dump.warnings = [str(w.message) for w in caught]
    dump.on_train_end(trainer, trainer.lightning_module)  # again, with the warnings


if __name__ == "__main__":
    main(sys.argv[1], compiled="compiled" in sys.argv[2:])
