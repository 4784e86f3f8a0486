"""Accuracy benchmark: baseline vs DSA vs CoordinateAttention, with and without remedies.

Each model is :class:`~lightning_attn.modules.AttentionClassifier` with the same backbone,
data, optimiser and budget; only the attention block and its remedies differ. Model and data
settings are read from ``examples/configs/{baseline,dsa,dsa_remedies,coord}.yaml`` (their
``model`` section without the optimiser, their ``data`` section with the sample counts below,
and the ``TemperatureSchedule`` of ``trainer.callbacks``); the optimiser is AdamW (lr 3e-3,
weight decay 1e-4) with a cosine schedule. The rows (``--models`` picks some):

- ``baseline``, ``DSA`` (``dsa.yaml``);
- ``DSA + temperature schedule``: ``dsa.yaml`` with the ``TemperatureSchedule`` of
  ``dsa_remedies.yaml``; ``DSA + balance loss``: ``dsa.yaml`` with its ``aux_loss``;
  ``DSA + both``: ``dsa_remedies.yaml`` as it is;
- ``CoordinateAttention``: ``coord.yaml`` (its learnable alphas kept in ``[0, 1]``:
  ``bounded: true``); ``CoordinateAttention (unbounded alphas)``: the same with
  ``bounded: false``.

A second table plants the failure transformer heads are diagnosed for (``--models`` picks
these rows too): a small timm ``VisionTransformer`` (4 blocks of 4 heads, width 64, 4x4
patches, class token; random init) on 32x32 cluttered digits (digits 14-24 pixels, 3
fragments: :data:`VIT_DATA`), trained for :data:`VIT_EPOCHS` epochs with the same AdamW and
cosine schedule as the CNNs:

- ``ViT lr 1e-3``: a learning rate it trains at;
- ``ViT lr 1e-2 (too high)``: its attention logits grow past the diagnostics'
  ``max_logit_threshold`` (100) and its heads collapse onto single keys (both warned);
- ``ViT lr 1e-2 + QKClip(50)``: the same with :class:`~lightning_attn.callbacks.QKClip`
  clipping at 50 (below the warning's 100: a clipped head's logits may grow again for one
  step before the next clip);
- ``ViT lr 1e-2 + qk_norm``: the same model built with timm's ``qk_norm=True``.

Its columns: test accuracy, warned steps, the largest attention logit of any head over every
training step's forward (tracked by :class:`MaxLogitOverTraining`) and the lowest head entropy
at any logging point.

Every model is trained with 3 seeds (initialisation and batch order; the rendered dataset is
fixed) and tested after the last epoch (no checkpoint selection). Prints a markdown table:

- test accuracy, mean ± std over seeds;
- localisation score of each block's mask on the test set (mean over seeds;
  1.00 = no better than a uniform mask; ``-`` = no spatial mask);
- warned steps: the share of the diagnostics' logging steps at which at least one health
  rule fired (``AttentionDiagnostics.last_problems`` non-empty after the point), over all
  seeds, and the kinds that fired;
- parameter count;
- training throughput in samples/s (time inside training steps: forward, backward,
  optimiser, and ``AttentionDiagnostics`` on every ``--log-every``-th step; one process,
  ``--threads`` intra-op threads, default 1).

Every fit logs to TensorBoard under ``<logdir>/<timestamp>/<model>/seed_<n>`` with
``AttentionDiagnostics`` (its warnings are not printed: the report lists them). At the end the
comparison (seed 0 of each model, and the table above) is written through
:func:`lightning_attn.report.write_report` to ``<logdir>/<timestamp>/report/report.html``.
A ``rich`` bar shows the progress over all fits.

    python benchmarks/accuracy.py                  # ~50 min on one CPU core (ViT: ~25)
    python benchmarks/accuracy.py --budget config  # at the configs' own 10 epochs: ~1 h
    python benchmarks/accuracy.py --seeds 1 --epochs 1 --num-train 512   # smoke run
    python benchmarks/accuracy.py --models "DSA,DSA + both"               # some rows
    python benchmarks/accuracy.py --models vit --seeds 1                  # the ViT rows
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

from lightning_attn.environment import ignore_known_warnings

ignore_known_warnings()  # before Lightning, which gives one on import

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.callbacks import AttentionDiagnostics, QKClip, TemperatureSchedule
from lightning_attn.core import AttentionWarning
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier
from lightning_attn.report import ReportError, ReportTable, write_report

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
REMEDIES = "dsa_remedies.yaml"


def _schedule_of(config: str) -> list[dict]:
    """The TemperatureSchedule entries (init_args) of a config's ``trainer.callbacks``."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    return [
        dict(cb.get("init_args") or {}) for cb in cfg.get("trainer", {}).get("callbacks") or []
        if str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "TemperatureSchedule"
    ]


