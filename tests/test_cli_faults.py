"""Faults during a CLI run: a fit ended by SIGTERM saves what Lightning saves and exits with
status 143, as a killed job; two diagnostics callbacks alike are one line with the hint."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from lightning_attn.cli import DEBUG_VARIABLE, main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["fit", "--config", str(ROOT / "examples/configs/dsa.yaml"),
        "--trainer.enable_progress_bar", "false", "--data.num_train", "64",
        "--data.num_val", "16", "--data.num_test", "16", "--data.batch_size", "8"]


class SigtermAt(Callback):
    """Sends SIGTERM to this process after training step ``step``, as a scheduler would."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            # Lightning's handler must be in place, or the signal would end the tests.
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_fit_ended_by_sigterm_saves_a_checkpoint_and_exits_143(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-attn"])
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # the callback above, by its class path
    with pytest.raises(SystemExit) as exit_:
        main([*BASE, "--trainer.max_steps", "40",
              "--trainer.callbacks+=tests.test_cli_faults.SigtermAt"])
    assert exit_.value.code == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    saved = sorted(p.name for p in tmp_path.glob("runs/**/checkpoints/*.ckpt"))
    assert "last.ckpt" in saved and len(saved) == 2, saved  # on exception, and the last
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Lightning restored it
