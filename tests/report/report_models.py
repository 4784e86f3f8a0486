"""A tiny network with three attention blocks, two of them broken on purpose (via init).

* ``healthy``: a CoordinateAttention with a learnable alpha (0.5): its masks vary (std ~0.1).
* ``collapsed``: a DSA whose branch convolutions are zero and frozen: its mask is
  ``sigmoid(0) = 0.5`` everywhere (std 0 < 0.02): mask collapse at every step.
* ``dead``: a DSA whose router's last bias sends branch 1 a weight of ~e^-30 (frozen): a dead
  branch at every step; its branches are scaled up and its temperature is low so that its
  mask is not collapsed (std ~0.1 with seed 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.blocks import create_attention

BLOCKS = ("healthy", "collapsed", "dead")


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out  # DSA returns (y, mask) or y


class PlantedNet(LightningModule):
    """stem -> healthy (coord) -> collapsed (DSA) -> dead (DSA) -> head, on 8x8 noise."""

    def __init__(self, channels: int = 4, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.healthy = create_attention(  # alpha mid-range: far from any drift limit
            "coord", channels, alpha=0.5, learnable_alpha=True, min_mid_channels=4
        )
        self.collapsed = create_attention("dsa", channels, learnable_temperature=True)
        self.dead = create_attention("dsa", channels, temperature=0.1)
        self.head = nn.Linear(channels, 3)
        self.n, self.batch_size = n, batch_size
        with torch.no_grad():
            for branch in self.collapsed.branches:
                branch.weight.zero_()
                branch.weight.requires_grad_(False)
            last = self.dead.router[-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0.0, -30.0, 0.0]))
            last.weight.requires_grad_(False)
            last.bias.requires_grad_(False)
            for branch in self.dead.branches:
                branch.weight.mul_(8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = self.healthy(h)
        h = _tensor(self.collapsed(h))
        h = _tensor(self.dead(h))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self):
        return DataLoader(_data(self.n, 0), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(_data(16, 1), batch_size=8)
