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
from lightning_attn.report.experiments import step_unknown

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


def _ckpt_step(path) -> int:
    import torch

    from lightning_attn.schedule import LoggingSchedule

    return LoggingSchedule.checkpoint_step(torch.load(path, weights_only=False))


def test_an_evaluation_of_a_checkpoint_is_at_the_checkpoints_step(tmp_path):
    """A new Trainer's validate / test of the checkpoint after 8 steps: Lightning logs the
    module's val/acc at step 0; the report shows it, and the diagnostics' points, at step 7,
    where the fit validated the same weights."""
    seed_everything(0, verbose=False)
    ckpts = tmp_path / "ckpts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, 2, ckpts).fit(Evaluated())                                # version_0
        _trainer(tmp_path, 2, ckpts).validate(Evaluated(), ckpt_path=ckpts / "last.ckpt")
        _trainer(tmp_path, 2, ckpts).test(Evaluated(), ckpt_path=ckpts / "last.ckpt")
    step = _ckpt_step(ckpts / "last.ckpt")
    assert step == 7  # the 8th step's weights: where the fit validated them
    (run,) = load_runs(tmp_path / "exp", progress=False)
    assert "attached exp/version_1: validate" in " ".join(run.notes)
    # the fit validated at steps 3 and 7; the validate call's point is at 7, none at 0
    assert run.scalars["val/acc"].steps == [3, 7]
    assert run.scalars["val/attn/collapsed/mask/std"].steps == [3, 7]
    assert run.scalars["val/attn/healthy/param/alpha"].steps == [3, 7]
    assert run.scalars["test/acc"].steps == [step]
    assert run.scalars["test/attn/collapsed/mask/std"].steps == [step]
    assert [r.step for r in run.images["test/attn/maps"]] == [step]


def test_a_test_of_the_best_checkpoint_after_fit_is_at_its_step(tmp_path):
    """``trainer.test(ckpt_path="best")`` after ``fit`` (the demo): at the best checkpoint's
    step, not at the step the fit ended."""
    seed_everything(0, verbose=False)
    trainer = Trainer(
        max_epochs=3, log_every_n_steps=1, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(tmp_path, name="exp"), enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AttentionDiagnostics(num_images=0, summary=False),
                   ModelCheckpoint(monitor="epoch_index", mode="min")],
    )

    class FirstIsBest(Evaluated):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log("epoch_index", float(self.current_epoch))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FirstIsBest()
        trainer.fit(model)
        trainer.test(model, ckpt_path="best")
    best = _ckpt_step(trainer.checkpoint_callback.best_model_path)
    assert best == 3 < trainer.global_step == 12
    (run,) = load_runs(tmp_path / "exp", progress=False)
    assert run.scalars["test/acc"].steps == [best]
    assert run.scalars["test/attn/collapsed/mask/std"].steps == [best]
    assert run.scalars["val/acc"].steps == [3, 7, 11]  # the fit's own points stay


def test_an_evaluation_of_weights_without_a_checkpoint_is_a_marker(tmp_path):
    """A new Trainer validating a model it did not train, with no checkpoint: the step of
    the weights is unknown. It is not attached to the fit (no curve from step 0) and its
    figures have no step axis."""
    seed_everything(0, verbose=False)
    diagnostics = AttentionDiagnostics(num_images=0, summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Evaluated()
        Trainer(max_epochs=2, log_every_n_steps=1, accelerator="cpu", devices=1,
                logger=TensorBoardLogger(tmp_path, name="exp"), enable_progress_bar=False,
                enable_model_summary=False, callbacks=[diagnostics],
                enable_checkpointing=False).fit(model)
        # the same callback (same run_id) in a new Trainer, with the weights in memory
        Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="exp"),
                enable_progress_bar=False, enable_model_summary=False,
                callbacks=[diagnostics]).validate(model)
    fit, evaluation = load_runs(tmp_path / "exp", progress=False)
    assert fit.scalars["val/acc"].steps == [3, 7]
    assert step_unknown(evaluation) and not step_unknown(fit)
    assert "the step its weights were trained to is unknown" in " ".join(evaluation.notes)
    report = build_report([fit, evaluation], metrics=["val/acc"], progress=False)
    assert report.metrics_figure is not None
    assert all(r.block_figures for r in report.runs)
