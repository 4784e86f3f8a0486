"""Accuracy benchmark: baseline vs DSA vs CoordinateAttention on cluttered digits.

Each model is :class:`~lightning_attn.modules.AttentionClassifier` with the same backbone,
data, optimiser and budget; only the attention block differs. Model and data settings are
read from ``examples/configs/{baseline,dsa,coord}.yaml`` (their ``model`` section without the
optimiser, and their ``data`` section with the sample counts below); the optimiser is AdamW
(lr 3e-3, weight decay 1e-4) with a cosine schedule. Every model is trained with 3 seeds
(initialisation and batch order; the rendered dataset is fixed) and tested after the last
epoch (no checkpoint selection). Prints a markdown table:

- test accuracy, mean ± std over seeds;
- localisation score of each block's mask on the test set (mean over seeds;
  1.00 = no better than a uniform mask; ``-`` = no spatial mask);
- parameter count;
- training throughput in samples/s (time inside training steps: forward, backward,
  optimiser; one process, ``--threads`` intra-op threads, default 1).

    python benchmarks/accuracy.py                  # ~6-8 min on an idle CPU core
    python benchmarks/accuracy.py --seeds 1 --epochs 1 --num-train 512   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
MODELS = {"baseline": "baseline.yaml", "DSA": "dsa.yaml", "CoordinateAttention": "coord.yaml"}


class StepTimer(pl.Callback):
    """Wall time and samples inside training steps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.samples += batch[0].shape[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: reproducible on a shared machine)",
    )
    return p.parse_args(argv)


def load_config(config: str) -> tuple[dict, dict]:
    """``(model kwargs without optimiser/scheduler, data kwargs)`` of an example config."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    model = {k: v for k, v in cfg["model"].items() if k not in ("optimizer", "lr_scheduler")}
    return model, dict(cfg["data"])


def run_one(model_kw: dict, data_kw: dict, seed: int, args: argparse.Namespace) -> dict:
    pl.seed_everything(seed, verbose=False)
    data = ClutteredDigitsDataModule(
        **{**data_kw, "num_train": args.num_train, "num_val": 64, "num_test": args.num_test}
    )
    model = AttentionClassifier(
        **model_kw,
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
    )
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(model, data)
    (res,) = trainer.test(model, data, verbose=False)
    return {
        "acc": res["test/acc"],
        "loc": [res.get(f"test/loc/{n}") for n in model.block_names],
        "params": sum(p.numel() for p in model.parameters()),
        "throughput": timer.samples / timer.seconds,
        "blocks": len(model.block_names),
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    rows = []
    for label, config in MODELS.items():
        model_kw, data_kw = load_config(config)
        runs = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            runs.append(run_one(model_kw, data_kw, seed, args))
            print(
                f"{label} seed {seed}: acc {runs[-1]['acc']:.3f} "
                f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True,
            )
        stages = len(model_kw.get("stage_widths", [0, 0, 0]))
        locs = []
        for i in range(stages):
            vals = [r["loc"][i] for r in runs if i < len(r["loc"]) and r["loc"][i] is not None]
            locs.append(f"{statistics.mean(vals):.2f}" if vals else "-")
        rows.append(
            f"| {label} | {_mean_std([r['acc'] for r in runs])} | {' / '.join(locs)} | "
            f"{runs[0]['params']:,} | {statistics.mean(r['throughput'] for r in runs):.0f} |"
        )
    table = "\n".join(
        [
            f"Cluttered digits {data_kw['canvas_size']}x{data_kw['canvas_size']}, "
            f"{args.num_train} train / {args.num_test} test samples, {args.epochs} epochs, "
            f"batch {data_kw.get('batch_size', 64)}, {args.seeds} seeds; "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
            "",
            "| model | test acc % (mean ± std) | localisation (stage 1 / 2 / 3) | params "
            "| train samples/s |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"total benchmark time: {time.perf_counter() - start:.0f} s",
        ]
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
