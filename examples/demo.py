"""Demo: DynamicSpatialAttention learns where the digit is, on one CPU thread.

Trains :class:`~lightning_attn.modules.AttentionClassifier` with a DSA block after each of
its three stages on cluttered digits (a handwritten digit pasted on a 48x48 canvas full of
digit fragments and noise), with the attention diagnostics, then reports:

- test accuracy (best validation checkpoint);
- per block, the localisation score of its mask: the share of mask mass inside the digit's
  box divided by the box's share of the image (1.0 = no better than a uniform mask);
- where TensorBoard finds the run;

and ends by writing the report of its own run (``lightning_attn.report.write_report``: curves,
attention maps, warnings and a verdict per block) and printing its path.

    .venv/bin/python examples/demo.py            # make demo; its time: docs/results.md
    .venv/bin/python examples/demo.py --quick    # a smoke run in seconds
    make tensorboard                             # TensorBoard on runs/
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

from lightning_attn.environment import ignore_known_warnings

ignore_known_warnings()  # before Lightning, which gives one on import

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier, DSAOptions
from lightning_attn.report import write_report

#: The demo's budget (its measured time, with the machine and load: docs/results.md).
FULL = {"num_train": 5000, "num_val": 1000, "num_test": 1000, "epochs": 6, "log_every": 10}
QUICK = {"num_train": 256, "num_val": 128, "num_test": 128, "epochs": 1, "log_every": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    p.add_argument("--logdir", default="runs", help="TensorBoard directory (default: runs)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: predictable on a shared machine, where "
        "threads that wait on each other can slow every op many times over; 2 is ~1.6x "
        "faster on an idle 2-core machine)",
    )
    return p.parse_args(argv)


CANVAS = 48


def build(
    budget: dict, logdir: str
) -> tuple[pl.Trainer, AttentionClassifier, ClutteredDigitsDataModule]:
    """The data, the model and the Trainer of the demo."""
    data = ClutteredDigitsDataModule(
        canvas_size=CANVAS, digit_size=(12, 24), num_clutter=6, clutter_size=(4, 6),
        num_train=budget["num_train"], num_val=budget["num_val"], num_test=budget["num_test"],
        batch_size=64, seed=0,
    )
    model = AttentionClassifier(
        stage_widths=(16, 32, 64),  # stages at 48, 24 and 12 pixels
        attention="dsa",
        dsa=DSAOptions(kernels=(3, 7), learnable_temperature=True),
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=budget["epochs"]),
    )
    callbacks: list[pl.Callback] = [
        RichProgressBar(),
        ModelCheckpoint(monitor="val/acc", mode="max"),
    ]
    callbacks.append(AttentionDiagnostics())
    trainer = pl.Trainer(
        max_epochs=budget["epochs"],
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir, name="demo"),
        callbacks=callbacks,
        log_every_n_steps=budget["log_every"],
    )
    return trainer, model, data


def report(
    results: dict[str, float], model: AttentionClassifier, seconds: float, logdir: str
) -> None:
    console = Console()
    table = Table(title="DSA on cluttered digits: localisation per block (test set)")
    table.add_column("block")
    table.add_column("mask size", justify="right")
    table.add_column("localisation", justify="right")
    stem = model.hparams.get("stem_stride", 1)
    for i, name in enumerate(model.block_names):
        key = f"test/loc/{name}"
        if key in results:
            s = CANVAS // stem // 2**i
            table.add_row(name, f"{s}x{s}", f"{results[key]:.2f}")
    console.print(table)
    console.print("(1.00 = no better than a uniform mask; higher = more mass on the digit)")
    console.print(f"test accuracy: [bold]{results['test/acc']:.3f}[/bold]")
    console.print(f"total time: {seconds:.0f} s")
    console.print("make tensorboard" + ("" if logdir == "runs" else f" LOGDIR={logdir}"))


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0)
    budget = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        budget["epochs"] = args.epochs
    trainer, model, data = build(budget, args.logdir)
    trainer.fit(model, data)
    (results,) = trainer.test(model, data, ckpt_path="best", verbose=False)
    report(results, model, time.perf_counter() - start, args.logdir)
    log_dir = Path(trainer.logger.log_dir)
    files = write_report(
        {"demo": log_dir}, log_dir / "report",
        metrics=["val/acc", "val/loss", "test/acc"], title="lightning-attn demo: DSA on "
        "cluttered digits",
    )
    console = Console(soft_wrap=True)  # paths are not wrapped
    console.print(f"report: [bold]{files.html}[/bold]")
    console.print(f"        {files.markdown} (Markdown, with its PNG figures beside it)")
    return results


if __name__ == "__main__":
    main()
