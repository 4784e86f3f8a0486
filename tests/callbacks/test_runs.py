"""A run belongs to its fit: a sweep reusing one callback, an evaluation before a fit, a
resume without the callback's state, a checkpoint with a state this version cannot read,
two callbacks alike, and ``ddp_spawn`` giving the run's state back to the main process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_attn.blocks import attention_adapter
from lightning_attn.callbacks import AttentionDiagnostics, MaskHealthMonitor
from lightning_attn.callbacks.diagnostics import check_distinct
from lightning_attn.core import DiagnosticsStateWarning, MaskCollapseWarning
from lightning_attn.report import load_runs, parse_tags

from .cb_models import FakeNet, make_trainer

SPAWN_SCRIPT = Path(__file__).with_name("spawn_script.py")


def _constant(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, 0.5)  # a collapsed mask: std 0


def _diag(**kwargs) -> AttentionDiagnostics:
    return AttentionDiagnostics(**{"num_images": 0, "summary": False, "log_every_n_steps": 1,
                                   **kwargs})


def _fit(tmp_path, callbacks, model=None, ckpt_path=None, logger=False, max_steps=2, **kw):
    """Fit; returns the trainer and the warnings."""
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, logger=logger, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model or FakeNet(transform=_constant), ckpt_path=ckpt_path)
    return trainer, caught


def _of(caught, category) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def _config(run) -> dict:
    return parse_tags(run).config


# -- a sweep: three fits, one callback -------------------------------------------------------
def test_a_sweep_of_three_fits_with_one_callback_is_three_runs(tmp_path):
    callback = _diag()
    run_ids, points = [], []
    for fit in range(3):
        logger = TensorBoardLogger(tmp_path, name="sweep")
        _, caught = _fit(tmp_path, [callback], logger=logger, max_steps=2 + fit)
        # Each fit warns about its own model (the previous fit's warning state is gone).
        assert len(_of(caught, MaskCollapseWarning)) == 1, fit
        run_ids.append(callback.run_id)
        points.append(callback.num_points)
    assert len(set(run_ids)) == 3 and None not in run_ids
    assert points == [2, 3, 4]  # counted per fit
    runs = load_runs(tmp_path / "sweep", progress=False)
    assert sorted(_config(r)["run_id"] for r in runs) == sorted(run_ids)
    assert not any("joined" in note for r in runs for note in r.notes)
    steps = sorted(len(r.scalars["attn/block/mask/std"]) for r in runs)
    assert steps == [2, 3, 4]  # each run its own curve, none overwriting another


@pytest.mark.parametrize("writers", ["one logger", "a logger per fit"])
def test_a_sweep_logging_to_one_folder_is_three_runs_there(tmp_path, writers):
    callback = _diag()
    logger = TensorBoardLogger(tmp_path, name="shared", version=0)
    for max_steps in (2, 3, 4):
        if writers != "one logger":  # the same folder, a writer (event file) of its own
            logger = TensorBoardLogger(tmp_path, name="shared", version=0)
        _fit(tmp_path, [callback], logger=logger, max_steps=max_steps)
        logger.experiment.flush()
    runs = load_runs(tmp_path / "shared", progress=False)
    assert len(runs) == 3
    assert sorted(len(r.scalars["attn/block/mask/std"]) for r in runs) == [2, 3, 4]
    assert all("this folder holds 3 runs" in " ".join(r.notes) for r in runs)


# -- an evaluation before the fit ----------------------------------------------------------
class Validated(FakeNet):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def val_dataloader(self):
        return self.train_dataloader()


def test_validate_before_fit_leaves_the_fit_its_own_config(tmp_path):
    callback = _diag()
    logger = TensorBoardLogger(tmp_path, name="exp", version=0)
    trainer = make_trainer(tmp_path, [callback], max_steps=3, logger=logger,
                           limit_val_batches=2)
    model = Validated(transform=_constant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model)
        validated = callback.run_id
        trainer.fit(model)
    assert callback.run_id != validated
    logger.experiment.flush()
    runs = {_config(r)["fn"]: r for r in load_runs(tmp_path / "exp", progress=False)}
    assert set(runs) == {"validate", "fit"}
    assert _config(runs["fit"])["run_id"] == callback.run_id
    assert len(runs["fit"].scalars["attn/block/mask/std"]) == 3
    assert "of a model in memory" in " ".join(runs["validate"].notes)


def test_an_evaluation_after_the_fit_carries_its_run_id(tmp_path):
    callback = _diag()
    trainer, _ = _fit(tmp_path, [callback], model=Validated(), limit_val_batches=1)
    fitted = callback.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(trainer.lightning_module)
    assert callback.run_id == fitted


def test_callbacks_of_one_trainer_share_the_run_id(tmp_path):
    first, second = MaskHealthMonitor(log_every_n_steps=1), _diag(sections=["router"])
    _fit(tmp_path, [first, second])
    assert first.run_id == second.run_id is not None


# -- resuming ------------------------------------------------------------------------------
def _checkpoint(tmp_path, callbacks) -> Path:
    trainer, _ = _fit(tmp_path, callbacks)
    path = tmp_path / "first.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_resume_without_the_callbacks_state_says_so_once_and_names_the_run(tmp_path):
    ckpt = _checkpoint(tmp_path, [])
    callback = _diag()
    _, caught = _fit(tmp_path, [callback], ckpt_path=ckpt, max_steps=4)
    (said,) = _of(caught, DiagnosticsStateWarning)
    assert callback.run_id in said and "first.ckpt" in said
    assert "written without it" in said


def test_resume_with_another_callbacks_state_names_it(tmp_path):
    ckpt = _checkpoint(tmp_path, [_diag(sections=["mask"])])
    callback = _diag()
    _, caught = _fit(tmp_path, [callback], ckpt_path=ckpt, max_steps=4)
    (said,) = _of(caught, DiagnosticsStateWarning)
    assert "'sections': ('mask',)" in said and callback.run_id in said


def test_resume_with_the_state_continues_the_run_silently(tmp_path):
    first = _diag()
    ckpt = _checkpoint(tmp_path, [first])
    second = _diag()
    _, caught = _fit(tmp_path, [second], ckpt_path=ckpt, max_steps=4)
    assert _of(caught, DiagnosticsStateWarning) == []
    assert second.run_id == first.run_id and second.num_points == 4


#: A state under this callback's key that this version cannot read: what the warning says.
BAD_STATES = [
    (["a", "list"], "a list, not a mapping"),
    ({"num_points": "many"}, "num_points is 'many'"),
    ({"num_points": -3}, "num_points is -3"),
    ({"layout_dirs": 5}, "layout_dirs is 5"),
    ({"run_id": 7}, "run_id is 7"),
    ({"reported": [1, 2]}, "reported is a list"),
    ({"reported": {"block|mask_collapse": "x"}}, "'block|mask_collapse': 'x'"),
    ({"reported": {"reported": {"b|k": 1}, "active": ["c|k"]}}, "active keys"),
]


@pytest.mark.parametrize(("state", "said"), BAD_STATES, ids=[s for _, s in BAD_STATES])
def test_an_unreadable_state_is_a_named_warning_not_a_type_error(tmp_path, state, said):
    callback = _diag()
    ckpt = _checkpoint(tmp_path, [callback])
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["callbacks"][callback.state_key] = state
    torch.save(checkpoint, ckpt)
    resumed = _diag()
    _, caught = _fit(tmp_path, [resumed], ckpt_path=ckpt, max_steps=4)
    (warning,) = _of(caught, DiagnosticsStateWarning)
    assert said in warning and "unreadable" in warning and resumed.run_id in warning
    assert resumed.num_points == 2  # a new run: the two points after the resume


def test_an_earlier_releases_state_resumes_with_a_new_run_named(tmp_path):
    callback = _diag()
    ckpt = _checkpoint(tmp_path, [callback])
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["callbacks"][callback.state_key] = {"reported": {"block|mask_collapse": 1},
                                                    "num_points": 2, "layout_dirs": []}
    torch.save(checkpoint, ckpt)
    resumed = _diag()
    _, caught = _fit(tmp_path, [resumed], ckpt_path=ckpt, max_steps=4)
    (warning,) = _of(caught, DiagnosticsStateWarning)
    assert "earlier release" in warning and resumed.run_id in warning
    assert resumed.num_points == 4 and _of(caught, MaskCollapseWarning) == []


# -- two callbacks alike -------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(x)


def test_two_alike_callbacks_get_the_hint_how_to_tell_them_apart():
    # Lightning's own refusal (when it builds the Trainer) is generic; the CLI checks first.
    with pytest.raises(ValueError, match=r"include=/exclude= \(other blocks\), sections="
                                         r".* \(they differ only in on_problem\)"):
        check_distinct([_diag(), MaskHealthMonitor(), _diag(on_problem="stop")])
    with pytest.raises(ValueError, match="they are identical: one is enough"):
        check_distinct([_diag(), _diag()])
    check_distinct([_diag(), MaskHealthMonitor(), _diag(include=["block"])])


def test_callbacks_with_other_adapters_share_a_trainer(tmp_path):
    plain = _diag()
    gated = _diag(adapters=[attention_adapter(Gate, masks={"mask": "sigmoid"})])
    assert plain.state_key != gated.state_key
    assert plain.state_key == _diag().state_key  # an earlier checkpoint's key, unchanged
    _fit(tmp_path, [plain, gated])


# -- ddp_spawn -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_spawn_gives_the_runs_state_back_to_the_main_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(SPAWN_SCRIPT), str(tmp_path)],
                          cwd=Path(__file__).parents[2], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    main = json.loads((tmp_path / "main.json").read_text())
    worker = json.loads((tmp_path / "rank0.json").read_text())
    assert main["run_id"] is not None and main == worker
    assert main["num_points"] == 2 and main["last_step"] == 3
    assert main["reported"] == {"block|mask_collapse": 1}
    assert main["last_problems"] == ["mask_collapse"]
