"""2-process CPU DDP run of the five transformers for test_heads_ddp.py (Lightning's launcher
re-executes this script).

Usage: ``python tests/callbacks/heads_ddp_script.py OUT_DIR``. Each rank writes
``OUT_DIR/rank<r>.pt``: the batches it trained on at each logging step, the weights at the
start of those steps (rank 0), the statistics its callback computed and the collectives each
point ran; rank 0's CSVLogger writes what was logged.
"""

from __future__ import annotations

import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from ddp_script import COLLECTIVES, _count_collectives  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_attn.callbacks import AttentionDiagnostics  # noqa: E402
from tests.blocks.head_models import FiveTransformers  # noqa: E402

LOG_EVERY = 2


class Samples(Dataset):
    """Sample ``i``: the five models' inputs drawn with seed ``i`` (one row each)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in FiveTransformers.inputs(batch=1, seed=i).items()}


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = FiveTransformers()
        self.seen: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        step = self.global_step
        if step % LOG_EVERY == LOG_EVERY - 1:  # Lightning's logging steps: 1, 3
            self.seen.append((step, {k: v.clone() for k, v in batch.items()}))
            self.weights[step] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return self.net(**batch) * 1e-3

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(Samples(), batch_size=2)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    _count_collectives()
    diagnostics = AttentionDiagnostics(num_images=0, summary=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4,
        log_every_n_steps=LOG_EVERY, limit_val_batches=0, num_sanity_val_steps=0,
        logger=CSVLogger(out_dir, name="csv", version=0), callbacks=[diagnostics],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    stats = []

    class Keep(Callback):  # every training point the diagnostics computed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            last = diagnostics.last_stats
            if last is not None and (not stats or stats[-1].step != last.step):
                stats.append(last)

    trainer.callbacks.append(Keep())
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(net)
    torch.save({"seen": net.seen, "weights": net.weights, "stats": stats,
                "collectives": list(COLLECTIVES)},
               os.path.join(out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
