"""One tiny real training run with planted problems, logged to TensorBoard and CSV, and its
report: shared by the report tests (training takes a few seconds, so it happens once)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.report import ReportFiles, write_report

from .report_models import PlantedNet


@dataclass(frozen=True)
class PlantedRun:
    tensorboard: Path  # the TensorBoardLogger's version directory
    csv: Path  # the CSVLogger's version directory
    reported: dict[str, int]  # the callback's own "<block>|<kind>" -> step of the warning


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory) -> PlantedRun:
    seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("runs")
    tb = TensorBoardLogger(root, name="planted")
    csv = CSVLogger(root, name="planted_csv")
    diagnostics = AttentionDiagnostics(num_images=4, summary=False)
    trainer = Trainer(
        max_epochs=2, log_every_n_steps=1, logger=[tb, csv], callbacks=[diagnostics],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        accelerator="cpu", devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted problems warn, as they should
        trainer.fit(PlantedNet())
    return PlantedRun(Path(tb.log_dir), Path(csv.log_dir), dict(diagnostics._reporter.reported))


@pytest.fixture(scope="session")
def planted_report(planted_run, tmp_path_factory) -> ReportFiles:
    out = tmp_path_factory.mktemp("report")
    return write_report(planted_run.tensorboard, out, metrics=["val/acc"], progress=False)


@pytest.fixture(scope="session")
def compared_report(planted_run, tmp_path_factory) -> ReportFiles:
    """The same run from TensorBoard and from the CSV fallback, side by side."""
    out = tmp_path_factory.mktemp("compared")
    return write_report(
        {"tensorboard": planted_run.tensorboard, "csv": planted_run.csv}, out,
        metrics=["val/acc", "val/loss"], progress=False,
    )
