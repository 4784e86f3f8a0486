"""Training speed with and without AttentionDiagnostics, eager and compiled (not a test).

Trains a small CNN (DynamicSpatialAttention + CoordinateAttention) on in-memory data, one run
per mode (eager, ``torch.compile``) and ``log_every_n_steps`` (50 and 1). Within a run the two
arms are interleaved: the training steps are cut into chunks of ``chunk`` steps, and
AttentionDiagnostics is active in every other chunk only (when inactive its hooks are not
called at all, so the blocks never record, exactly as without the callback). Each active
chunk is compared with the mean of the two inactive chunks around it, which cancels slow
drifts of a shared machine; the median of these ratios is reported with the median steps/s
of each arm. Both arms log to a TensorBoardLogger with the same ``log_every_n_steps`` (chunks
are multiples of it), so only the callback's own cost differs. Untimed warm-up chunks, one
without and one with the callback, compile both graphs (recording off and on) first.

    python benchmarks/callback_overhead.py [--pairs 12] [--intervals 50 1] [--modes eager compiled]
    python benchmarks/callback_overhead.py --model efficientnet_b0 --intervals 50 --modes eager

Targets (a benchmark, not a test): eager <= 1 % slower at 50 and <= 5 % at every step;
compiled <= 2 % and <= 10 %. ``--model efficientnet_b0``: timm's EfficientNet-B0 (16
squeeze-excite modules, diagnosed through the adapters) on 32x32 images instead of the small
CNN; targets <= 2 % at 50, and at every step those of the small CNN. ``--model vit_tiny``:
ViT-Tiny (width 192, 12 blocks of 3 heads, 65 tokens of 32x32 images, batch 8); ``--model
llama``: ``LlamaForCausalLM`` from a tiny config (2 layers, grouped-query attention, 128
tokens, batch 8); their heads recorded through the adapters, target <= 2 % at 50 (every step
reported). ``--callback qkclip``: :class:`QKClip` instead of the diagnostics, its tracking of
the heads' max logits released in the chunks without it (its cost is every step's). The
adapters' hooks stay attached in the chunks without the callback (they are attached when the
fit starts), so their cost while recording is off is measured apart: the forward with the
hooks attached against without, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.measure import attached_blocks  # noqa: E402
from lightning_attn.blocks import create_attention  # noqa: E402
from lightning_attn.callbacks import AttentionDiagnostics, QKClip  # noqa: E402
from lightning_attn.callbacks.diagnostics import READ_EVERY_N_STEPS  # noqa: E402

TARGETS = {("eager", 50): 0.01, ("eager", 1): 0.05, ("compiled", 50): 0.02,
           ("compiled", 1): 0.10}
MODEL_TARGETS = {"efficientnet_b0": {("eager", 50): 0.02, ("compiled", 50): 0.02,
                                     ("eager", 1): 0.05, ("compiled", 1): 0.10},
                 **{name: {("eager", 50): 0.02, ("compiled", 50): 0.02}
                    for name in ("vit_tiny", "llama")}}


class Body(nn.Module):
    """conv(1->16) -> DSA -> conv(16->32, stride 2) -> CoordAtt -> pool -> linear, 32x32 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.dsa = create_attention("dsa", 16, learnable_temperature=True)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.coord = create_attention("coord", 32, learnable_alpha=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = self.dsa(h)[0]
        h = F.relu(self.conv2(h))
        h = self.coord(h)
        return self.head(h.mean(dim=(2, 3)))


def efficientnet_b0() -> nn.Module:
    import timm  # the project's dev set-up installs it

    return timm.create_model("efficientnet_b0", num_classes=10, in_chans=1)


def vit_tiny() -> nn.Module:
    """ViT-Tiny (width 192, 12 blocks of 3 heads) on 32x32 grey images, 4x4 patches: 65
    tokens."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=192, depth=12, num_heads=3)


class TinyLlama(nn.Module):
    """``LlamaForCausalLM`` from a tiny config (2 layers, 4 query heads sharing 2 key heads,
    width 128, rotary positions, SDPA), trained on its own next-token loss."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256)
        config._attn_implementation = "sdpa"
        self.lm = LlamaForCausalLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens, labels=tokens).loss


