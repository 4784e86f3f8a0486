"""The first commands of a new user: no warning, ``report`` without Lightning, a readable
``--help``, one line for every mistake of the environment or of a flag, optional dependencies
named with their extra."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import lightning.fabric.accelerators.cuda as fabric_cuda
import lightning.pytorch.accelerators.cuda as pytorch_cuda
import pytest
import torch

from lightning_attn import environment
from lightning_attn.cli import AttentionCLI, build_cli, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "configs" / "dsa.yaml")
TINY = [
    "--config", CONFIG, "--data.canvas_size", "24", "--data.digit_size", "[10,16]",
    "--data.num_train", "64", "--data.num_val", "32", "--data.num_test", "32",
    "--data.batch_size", "16", "--model.stage_widths", "[4,8]",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-attn"])


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with Python's default warning filters (pytest's
    filters do not apply there)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# -- lightning-attn report: no Lightning ----------------------------------------------------
def test_report_help_imports_neither_lightning_torch_nor_the_plotting_stack():
    proc = _python(
        "import sys\n"
        "from lightning_attn.report.command import build_parser\n"
        "build_parser()\n"
        "from lightning_attn.cli import main\n"
        "try:\n"
        "    main(['report', '--help'])\n"
        "except SystemExit as exit_:\n"
        "    assert exit_.code == 0\n"
        "heavy = ('lightning', 'jsonargparse', 'matplotlib', 'tensorboard', 'torch')\n"
        "print('IMPORTED', [m for m in heavy if m in sys.modules])\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: lightning-attn report" in proc.stdout
    assert "IMPORTED []" in proc.stdout, proc.stdout[-500:]


# -- a clean start ---------------------------------------------------------------------------
def test_the_first_commands_print_no_warning(tmp_path):
    """``--help``, ``--version``, ``fit --help``, ``report --help`` and a short fit print no
    warning of a third-party package about its own code (torchvision's image codecs,
    Lightning's use of a deprecated torch class)."""
    args = [["--help"], ["--version"], ["fit", "--help"], ["report", "--help"],
            ["fit", *TINY, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
             "--trainer.logger.init_args.save_dir", str(tmp_path)]]
    proc = _python(
        "from lightning_attn.cli import main\n"
        f"for args in {args!r}:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit_:\n"
        "        assert not exit_.code, (args, exit_.code)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "deprecated" not in proc.stderr, proc.stderr[-3000:]


def test_exactly_the_known_warnings_are_filtered():
    (message, category, module), *_ = environment.KNOWN_WARNINGS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        environment.ignore_known_warnings()
        warnings.warn_explicit("Failed to load image Python extension: 'no image.so'",
                               UserWarning, "image.py", 13, module="torchvision.io.image")
        warnings.warn_explicit("Failed to load image Python extension", UserWarning,
                               "mine.py", 1, module="my_package")  # not torchvision's
        warnings.warn_explicit("another warning", UserWarning, "image.py", 14,
                               module="torchvision.io.image")
    assert [str(w.message) for w in caught] == ["Failed to load image Python extension",
                                                "another warning"]


# -- the environment's and the flags' mistakes: one line -------------------------------------
def _gpus(n: int):
    """This machine as if torch saw ``n`` CUDA devices (the test runs anywhere)."""
    return mock.patch.multiple(torch.cuda, is_available=lambda: n > 0, device_count=lambda: n), \
        mock.patch.object(fabric_cuda, "num_cuda_devices", lambda: n), \
        mock.patch.object(pytorch_cuda, "num_cuda_devices", lambda: n, create=True)


@pytest.mark.parametrize(
    ("gpus", "flags", "key", "hint"),
    [
        (0, ["--trainer.accelerator", "gpu"], "trainer.accelerator",
         "use --trainer.accelerator cpu"),
        (0, ["--trainer.accelerator", "cuda", "--trainer.devices", "2"], "trainer.accelerator",
         "no GPU visible to torch"),
        (1, ["--trainer.accelerator", "gpu", "--trainer.devices", "4"], "trainer.devices",
         "1 GPU(s)"),
        (0, ["--trainer.accelerator", "cpu", "--trainer.devices", "0"], "trainer.devices",
         "--trainer.devices auto"),
        (0, ["--trainer.strategy", "dpp"], "trainer.strategy", "did you mean ddp?"),
        (0, ["--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], "trainer.strategy",
         "common strategies"),
        (0, ["--trainer.num_nodes", "0"], "trainer.num_nodes", "1 on one machine"),
    ],
)
def test_a_mistake_of_the_environment_is_one_line_with_what_to_use(gpus, flags, key, hint,
                                                                   capsys):
    patches = _gpus(gpus)
    with patches[0], patches[1], patches[2], pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.logger", "false", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith(f"lightning-attn: error: {key}: ") and hint in line, line


@pytest.mark.parametrize(("given", "meant"), [
    ("--trainer.max_epoch", "--trainer.max_epochs"),
    ("--model.dsa.temp", "--model.dsa.temperature"),
    ("--data.batch", "--data.batch_size"),
])
def test_a_prefix_of_an_option_is_refused_and_the_option_named(given, meant, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.logger", "false", given, "3", "--print_config"])
    assert exit_.value.code == 2  # not read as `meant` (print_config would exit 0)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"unrecognized arguments: {given} 3" in line and f"did you mean {meant}?" in line


# -- help ------------------------------------------------------------------------------------
def test_fit_help_shows_our_options_each_described_and_points_to_the_rest(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    short = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--help=all"])
    full = capsys.readouterr().out
    assert len(short.splitlines()) < 600 < len(full.splitlines())
    assert "lightning-attn fit --help=all" in short
    assert "--trainer.gradient_clip_val" in full and "--trainer.gradient_clip_val" not in short
    assert "torch.nn.Bilinear" in full and "torch.nn.Bilinear" not in short
    cli = build_cli(["--trainer.logger", "false"], run=False)
    from lightning_attn._trainer_cli import brief

    shown = [a for a in cli.parser._actions if a.option_strings and brief(a)]
    for action in shown:
        assert action.option_strings[-1] in short
    ours = [a for a in shown if a.dest.startswith(("model.", "data.", "diagnostics."))]
    assert len(ours) > 60
    undescribed = [a.dest for a in ours if not (a.help or "").strip()]
    assert not undescribed, undescribed  # include, saturation_low, coord.* had none


def test_a_monitored_metric_that_is_not_logged_is_named_with_the_nearest(tmp_path):
    """A fit shorter than one epoch never validates: ``val/acc`` is missing. The warning
    names it and three logged metrics, not every logged one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *TINY, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    (told,) = [str(w.message) for w in caught if "val/acc" in str(w.message)]
    assert "no 'val/acc' among the" in told and "nearest: " in told
    assert "validation has not run yet" in told
    assert "attn/" not in told and len(told) < 500, told
    assert (next(tmp_path.rglob("last.ckpt"))).is_file()


def test_the_parsed_configuration_belongs_to_each_cli(tmp_path):
    assert "parsed" not in vars(AttentionCLI)
    first = build_cli(["--trainer.logger", "false", "--model.depth", "2"], run=False)
    second = build_cli(["--trainer.logger", "false"], run=False)
    assert first.parsed is first.config and second.parsed is second.config
    assert (first.parsed.model.depth, second.parsed.model.depth) == (2, 1)


# -- optional dependencies -------------------------------------------------------------------
def test_the_report_without_matplotlib_names_the_extra(tmp_path):
    proc = _python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed\n"
        "from lightning_attn.cli import main\n"
        f"main(['report', {str(tmp_path)!r}, '--output', {str(tmp_path / 'out')!r}])\n"
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "lightning-attn report: error: The report (its figures) needs matplotlib, which is "
        "not installed: pip install 'lightning-attn[report]' (or pip install matplotlib)"
    ]


def test_the_digits_without_scikit_learn_name_the_extra(monkeypatch):
    from lightning_attn.data import cluttered_digits

    cluttered_digits._load_source_digits_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if not installed
    with pytest.raises(environment.MissingExtraError,
                       match=r"needs scikit-learn.*pip install 'lightning-attn\[data\]'"):
        cluttered_digits.load_source_digits()
    monkeypatch.undo()
    cluttered_digits._load_source_digits_cached.cache_clear()
    assert cluttered_digits.load_source_digits()[0].shape == (1797, 8, 8)
