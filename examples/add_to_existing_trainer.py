"""Add a DynamicSpatialAttention block to *your own* LightningModule and Trainer.

Nothing here uses lightning_attn's model or CLI: the LightningModule, the CNN and the
Trainer are the user's. Two lines bring the library in: the block (wrapped in
``OutputOnly`` so that ``nn.Sequential`` passes on only ``y``) and the diagnostics callback.

    .venv/bin/python examples/add_to_existing_trainer.py        # CPU, well under a minute

Logs go to ``runs/add_to_existing_trainer``; ``make tensorboard`` shows them.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_attn.blocks import DynamicSpatialAttention
from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import OutputOnly


class MyClassifier(pl.LightningModule):
    """The user's model: a plain CNN with one attention block after the second conv."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            OutputOnly(DynamicSpatialAttention(kernels=(3, 7))),  # <- the library's block
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _box = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _box = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    start = time.perf_counter()
    # Small convolutions gain little from several intra-op threads, and on a busy machine
    # threads that wait on each other slow every op down; one thread keeps this predictable.
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = ClutteredDigitsDataModule(
        canvas_size=32, digit_size=(12, 20), num_clutter=4, clutter_size=(3, 5),
        num_train=4000, num_val=500, num_test=500, batch_size=64,
    )
    callbacks = [AttentionDiagnostics()]  # the one line lightning-attn adds to your Trainer
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger("runs", name="add_to_existing_trainer"),
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    model = MyClassifier()
    trainer.fit(model, data)
    acc = float(trainer.callback_metrics["val/acc"])
    print(f"validation accuracy {acc:.3f} in {time.perf_counter() - start:.0f} s")
    print("make tensorboard")


if __name__ == "__main__":
    main()
