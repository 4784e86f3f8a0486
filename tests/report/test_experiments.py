"""The report groups runs by experiment: a resumed fit is one curve with its parent, and the
validation / test runs of its checkpoints attach to it instead of showing as empty runs."""

from __future__ import annotations

import warnings

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.core.tags import ScalarTag
from lightning_attn.report import build_report, load_runs

from .report_models import BLOCKS, PlantedNet


class Evaluated(PlantedNet):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def test_dataloader(self):
        return self.val_dataloader()


def _trainer(root, max_epochs, ckpt_dir):
    return Trainer(
        max_epochs=max_epochs, log_every_n_steps=1, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(root, name="exp"), enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AttentionDiagnostics(num_images=2, summary=False),
                   ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )


def test_resumed_fit_and_its_evaluations_are_one_run(tmp_path):
    seed_everything(0, verbose=False)
    ckpts = tmp_path / "ckpts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted problems warn
        _trainer(tmp_path, 1, ckpts).fit(Evaluated())                       # version_0
        _trainer(tmp_path, 2, ckpts).fit(Evaluated(), ckpt_path=ckpts / "last.ckpt")  # 1
        _trainer(tmp_path, 2, ckpts).validate(Evaluated(), ckpt_path=ckpts / "last.ckpt")
        _trainer(tmp_path, 2, ckpts).test(Evaluated(), ckpt_path=ckpts / "last.ckpt")
    assert len(list((tmp_path / "exp").glob("version_*"))) == 4

    (run,) = load_runs(tmp_path / "exp", progress=False)
    assert run.name == "exp"
    joined = " ".join(run.notes)
    assert "joined the versions of one training run" in joined
    assert "attached exp/version_2: validate" in joined and "attached exp/version_3: test" in joined
    steps = run.scalars["attn/collapsed/mask/std"].steps
    assert steps == list(range(8))  # epoch 1 from version_0, epoch 2 from the resumed version_1
    stages = {t.stage for t in map(ScalarTag.parse, run.scalars) if t is not None}
    assert stages == {"train", "val", "test"}

    report = build_report([run], progress=False)
    (judged,) = report.runs
    assert {v.status for v in judged.health.verdicts.values()} <= {"healthy", "problem",
                                                                    "warned", "recovered"}
    assert set(judged.health.verdicts) == set(BLOCKS)
    assert judged.health.verdicts["collapsed"].status == "problem"


def test_an_evaluation_without_its_fit_is_judged_on_its_own_points(tmp_path):
    seed_everything(0, verbose=False)
    ckpts = tmp_path / "ckpts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path / "fit", 1, ckpts).fit(Evaluated())
        _trainer(tmp_path / "eval", 1, ckpts).test(Evaluated(), ckpt_path=ckpts / "last.ckpt")
    (run,) = load_runs(tmp_path / "eval" / "exp", progress=False)
    assert "an evaluation (test)" in " ".join(run.notes)
    report = build_report([run], progress=False)
    (judged,) = report.runs
    assert judged.health.phase == "test"
    assert judged.health.verdicts["collapsed"].status == "problem"  # never "no data"
