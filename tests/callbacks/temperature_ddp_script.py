"""2-process CPU DDP run for test_temperature_schedule.py (Lightning's launcher re-executes
this script): a TemperatureSchedule, and the router losses in the training loss.

Usage: ``python tests/callbacks/temperature_ddp_script.py OUT_DIR``. Each rank writes
``OUT_DIR/rank<r>.pt`` with ``seen``: ``(global_step, T, balance term)`` of block ``a`` before
/ after each training forward, ``first_batch``: the images of its first batch, and
``router``: the router's parameters at the end.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cb_models import make_data  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_attn.blocks import (  # noqa: E402
    DynamicSpatialAttention,
    attention_aux_loss,
    attention_aux_terms,  # noqa: E402
)
from lightning_attn.callbacks import TemperatureSchedule  # noqa: E402


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = DynamicSpatialAttention(kernels=(3,), learnable_temperature=True,
                                         return_mask=False)
        self.head = nn.Linear(4, 3)
        self.seen: list[tuple[int, float, float]] = []
        self.initial_router = {n: p.detach().clone() for n, p in self.a.router.named_parameters()}
        self.first_batch: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(F.relu(self.stem(x))).mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.first_batch is None:
            self.first_batch = x.clone()
        temperature = self.a.temperature.item()
        loss = F.cross_entropy(self(x), y) + attention_aux_loss(self, balance=0.5, z_loss=0.05)
        balance = attention_aux_terms(self, ["balance"])["balance"].item()  # this rank's shard
        self.seen.append((self.global_step, temperature, balance))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)

    def train_dataloader(self):
        return DataLoader(make_data(48), batch_size=4)

    def on_train_end(self) -> None:
        path = os.path.join(sys.argv[1], f"rank{self.global_rank}.pt")
        router = {n: p.detach().clone() for n, p in self.a.router.named_parameters()}
        torch.save({"seen": self.seen, "first_batch": self.first_batch, "router": router,
                    "initial_router": self.initial_router}, path)


def main() -> None:
    torch.set_num_threads(1)
    # A fixed initialisation: unseeded, the learned temperature's first updates were at times
    # a float32 ulp each way (a gradient near 0), and the test read "did not move".
    torch.manual_seed(0)
    schedule = TemperatureSchedule(start=4.0, end=1.0, duration=2, interval="step",
                                   mode="linear", handoff="learnable")
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
        callbacks=[schedule], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net())


if __name__ == "__main__":
    main()
