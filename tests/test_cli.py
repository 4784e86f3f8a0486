"""The ``lightning-attn`` CLI: example configs parse; 2-process CPU DDP fit and resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_attn import __version__
from lightning_attn.cli import build_cli, main
from lightning_attn.modules import AttentionClassifier

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
TINY_DATA = [
    "--data.canvas_size", "24", "--data.digit_size", "[10,16]", "--data.num_train", "64",
    "--data.num_val", "32", "--data.num_test", "32", "--data.batch_size", "16",
    "--model.stage_widths", "[4,8]",
]


def _command() -> list[str]:
    script = Path(sys.executable).with_name("lightning-attn")
    exe = str(script) if script.exists() else shutil.which("lightning-attn")
    return [exe] if exe else [sys.executable, "-m", "lightning_attn.cli"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-attn"])  # not pytest's own arguments


def test_help_describes_the_tool_and_version_prints(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: lightning-attn" in out and "AttentionClassifier" in out
    assert "Lightning Trainer command line tool" not in out
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for field in ("std_threshold", "saturation_threshold", "recovery_margin"):
        assert f"--diagnostics.thresholds.{field}" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-attn {__version__}"


@pytest.mark.parametrize("name", ["baseline", "dsa", "coord", "dsa_remedies"])
def test_example_configs_build(name: str, tmp_path) -> None:
    cli = build_cli(
        ["--config", str(CONFIGS / f"{name}.yaml"), *TINY_DATA,
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    assert isinstance(cli.model, AttentionClassifier)
    assert cli.model.hparams.attention == {"baseline": "none", "dsa_remedies": "dsa"}.get(
        name, name
    )
    if name in ("dsa", "dsa_remedies"):  # the block arguments of the config reached the blocks
        assert cli.model.hparams.dsa["kernels"] == [3, 7]
        assert all(b.t_raw.requires_grad for b in _blocks(cli.model, "DynamicSpatialAttention"))
    if name == "coord":
        assert {b.pool for b in _blocks(cli.model, "CoordinateAttention")} == {"mean_max"}
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert "RichProgressBar" in names and _checkpoint(cli)
    assert cli.trainer.logger.save_dir == str(tmp_path)


def _checkpoint(cli) -> ModelCheckpoint:
    (checkpoint,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    return checkpoint


def _blocks(model: torch.nn.Module, kind: str) -> list[torch.nn.Module]:
    blocks = [m for m in model.modules() if type(m).__name__ == kind]
    assert blocks, kind
    return blocks


def test_help_lists_choices_and_every_block_argument(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for shown in (
        "--model.attention {dsa,coord,none}", "--model.activation {relu,gelu,silu}",
        "--model.downsample {maxpool,avgpool,stride}", "--model.dsa.temperature",
        "--model.dsa.learnable_temperature", "--model.coord.reduction", "--model.coord.beta",
    ):
        assert shown in out, shown


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        (["--model.attention", "se"], "model.attention"),
        (["--model.activation", "tanh"], "model.activation"),
        (["--model.downsample", "fft"], "model.downsample"),
        (["--model.dsa.temperature", "warm"], "model.dsa.temperature"),
        (["--model.dsa.kernels", "[3,x]"], "model.dsa.kernels"),
        (["--model.coord.no_such_argument", "8"], "--model.coord.no_such_argument"),
    ],
)
def test_bad_values_are_rejected_before_anything_is_built(bad, key, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_cli(["--config", str(CONFIGS / "dsa.yaml"), *bad], run=False)
    assert exit_.value.code == 2
    assert key in capsys.readouterr().err


def test_print_config_shows_the_block_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "coord.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["attention"] == "coord"
    assert model["coord"]["pool"] == "mean_max" and model["coord"]["alpha"] == 1.0
    assert model["dsa"]["temperature"] == 1.0  # every block's arguments, with defaults


@pytest.mark.parametrize(
    ("extra", "bar"),
    [
        ([], "RichProgressBar"),
        (["--trainer.enable_progress_bar", "false"], None),
        (["--trainer.callbacks+=TQDMProgressBar"], "TQDMProgressBar"),
    ],
)
def test_progress_bar_follows_the_trainer_options(extra, bar, tmp_path) -> None:
    cli = build_cli(
        ["--config", str(CONFIGS / "dsa.yaml"), *TINY_DATA,
         "--trainer.logger.init_args.save_dir", str(tmp_path), *extra],
        run=False,
    )
    bars = [type(cb).__name__ for cb in cli.trainer.callbacks if "ProgressBar" in type(cb).__name__]
    assert bars == ([bar] if bar else [])


def test_remedies_config_builds(tmp_path) -> None:
    from lightning_attn.callbacks import TemperatureSchedule

    cli = build_cli(
        ["--config", str(CONFIGS / "dsa_remedies.yaml"), *TINY_DATA,
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    config = yaml.safe_load((CONFIGS / "dsa_remedies.yaml").read_text())
    assert cli.model.aux_weights == {k: float(v) for k, v in config["model"]["aux_loss"].items()}
    assert cli.model.hparams.aux_loss["balance"] == config["model"]["aux_loss"]["balance"]
    (schedule,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TemperatureSchedule)]
    wanted = config["trainer"]["callbacks"][0]["init_args"]
    for key, value in wanted.items():
        got = getattr(schedule, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert "AttentionDiagnostics" in {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert _checkpoint(cli)


def test_remedies_from_the_command_line_and_in_help(tmp_path, capsys) -> None:
    from lightning_attn.callbacks import TemperatureSchedule

    cli = build_cli(
        ["--config", str(CONFIGS / "dsa.yaml"), *TINY_DATA,
         "--trainer.logger.init_args.save_dir", str(tmp_path),
         "--trainer.callbacks+=TemperatureSchedule", "--trainer.callbacks.start", "6",
         "--trainer.callbacks.mode", "linear", "--model.aux_loss.balance", "0.02",
         "--model.coord.bounded", "true"],
        run=False,
    )
    (schedule,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, TemperatureSchedule)]
    assert (schedule.start, schedule.mode, schedule.end) == (6.0, "linear", 1.0)
    assert cli.model.aux_weights == {"balance": 0.02}
    assert cli.model.hparams.coord["bounded"] is True
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for shown in ("--model.aux_loss.balance", "--model.aux_loss.importance",
                  "--model.aux_loss.entropy", "--model.aux_loss.z_loss", "--model.coord.bounded",
                  "TemperatureSchedule"):
        assert shown in out, shown


def test_ddp_config_builds(tmp_path) -> None:
    cli = build_cli(
        ["--config", str(CONFIGS / "dsa.yaml"), "--config", str(CONFIGS / "ddp.yaml"),
         *TINY_DATA, "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    assert cli.trainer.num_devices == 2


def _fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        *_command(), "fit", "--config", str(CONFIGS / "dsa.yaml"), *TINY_DATA,
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_epochs", "-1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path), *extra,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_ddp_fit_then_resume(tmp_path) -> None:
    first = _fit(tmp_path, "--trainer.max_steps", "4")
    assert "Starting with 2 processes" in first.stdout + first.stderr
    runs = tmp_path / "runs" / "dsa"
    ckpts = sorted(runs.rglob("*.ckpt"))
    events = sorted(runs.rglob("events.out.tfevents.*"))
    assert sorted(c.name for c in ckpts)[-1] == "last.ckpt" and len(ckpts) == 2, ckpts
    assert len(events) == 1, events
    (last,) = [c for c in ckpts if c.name == "last.ckpt"]
    step = torch.load(last, weights_only=True)["global_step"]
    assert 0 < step <= 4  # the latest saved state, at least as late as the best one
    assert all(torch.load(c, weights_only=True)["global_step"] <= step for c in ckpts)

    # Resume from last.ckpt, as the README says; with no monitor a checkpoint is saved at the
    # end of every training epoch, so the run's final state is saved too.
    _fit(tmp_path, "--trainer.max_steps", "8", "--checkpoint.monitor", "null",
         "--ckpt_path", str(last))
    resumed = set(runs.rglob("*.ckpt")) - set(ckpts)
    assert {c.parent.parent for c in resumed} != {last.parent.parent}  # a new version
    assert max(torch.load(c, weights_only=True)["global_step"] for c in resumed) == 8 > step


def test_coord_config_keeps_its_learnable_alphas_in_range(tmp_path) -> None:
    """coord.yaml's alphas are bounded (docs/remedies.md: ahead at its own budget), so no
    optimizer step can make them drift: pushed as far as a raw parameter goes, no block
    reports a parameter_drift."""
    from lightning_attn.core.problems import HealthThresholds, find_problems
    from lightning_attn.core.statistics import BlockStats, GlobalStats

    cli = build_cli(
        ["--config", str(CONFIGS / "coord.yaml"), *TINY_DATA,
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        run=False,
    )
    blocks = _blocks(cli.model, "CoordinateAttention")
    for block in blocks:
        assert block.bounded and set(block.attention_parameters()) >= {"alpha_h", "alpha_w"}
        with torch.no_grad():
            for raw in block.trainable_attention_parameters().values():
                raw.fill_(50.0)
        params = {n: float(v) for n, v in block.attention_parameters().items()}
        assert all(0.0 <= v <= 1.0 for v in params.values()), params
        stats = GlobalStats(step=1, blocks={"b": BlockStats(
            params=params, trainable=frozenset(params),
            param_specs=block.attention_parameter_specs())})
        assert find_problems(stats, HealthThresholds()) == []