def _aux_loss_of(config: str) -> dict:
    return dict(yaml.safe_load((CONFIGS / config).read_text())["model"].get("aux_loss") or {})


#: label -> (config, model overrides, TemperatureSchedule init_args)
MODELS: dict[str, tuple[str, Callable[[], dict], Callable[[], list[dict]]]] = {
    "baseline": ("baseline.yaml", dict, list),
    "DSA": ("dsa.yaml", dict, list),
    "DSA + temperature schedule": ("dsa.yaml", dict, lambda: _schedule_of(REMEDIES)),
    "DSA + balance loss": ("dsa.yaml", lambda: {"aux_loss": _aux_loss_of(REMEDIES)}, list),
    "DSA + both": (REMEDIES, dict, lambda: _schedule_of(REMEDIES)),
    "CoordinateAttention": ("coord.yaml", dict, list),
    "CoordinateAttention (unbounded alphas)": (
        "coord.yaml", lambda: {"coord": {"bounded": False}}, list,
    ),
}


class ViTRow(NamedTuple):
    """A row of the planted failure: the learning rate, timm's ``qk_norm``, and the
    threshold of a :class:`QKClip` (``None``: none)."""

    lr: float
    qk_norm: bool = False
    qkclip: float | None = None


VIT_MODELS: dict[str, ViTRow] = {
    "ViT lr 1e-3": ViTRow(1e-3),
    "ViT lr 1e-2 (too high)": ViTRow(1e-2),
    "ViT lr 1e-2 + QKClip(50)": ViTRow(1e-2, qkclip=50.0),
    "ViT lr 1e-2 + qk_norm": ViTRow(1e-2, qk_norm=True),
}
#: The ViT rows' data: larger digits on a smaller canvas than the CNNs' (a ViT this small,
#: trained from scratch, learns the 48x48 task too slowly for a CPU benchmark).
VIT_DATA = {"canvas_size": 32, "digit_size": (14, 24), "num_clutter": 3, "batch_size": 64}
VIT_EPOCHS = 12


