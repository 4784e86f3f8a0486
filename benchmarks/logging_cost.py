"""What the public logging APIs cost per logging step, against the private shortcuts.

The diagnostics write a point's scalars (about 50 for three blocks) with
``logger.log_metrics`` and put them into ``trainer.callback_metrics``. Both public calls have
private shortcuts: one TensorBoard event holding every value (``SummaryWriter``'s file
writer) instead of one ``add_scalar`` each, and Lightning's connector dict instead of the
``callback_metrics`` property (which first recomputes every value the module logged). A
private API is worth keeping only if the public one costs more than 0.2 ms per logging step.

Run inside a real ``Trainer.fit`` (the module logs 8 values per step, as a classifier with
loss, accuracy and a few extras does), both variants interleaved at every step, medians::

    python benchmarks/logging_cost.py [--steps 300] [--scalars 50]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.data import DataLoader, TensorDataset


class Logs(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.lin(x), y)
        for i in range(8):
            self.log(f"train/m{i}", loss + i, prog_bar=i == 0)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(512, 16, generator=g),
                                        torch.randint(0, 4, (512,), generator=g)), batch_size=1)


class Measure(Callback):
    def __init__(self, scalars: int) -> None:
        self.metrics = {f"attn/block{i % 3}/mask/q{i}": 0.5 + i * 1e-3 for i in range(scalars)}
        self.times: dict[str, list[float]] = {k: [] for k in (
            "tensorboard public (log_metrics)", "tensorboard private (one event)",
            "callback_metrics public (property)", "callback_metrics private (connector dict)")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logger = trainer.logger
        step = trainer.global_step
        tensors = dict(zip(self.metrics, torch.tensor(list(self.metrics.values()),
                                                      dtype=torch.float64).unbind(), strict=True))
        runs = [
            ("tensorboard public (log_metrics)", lambda: logger.log_metrics(self.metrics, step)),
            ("tensorboard private (one event)", lambda: logger.experiment._get_file_writer()
             .add_summary(Summary(value=[Summary.Value(tag=k, simple_value=v)
                                         for k, v in self.metrics.items()]), step)),
            ("callback_metrics public (property)",
             lambda: trainer.callback_metrics.update(tensors)),
            ("callback_metrics private (connector dict)",
             lambda: trainer._logger_connector._callback_metrics.update(tensors)),
        ]
        order = runs if batch_idx % 2 else runs[::-1]  # interleaved, alternating order
        for name, run in order:
            start = time.perf_counter()
            run()
            self.times[name].append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scalars", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    measure = Measure(args.scalars)
    with tempfile.TemporaryDirectory() as root:
        Trainer(max_steps=args.steps, logger=TensorBoardLogger(root), callbacks=[measure],
                enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, accelerator="cpu", log_every_n_steps=10**6,
                ).fit(Logs())
    print(f"{args.scalars} scalars per logging step, {args.steps} steps, torch "
          f"{torch.__version__}; median ms per logging step")
    print(f"{'variant':45s} {'median ms':>10s} {'p90 ms':>8s}")
    for name, times in measure.times.items():
        times = sorted(times[10:])  # first steps warm up
        print(f"{name:45s} {1e3 * statistics.median(times):10.3f} "
              f"{1e3 * times[int(0.9 * len(times))]:8.3f}")


if __name__ == "__main__":
    main()