def _images(n: int, g: torch.Generator, size: int) -> TensorDataset:
    return TensorDataset(torch.rand(n, 1, size, size, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def _tokens(n: int, g: torch.Generator, length: int) -> TensorDataset:
    return TensorDataset(torch.randint(0, 256, (n, length), generator=g))


#: name -> (network, its data (n, generator) -> dataset, batch size). A network that takes
#: tokens returns its own loss.
BODIES = {
    "small": (Body, functools.partial(_images, size=32), 32),
    "efficientnet_b0": (efficientnet_b0, functools.partial(_images, size=32), 32),
    "vit_tiny": (vit_tiny, functools.partial(_images, size=32), 8),
    "llama": (TinyLlama, functools.partial(_tokens, length=128), 8),
}


class SmallNet(LightningModule):
    """:class:`Body` (or another model of ``BODIES``), compiled or not, on in-memory data."""

    def __init__(self, compiled: bool, model: str = "small", n: int = 2048):
        super().__init__()
        make, data, self.batch_size = BODIES[model]
        self.body = make()
        if compiled:
            self.body = torch.compile(self.body)
        self.data = data(n, torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        if len(batch) == 1:  # tokens: the network's own loss
            loss = self(batch[0])
        else:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class Interleave(Callback):
    """Calls ``inner``'s training-batch hooks in odd chunks only; times every chunk.

    Chunk ``k`` covers the steps ``warmup + k*chunk .. warmup + (k+1)*chunk - 1``; chunk 0
    is without, chunk 1 with, and so on. The warm-up is active in its second half (so that
    the graphs with recording on exist before timing). The other hooks (setup, teardown, ...)
    always run.
    """

    def __init__(self, inner: Callback, chunk: int, warmup: int) -> None:
        self.inner, self.chunk, self.warmup = inner, chunk, warmup
        self.boundaries: list[float] = []
        self._active = False
        self.hook_seconds = 0.0  # time inside the callback's hooks in timed active chunks
        self.timed_steps = 0

    def __getattribute__(self, name: str) -> Any:
        # Forward every hook we do not define to the inner callback.
        own = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
        if name.startswith(("on_", "setup", "teardown")) and name not in own:
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)

    @property
    def state_key(self) -> str:
        return self.inner.state_key

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step - self.warmup
        if self._active and step % self.chunk == 0:
            # an active chunk ends: the points it holds are read in it (the diagnostics
            # read theirs in batches; more often so than in a run, never less)
            self._time(step - 1, getattr(self.inner, "read_points", lambda: None))
        if step >= 0 and step % self.chunk == 0:
            self.boundaries.append(time.perf_counter())
        was_active = self._active
        if step < 0:
            self._active = step >= -self.warmup // 2
        else:
            self._active = (step // self.chunk) % 2 == 1
        self.switch(self._active)
        if was_active and not self._active:
            # Lightning re-logs a step metric at every logging step until the epoch ends;
            # without the callback those values would not exist: drop them.
            results = trainer._results
            for key in [k for k in results if k.startswith("on_train_batch_end.")]:
                del results[key]
        if self._active:
            self._time(step, self.inner.on_train_batch_start, trainer, pl_module, batch,
                       batch_idx)
            self.timed_steps += step >= 0

    def switch(self, active: bool) -> None:
        """What the arm changes beyond calling the hooks (called at every step). The
        diagnostics' last point keeps every block held for a point at the next step, and
        lets go in that step's ``on_train_batch_start`` if it is none: a chunk without the
        callback, whose hooks are not called, lets go itself (else its forwards would
        record)."""
        collector = getattr(self.inner, "_collector", None)
        if not active and collector is not None:
            collector.release()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._active:
            self._time(trainer.global_step - self.warmup, self.inner.on_before_optimizer_step,
                       trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            # global_step has moved on by one: the step of this batch is one less
            self._time(trainer.global_step - 1 - self.warmup, self.inner.on_train_batch_end,
                       trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == trainer.max_steps:
            if self._active:  # the last chunk's points, read in it
                self._time(trainer.global_step - 1 - self.warmup,
                           getattr(self.inner, "read_points", lambda: None))
            self.boundaries.append(time.perf_counter())  # end of the last chunk

    def _time(self, step: int, hook, *args) -> None:
        start = time.perf_counter()
        hook(*args)
        if step >= 0:
            self.hook_seconds += time.perf_counter() - start

    def chunk_speeds(self) -> list[float]:
        """Steps/s of each chunk, in order (even: without, odd: with)."""
        times = [b - a for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)]
        return [self.chunk / t for t in times]


class ClipInterleave(Interleave):
    """:class:`Interleave` for :class:`QKClip`, whose heads track their max logits in every
    forward while it holds them: the chunks without it release the tracking too."""

    def switch(self, active: bool) -> None:
        for block, _ in self.inner._blocks.values():
            if active:
                block.track_max_logits(self.inner)
            else:
                block.untrack_max_logits(self.inner)


def hook_cost(model: str, repeats: int = 30) -> tuple[float, float]:
    """Median eager forward time (ms) of ``model`` without and with the adapters' hooks
    attached and recording off, interleaved."""
    from lightning_attn.core.statistics import RecordingConfig

    module = SmallNet(False, model, n=32)
    net = module.body.eval()
    x = module.data.tensors[0]
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        net(x)
        for i in range(2 * repeats):
            attached = i % 2 == 1
            with (attached_blocks(net, RecordingConfig(), "cpu", record=False) if attached
                  else contextlib.nullcontext()):
                start = time.perf_counter()
                net(x)
                times[attached].append(time.perf_counter() - start)
    return statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3


def measure(
    mode: str, every: int, chunk: int, pairs: int, warmup: int, root: str, model: str = "small",
    callback: str = "diagnostics",
) -> list[float]:
    torch.manual_seed(0)
    torch._dynamo.reset()
    if callback == "qkclip":
        timer = ClipInterleave(QKClip(), chunk, warmup)
    else:
        diag = AttentionDiagnostics(num_images=0, on_problem="ignore", summary=False)
        timer = Interleave(diag, chunk, warmup)
    n_chunks = 2 * pairs + 1  # without, with, without, ..., without
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + n_chunks * chunk,
        log_every_n_steps=every,
        logger=TensorBoardLogger(root, name=f"{mode}{every}"),
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(SmallNet(compiled=mode == "compiled", model=model))
    points = timer.timed_steps // (every if callback == "diagnostics" else 1)
    return timer.chunk_speeds()[:n_chunks], timer.hook_seconds / max(points, 1)


class StepClock(Callback):
    """Wall time of every training step, from the first callback's batch start (``start``) to
    the last one's batch end (``end``): put ``clock.start`` first and ``clock.end`` last."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._t0 = 0.0
        clock = self

        class Start(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                clock._t0 = time.perf_counter()

        class End(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                clock.times[trainer.global_step - 1] = time.perf_counter() - clock._t0

        self.start, self.end = Start(), End()


def measure_steps(mode: str, every: int, steps: int, root: str, model: str) -> dict[str, float]:
    """Median step times of one run in which Lightning logs every ``every`` steps and the
    diagnostics every ``2 * every``: ``plain`` (no logging), ``lightning`` (Lightning's
    logging only) and ``diagnostics`` (Lightning's and the diagnostics'), all interleaved."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    clock = StepClock()
    diag = AttentionDiagnostics(num_images=0, on_problem="ignore", summary=False,
                                log_every_n_steps=2 * every)
    warmup = 4 * every  # both graphs compiled (recording off and on), caches warm
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, log_every_n_steps=every,
        logger=TensorBoardLogger(root, name=f"steps-{mode}"),
        callbacks=[clock.start, diag, clock.end], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(SmallNet(compiled=mode == "compiled", model=model))
    kinds: dict[str, list[float]] = {"plain": [], "lightning": [], "diagnostics": []}
    for step, seconds in clock.times.items():
        if step < warmup:
            continue
        kind = ("diagnostics" if (step + 1) % (2 * every) == 0
                else "lightning" if (step + 1) % every == 0 else "plain")
        kinds[kind].append(seconds)
    return {kind: statistics.median(times) for kind, times in kinds.items()}


def main_steps(args: argparse.Namespace) -> None:
    """``--method steps``: the cost of a logging step from step times of one run, and what it
    makes at ``log_every_n_steps`` of 50 and 1."""
    targets = MODEL_TARGETS.get(args.model, TARGETS)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for mode in args.modes:
            t = measure_steps(mode, 5, args.steps, root, args.model)
            cost = t["diagnostics"] - t["lightning"]
            rows.append((mode, t, cost))
            print(f"{mode}: medians {({k: round(v * 1e3, 1) for k, v in t.items()})} ms",
                  flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"model {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps (a diagnostics point every 10, Lightning's every 5)\n")
    print("| mode | step (ms) | Lightning's logging step | with the diagnostics' point "
          "| a point costs | at log_every_n_steps=50 | target | at every step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, t, cost in rows:
        at50, every = cost / (50 * t["plain"]), cost / t["lightning"]
        target = targets.get((mode, 50))
        met = " (met)" if at50 <= target else " (missed)"
        print(f"| {mode} | {t['plain'] * 1e3:.1f} | {t['lightning'] * 1e3:.1f} "
              f"| {t['diagnostics'] * 1e3:.1f} | {cost * 1e3:.1f} ms | {at50:.2%}{met} "
              f"| <= {target:.0%} | {every:.1%} |")
    _print_hook_cost(args.model)


def _print_hook_cost(model: str) -> None:
    if model != "small":
        without, with_ = hook_cost(model)
        print(f"\nadapters' hooks attached, recording off (every step): eager forward "
              f"{without:.2f} ms without, {with_:.2f} ms with "
              f"({(with_ / without - 1) * 100:+.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=12, help="chunks with the callback")
    parser.add_argument("--intervals", type=int, nargs="+", default=[50, 1])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                        choices=["eager", "compiled"])
    parser.add_argument("--model", default="small", choices=list(BODIES))
    parser.add_argument("--callback", default="diagnostics", choices=["diagnostics", "qkclip"],
                        help="qkclip: QKClip (default threshold) instead of the diagnostics")
    parser.add_argument("--chunk", type=int, default=None,
                        help="steps a chunk (default: whole logging intervals, >= 10 "
                             "steps, and whole batches of points read together)")
    parser.add_argument("--method", default="chunks", choices=["chunks", "steps"],
                        help="steps: the cost of a logging step from one run's step times "
                        "(medians of each kind of step, interleaved step by step)")
    parser.add_argument("--steps", type=int, default=200, help="--method steps: timed steps")
    args = parser.parse_args()
    targets = {} if args.callback == "qkclip" else MODEL_TARGETS.get(args.model, TARGETS)

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.method == "steps":
        main_steps(args)
        return

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for mode in args.modes:
            for every in args.intervals:
                # whole logging intervals, whole batches of points read together
                chunk = args.chunk or every * max(1, 10 // every,
                                                  READ_EVERY_N_STEPS // every)
                speeds, hook_s = measure(mode, every, chunk, args.pairs, 2 * chunk, root,
                                         args.model, args.callback)
                without, with_ = speeds[0::2], speeds[1::2]
                # each chunk with the callback against the mean of its two neighbours without
                neighbours = zip(with_, without, without[1:], strict=False)
                ratios = [w / ((a + b) / 2) for w, a, b in neighbours]
                rows.append((mode, every, statistics.median(without),
                             statistics.median(with_), statistics.median(ratios), hook_s))
                print(f"{mode}, log_every_n_steps={every}, chunks of {chunk} steps: ratios "
                      f"{[round(r, 3) for r in ratios]}", flush=True)

    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{args.callback}, model {args.model}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{args.pairs} chunks with the callback per interval; medians")
    print()
    print("| mode | log_every_n_steps | without (steps/s) | with (steps/s) | slower | target "
          "| hooks per logging step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, every, base, diag, ratio, hook_s in rows:
        target = targets.get((mode, every))
        goal = f"<= {target:.0%}" if target is not None else "-"
        met = "" if target is None else (" (met)" if 1 - ratio <= target else " (missed)")
        print(f"| {mode} | {every} | {base:.1f} | {diag:.1f} | {(1 - ratio) * 100:.1f}%{met} "
              f"| {goal} | {hook_s * 1e3:.2f} ms |")
    print("\n'hooks per logging step': time inside the callback's hooks per logging step (the "
          "collective, the host copy, the statistics, the writers); the recording inside the "
          "forward is on top of it.")
    if args.callback == "qkclip":
        print("(QKClip: 'hooks per logging step' is its time per step: the clip after the "
              "optimizer step; the max-only pass over each head's logits is in the forward)")
    else:
        _print_hook_cost(args.model)


if __name__ == "__main__":
    main()