def small_vit(qk_norm: bool = False) -> torch.nn.Module:
    """timm's VisionTransformer, 4 blocks of 4 heads, width 64, on 32x32 grey images."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                             embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                             qk_norm=qk_norm)


class MaxLogitOverTraining(pl.Callback):
    """The largest attention logit of any head over every training step's forward (each
    attention module with heads tracks its max logit in the forward: a max-only pass)."""

    def __init__(self) -> None:
        self.blocks: list = []
        self._max: torch.Tensor | None = None

    @property
    def value(self) -> float:
        return float(self._max) if self._max is not None else math.nan

    def on_fit_start(self, trainer, pl_module) -> None:
        found, _ = find_attention_blocks(pl_module, third_party=True)
        self.blocks = [b for b in found.values() if getattr(b, "num_heads", None)]
        for block in self.blocks:
            block.track_max_logits(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for block in self.blocks:
            block.reset_max_logits()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.blocks:
            return  # no attention heads in this model
        step = torch.stack([b.tracked_max_logits.max() for b in self.blocks]).max()
        self._max = step if self._max is None else torch.maximum(self._max, step)

    def on_fit_end(self, trainer, pl_module) -> None:
        for block in self.blocks:
            block.clear_recording()  # this callback's own recorders and hooks


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


class WarnedSteps(pl.Callback):
    """Counts the diagnostics' logging steps at which a health rule fired (after it in the
    callback list: it reads the point the diagnostics just finished)."""

    def __init__(self, diagnostics: AttentionDiagnostics) -> None:
        self.diagnostics = diagnostics
        self.points = 0
        self.warned = 0
        self.kinds: Counter[str] = Counter()
        self.lowest_head_entropy = math.inf
        self.blocks = 0  # attention modules the diagnostics watch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.diagnostics.num_points == self.points:
            return  # no new logging point in this batch
        self.points = self.diagnostics.num_points
        self.blocks = len(self.diagnostics.block_names)
        for block in self.diagnostics.last_stats.blocks.values():
            if block.heads is not None and math.isfinite(block.heads.entropy_min):
                self.lowest_head_entropy = min(self.lowest_head_entropy, block.heads.entropy_min)
        problems = self.diagnostics.last_problems
        if problems:
            self.warned += 1
            self.kinds.update({p.kind for p in problems})


class Advance(pl.Callback):
    """Moves the benchmark's progress bar by one step per training batch."""

    def __init__(self, progress: Progress, task, label: str) -> None:
        self.progress, self.task, self.label = progress, task, label

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.progress.update(
            self.task,
            description=f"{self.label}, epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.advance(self.task)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--budget", choices=("short", "config"), default="short",
        help="short: 5 epochs of 4,000 images, diagnostics every 20 steps; config: the "
        "configs' own trainer.max_epochs, data.num_train and trainer.log_every_n_steps",
    )
    p.add_argument("--epochs", type=int, default=None, help="overrides the budget's")
    p.add_argument("--num-train", type=int, default=None, help="overrides the budget's")
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: reproducible on a shared machine)",
    )
    p.add_argument("--logdir", default="runs/accuracy",
                   help="TensorBoard runs and the report go to LOGDIR/<timestamp>/")
    p.add_argument("--log-every", type=int, default=None,
                   help="Trainer(log_every_n_steps=...): diagnostics and loss every N steps "
                   "(overrides the budget's)")
    p.add_argument("--vit-epochs", type=int, default=VIT_EPOCHS,
                   help="epochs of the ViT rows (the same images as the CNNs' budget)")
    rows = [*MODELS, *VIT_MODELS]
    p.add_argument("--models", default=",".join(rows),
                   help=f"comma-separated rows to run, of: {', '.join(rows)}; 'cnn' and 'vit' "
                   "name each table's rows")
    args = p.parse_args(argv)
    groups = {"cnn": list(MODELS), "vit": list(VIT_MODELS)}
    args.models = [r for m in args.models.split(",") if m.strip()
                   for r in groups.get(m.strip(), [m.strip()])]
    unknown = [m for m in args.models if m not in rows]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {rows}")
    budget = SHORT if args.budget == "short" else config_budget([MODELS[m][0] for m in
                                                                  args.models if m in MODELS])
    for key, value in budget.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


#: The short budget of the benchmark's first table (docs/remedies.md).
SHORT = {"epochs": 5, "num_train": 4000, "log_every": 20}


def config_budget(configs: list[str]) -> dict[str, int]:
    """The budget the configs train with (the same in every one of them)."""
    budgets = set()
    for config in configs:
        cfg = yaml.safe_load((CONFIGS / config).read_text())
        budgets.add((cfg["trainer"]["max_epochs"], cfg["data"]["num_train"],
                     cfg["trainer"]["log_every_n_steps"]))
    if len(budgets) != 1:
        raise SystemExit(f"the configs {configs} train with different budgets: {budgets}")
    ((epochs, num_train, log_every),) = budgets
    return {"epochs": epochs, "num_train": num_train, "log_every": log_every}


