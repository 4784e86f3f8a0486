"""Every value the CLI refuses ends with one line naming it and exit status 2, never a
traceback: our checks (``lightning-attn: error: <key>: <why>``) and jsonargparse's own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_attn.cli import DEBUG_VARIABLE, main

ROOT = Path(__file__).resolve().parents[1]
BASE = ["fit", "--config", "examples/configs/dsa.yaml", "--trainer.logger", "false",
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.num_train", "32", "--data.num_val", "16", "--data.num_test", "16"]

#: (arguments, the key the error must name); ``None``: jsonargparse's own type check.
BAD = [
    (["--model.dsa.temperature", "-1"], "model.dsa.temperature"),
    (["--model.dsa.temperature", "0"], "model.dsa.temperature"),
    (["--model.dsa.eps", "-0.5"], "model.dsa.eps"),
    (["--model.dsa.router_hidden", "0"], "model.dsa.router_hidden"),
    (["--model.dsa.kernels", "[0]"], "model.dsa.kernels"),
    (["--model.dsa.dilated_d", "0"], "model.dsa.dilated_d"),
    (["--model.attention", "coord", "--model.coord.alpha", "1.5"], "model.coord.alpha"),
    (["--model.attention", "coord", "--model.coord.reduction", "0"], "model.coord.reduction"),
    (["--model.dropout", "1.5"], "model.dropout"),
    (["--model.stage_widths", "[0]"], "model.stage_widths"),
    (["--model.depth", "0"], "model.depth"),
    (["--model.num_classes", "5"], "model.num_classes"),
    (["--model.in_channels", "0"], "model.in_channels"),
    (["--data.batch_size", "0"], "data.batch_size"),
    (["--data.num_train", "0"], "data.num_train"),
    (["--data.canvas_size", "4"], "data.canvas_size"),
    (["--diagnostics.num_images", "-1"], "diagnostics.num_images"),
    (["--diagnostics.overlay_alpha", "2"], "diagnostics.overlay_alpha"),
    (["--diagnostics.thresholds.std_threshold", "7"], "diagnostics.thresholds.std_threshold"),
    (["--ckpt_path", "/no/such/last.ckpt"], "ckpt_path"),
    # two diagnostics callbacks alike: the hint how to tell them apart, before Lightning's
    # generic refusal
    (["--trainer.callbacks+=AttentionDiagnostics", "--trainer.callbacks.on_problem=stop"],
     "trainer.callbacks"),
    (["--trainer.callbacks+=MaskHealthMonitor", "--trainer.callbacks+=MaskHealthMonitor"],
     "trainer.callbacks"),
    (["--model.dropout", "abc"], None),
    (["--model.attention", "transformer"], None),
]


@pytest.mark.parametrize(("args", "key"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_refused_value_is_one_line_and_exit_2(args, key, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-attn"])
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    base = [a.replace("examples/", f"{ROOT}/examples/") for a in BASE]
    with pytest.raises(SystemExit) as exit_:
        main(base + args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    if key is not None:
        assert lines[0].startswith(f"lightning-attn: error: {key}: "), lines[0]
    else:
        assert args[0].lstrip("-") in err  # jsonargparse names the key
        assert lines[0].startswith("error:") or "error:" in lines[0]


def test_the_debug_variable_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-attn"])
    monkeypatch.setenv(DEBUG_VARIABLE, "1")
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "examples/configs/dsa.yaml")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        main(["fit", "--config", config, "--data.batch_size", "0", "--trainer.logger", "false"])


def test_the_adversarial_tables_add_up(capsys):
    """``scripts/adversarial_table.py`` counts every table: at least 150 inputs, none raw or
    silent."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("adversarial_table",
                                                  ROOT / "scripts" / "adversarial_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in last.strip("|").split("|")]
    assert cells[0] == "all" and int(cells[1]) >= 150
    assert cells[4:] == ["0", "0"]
