"""How the diagnostics' cost grows with the number of attention modules (not a test).

A model of ``N`` residual stages, each a 3x3 convolution and a timm ``SEModule`` gate (found
and recorded through the adapters, as in any timm model), trains with ``log_every_n_steps=1``
so that every step is a logging point. For ``N`` in 10, 100 and 300 it reports:

- **hooks**: the time spent in AttentionDiagnostics' own hooks per logging step (reading the
  accumulators, the collective, the statistics, the rules, writing the scalars), measured
  around each hook call: the mean over the logging steps (the points are read in batches,
  at the end of each chunk here: one step of a chunk holds the chunk's reading);
- **held-back forwards reduced**: ``on_before_backward``'s time per logging step: the
  eager forwards that recorded masks only, reduced together (recording work moved out of
  the forward, so part of the step's overhead, not of the hooks above);
- **step**: the mean training step with the callback against without it, interleaved in
  chunks (as ``callback_overhead.py``), and the overhead it adds — the recording inside the
  forward included.

    python benchmarks/scaling.py [--modules 10 100 300] [--pairs 5] [--chunk 6]
        [--logger tensorboard|none]

``--logger none``: no logger, so the hooks' own cost (the scalars still go to
``trainer.callback_metrics``); with ``tensorboard`` the hooks include writing the point's
event (TensorBoard computes its records' checksums in Python: about 4 us per scalar).

Targets (issue: cost that stays flat): hooks(300) / hooks(10) <= 4, and the callback adds at
most 10 % to a logging step of the 300-module model. The load of the machine is printed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.callbacks import AttentionDiagnostics

TARGETS = {"hooks ratio 300/10": 4.0, "overhead at 300": 0.10}
_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step",
          "on_train_batch_end")


class Stage(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        from timm.layers import SEModule

        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)  # 300 residual stages stay finite, as in real nets
        self.se = SEModule(channels, rd_ratio=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(F.relu(self.norm(self.conv(x))))


class Net(LightningModule):
    def __init__(self, modules: int, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.stages = nn.Sequential(*(Stage(channels) for _ in range(modules)))
        self.head = nn.Linear(channels, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.stages(self.stem(x))
        return F.cross_entropy(self.head(h.mean(dim=(2, 3))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Chunks(Callback):
    """Turns the diagnostics on in every other chunk of steps and times each step."""

    def __init__(self, diagnostics: AttentionDiagnostics, chunk: int) -> None:
        self.diagnostics, self.chunk = diagnostics, chunk
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self._t0 = 0.0

    def active(self, step: int) -> bool:
        return (step // self.chunk) % 2 == 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def stop(self, trainer) -> None:
        step = trainer.global_step - 1
        if step >= 2 * self.chunk:  # the first pair warms up
            self.times[self.active(step)].append(time.perf_counter() - self._t0)


class StopTimer(Callback):
    """After every other callback's batch-end hook: the step's time, the point's writing
    included."""

    def __init__(self, chunks: Chunks) -> None:
        self.chunks = chunks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.chunks.stop(trainer)


def _gated(diagnostics: AttentionDiagnostics, chunks: Chunks,
           hook_times: dict[int, float], held_times: dict[int, float]) -> None:
    """Each of the diagnostics' step hooks runs only in active chunks, and is timed (the
    seconds of each step's hooks, by step; ``on_before_backward``'s, which reduces the
    forwards held back, apart)."""
    for name in _HOOKS:
        original = getattr(diagnostics, name)

        @functools.wraps(original)
        def gated(trainer, *args, _original=original, _end=name == "on_train_batch_end",
                  _start=name == "on_train_batch_start", **kwargs):
            # at the batch's end the optimizer has stepped: global_step is the next step's
            step = trainer.global_step - 1 if _end else trainer.global_step
            if not chunks.active(step):
                if _start:  # the last point's hold, kept for a point at this step: none
                    diagnostics._collector.release()
                return None
            start = time.perf_counter()
            out = _original(trainer, *args, **kwargs)
            if _end and not chunks.active(step + 1):
                diagnostics.read_points()  # the chunk's points, read in its last step
            if step >= 2 * chunks.chunk:
                times = held_times if _original.__name__ == "on_before_backward" else hook_times
                times[step] = times.get(step, 0.0) + time.perf_counter() - start
            return out

        setattr(diagnostics, name, gated)


def measure(modules: int, pairs: int, chunk: int, logger: str) -> dict[str, float]:
    torch.manual_seed(0)
    steps = 2 * chunk * (pairs + 1)
    data = TensorDataset(torch.randn(16 * steps, 1, 8, 8), torch.randint(0, 10, (16 * steps,)))
    diagnostics = AttentionDiagnostics(summary=False, num_images=0, histogram_every_n_steps=0,
                                       log_every_n_steps=1)
    chunks = Chunks(diagnostics, chunk)
    hook_times: dict[int, float] = {}
    held_times: dict[int, float] = {}
    _gated(diagnostics, chunks, hook_times, held_times)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=1,
            logger=TensorBoardLogger(tmp) if logger == "tensorboard" else False,
            callbacks=[chunks, diagnostics, StopTimer(chunks)],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Net(modules), DataLoader(data, batch_size=16))
    on, off = statistics.fmean(chunks.times[True]), statistics.fmean(chunks.times[False])
    return {"modules": modules, "hooks_ms": 1e3 * statistics.fmean(hook_times.values()),
            "held_ms": 1e3 * statistics.fmean(held_times.values()) if held_times else 0.0,
            "step_on_ms": 1e3 * on, "step_off_ms": 1e3 * off, "overhead": on / off - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=6)
    parser.add_argument("--logger", choices=("tensorboard", "none"), default="tensorboard")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"load at start: {os.getloadavg()[0]:.2f} (1 min), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread")
    rows = [measure(n, args.pairs, args.chunk, args.logger) for n in args.modules]
    print(f"logger: {args.logger}")
    print("| modules | hooks per logging step | held-back forwards reduced | step without | "
          "step with | overhead |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['modules']} | {r['hooks_ms']:.1f} ms | {r['held_ms']:.1f} ms | "
              f"{r['step_off_ms']:.1f} ms | {r['step_on_ms']:.1f} ms | "
              f"{100 * r['overhead']:+.1f} % |")
    by = {r["modules"]: r for r in rows}
    if 10 in by and 300 in by:
        ratio = by[300]["hooks_ms"] / by[10]["hooks_ms"]
        print(f"hooks(300) / hooks(10) = {ratio:.2f} (target <= "
              f"{TARGETS['hooks ratio 300/10']:g}); overhead at 300: "
              f"{100 * by[300]['overhead']:+.1f} % (target <= "
              f"{100 * TARGETS['overhead at 300']:g} %)")
    print(f"load at end: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