def load_config(config: str, overrides: dict | None = None) -> tuple[dict, dict]:
    """``(model kwargs without optimiser/scheduler, data kwargs)`` of an example config,
    with ``overrides`` merged into the model kwargs (one level deep for dict values)."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    model = {k: v for k, v in cfg["model"].items() if k not in ("optimizer", "lr_scheduler")}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(model.get(key), dict):
            model[key] = {**model[key], **value}
        else:
            model[key] = value
    return model, dict(cfg["data"])


def run_one(
    model_kw: dict, data_kw: dict, seed: int, args: argparse.Namespace,
    logger: TensorBoardLogger, callbacks: list[pl.Callback], schedules: list[dict] = (),
    lr: float = 3e-3, epochs: int | None = None,
    backbone: Callable[[], torch.nn.Module] | None = None,
) -> dict:
    """One fit and test; ``backbone`` (built after seeding) replaces the built-in CNN."""
    pl.seed_everything(seed, verbose=False)
    epochs = epochs or args.epochs
    data = ClutteredDigitsDataModule(
        **{**data_kw, "num_train": args.num_train, "num_val": 64, "num_test": args.num_test}
    )
    model = AttentionClassifier(
        **model_kw, backbone=backbone() if backbone is not None else None,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
    )
    timer = StepTimer()
    diagnostics = AttentionDiagnostics(summary=False)
    warned = WarnedSteps(diagnostics)
    max_logit = MaxLogitOverTraining()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, log_every_n_steps=args.log_every,
        callbacks=[timer, *(TemperatureSchedule(**kw) for kw in schedules), diagnostics, warned,
                   *callbacks, max_logit],
    )
    trainer.fit(model, data)
    (res,) = trainer.test(model, data, verbose=False)
    return {
        "acc": res["test/acc"],
        "loc": [res.get(f"test/loc/{n}") for n in model.block_names],
        "params": sum(p.numel() for p in model.parameters()),
        "throughput": timer.samples / timer.seconds,
        "blocks": warned.blocks,
        "points": warned.points,
        "warned": warned.warned,
        "kinds": warned.kinds,
        "max_logit": max_logit.value,
        "lowest_head_entropy": warned.lowest_head_entropy,
    }


def run_cnn(model_kw: dict, data_kw: dict, schedules: list[dict], seed: int,
            logger: TensorBoardLogger, callbacks: list[pl.Callback],
            args: argparse.Namespace) -> dict:
    """One fit and test of a row of :data:`MODELS`."""
    return run_one(model_kw, data_kw, seed, args, logger, callbacks, schedules)


def run_vit(label: str, seed: int, logger: TensorBoardLogger, callbacks: list[pl.Callback],
            args: argparse.Namespace) -> dict:
    """One fit and test of a row of :data:`VIT_MODELS`."""
    row = VIT_MODELS[label]
    clip = [QKClip(threshold=row.qkclip)] if row.qkclip is not None else []
    return run_one({}, VIT_DATA, seed, args, logger, [*clip, *callbacks], lr=row.lr,
                   epochs=args.vit_epochs, backbone=partial(small_vit, row.qk_norm))


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def _warned(runs: list[dict]) -> str:
    points = sum(r["points"] for r in runs)
    if not points or not runs[0]["blocks"]:
        return "-"
    kinds = Counter()
    for r in runs:
        kinds.update(r["kinds"])
    share = 100 * sum(r["warned"] for r in runs) / points
    named = ", ".join(f"{k} {100 * n / points:.0f}%" for k, n in kinds.most_common())
    return f"{share:.0f}%" + (f" ({named})" if named else "")


def _steps_per_fit(data_kw: dict, args: argparse.Namespace, epochs: int) -> int:
    return epochs * math.ceil(args.num_train / data_kw.get("batch_size", 64))


def _markdown(setup: str, columns: list[str], cells: list[list[str]]) -> str:
    return "\n".join([setup, "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns), *("| " + " | ".join(c) + " |" for c in cells)])


CNN_COLUMNS = ["model", "test acc % (mean ± std)", "localisation (stage 1 / 2 / 3)",
               "warned steps (kinds)", "params", "train samples/s"]
VIT_COLUMNS = ["model", "test acc % (mean ± std)", "warned steps (kinds)",
               "max logit over training (per seed)", "lowest head entropy", "params",
               "train samples/s"]


def _cnn_cell(label: str, model_kw: dict, runs: list[dict]) -> list[str]:
    stages = len(model_kw.get("stage_widths", [0, 0, 0]))
    locs = []
    for i in range(stages):
        vals = [r["loc"][i] for r in runs if i < len(r["loc"]) and r["loc"][i] is not None]
        locs.append(f"{statistics.mean(vals):.2f}" if vals else "-")
    return [label, _mean_std([r["acc"] for r in runs]), " / ".join(locs), _warned(runs),
            f"{runs[0]['params']:,}", f"{statistics.mean(r['throughput'] for r in runs):.0f}"]


def _lowest(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"  # "-": no logging point


def _vit_cell(label: str, runs: list[dict]) -> list[str]:
    return [label, _mean_std([r["acc"] for r in runs]), _warned(runs),
            " / ".join(f"{r['max_logit']:.0f}" for r in runs),
            _lowest(min(r["lowest_head_entropy"] for r in runs)),
            f"{runs[0]['params']:,}", f"{statistics.mean(r['throughput'] for r in runs):.0f}"]


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The diagnostics' warnings (and "no attention block" for the baseline) belong to the
    # report, not between the progress bar's lines.
    warnings.filterwarnings("ignore", category=AttentionWarning)
    warnings.filterwarnings("ignore", message=r".*no attention block")
    root = Path(args.logdir) / datetime.now().strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    console = Console(stderr=True)
    configs = {
        label: (*load_config(MODELS[label][0], MODELS[label][1]()), MODELS[label][2]())
        for label in args.models if label in MODELS
    }
    vits = [label for label in args.models if label in VIT_MODELS]
    total = args.seeds * (
        sum(_steps_per_fit(data_kw, args, args.epochs) for _, data_kw, _ in configs.values())
        + len(vits) * _steps_per_fit(VIT_DATA, args, args.vit_epochs))
    report_runs: dict[str, str] = {}
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("steps"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )

    def fits(label: str, fit: Callable[..., dict]) -> list[dict]:
        """``fit(seed, logger, callbacks)`` for every seed, logged under ``label``."""
        runs = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            logger = TensorBoardLogger(root, name=label, version=f"seed_{seed}",
                                       default_hp_metric=False)
            runs.append(fit(seed, logger, [Advance(progress, task, f"{label} seed {seed}")]))
            if seed == 0:
                report_runs[label] = logger.log_dir
            progress.console.print(f"{label} seed {seed}: acc {runs[-1]['acc']:.3f} "
                                   f"({time.perf_counter() - t:.0f} s)")
        return runs

    with progress:
        task = progress.add_task("starting", total=total)
        cnn_cells = [
            _cnn_cell(label, model_kw,
                      fits(label, partial(run_cnn, model_kw, data_kw, schedules, args=args)))
            for label, (model_kw, data_kw, schedules) in configs.items()
        ]
        vit_cells = [_vit_cell(label, fits(label, partial(run_vit, label, args=args)))
                     for label in vits]
    threads = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    tables = []
    if cnn_cells:
        data_kw = next(iter(configs.values()))[1]
        setup = (f"Cluttered digits {data_kw['canvas_size']}x{data_kw['canvas_size']}, "
                 f"{args.num_train} train / {args.num_test} test samples, {args.epochs} epochs, "
                 f"batch {data_kw.get('batch_size', 64)}, {args.seeds} seeds; {threads}")
        tables.append(ReportTable("accuracy benchmark (all seeds)", CNN_COLUMNS, cnn_cells,
                                  setup))
    if vit_cells:
        size = VIT_DATA["canvas_size"]
        setup = (f"Planted failure: a small ViT on cluttered digits {size}x{size}, "
                 f"{args.num_train} train / {args.num_test} test samples, {args.vit_epochs} "
                 f"epochs, batch {VIT_DATA['batch_size']}, {args.seeds} seeds; {threads}")
        tables.append(ReportTable("planted failure: transformer heads (all seeds)",
                                  VIT_COLUMNS, vit_cells, setup))
    text = "\n\n".join(_markdown(t.note, t.columns, t.rows) for t in tables)
    text += f"\n\ntotal benchmark time: {time.perf_counter() - start:.0f} s"
    print(text)
    try:
        files = write_report(
            report_runs, root / "report", metrics=["test/acc", "train/loss"],
            title="Accuracy benchmark: baseline vs DSA vs CoordinateAttention, with remedies; "
            "a ViT's planted logit growth",
            tables=[ReportTable(t.title, t.columns, t.rows,
                                t.note + ". Curves and verdicts below: seed 0 of each model.")
                    for t in tables],
        )
    except ReportError as err:  # e.g. --models baseline: nothing with attention to show
        console.print(f"no report: {err}")
    else:
        console.print(f"report: {files.html}")
    return text


if __name__ == "__main__":
    main()
