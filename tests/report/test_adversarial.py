"""Bad and edge inputs to ``lightning-attn report``, each with its expected outcome.

``CASES`` is the report's part of the adversarial table: ``clear`` (one line naming the
problem, exit status 1 or 2, no traceback) or ``correct`` (the report is written, and what was
odd is handled as documented: skipped and named, escaped, or judged). No case may end in a raw
traceback or silently: ``python scripts/adversarial_table.py`` counts the outcomes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_attn.report.command import main

from .synthetic import BLOCK, problem, write_run


def _plain(path: Path) -> Path:
    w = SummaryWriter(str(path))
    w.add_scalar("train/loss", 1.0, 0)
    w.close()
    return path


def _csv(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text(text)
    return path


def _texts(path: Path, **texts: str) -> Path:
    write_run(path)
    w = SummaryWriter(str(path))
    for tag, text in texts.items():
        w.add_text(tag.replace("__", "/"), text, 0)
    w.close()
    return path


def _fifo(path: Path) -> Path:
    write_run(path)
    os.mkfifo(path / "events.out.tfevents.1.fifo")
    return path


#: (id, outcome, make(tmp) -> argv without --output, what stderr or the page must say)
CASES: list[tuple[str, str, Callable[[Path], list[str]], str]] = [
    ("logdir does not exist", "clear", lambda t: [str(t / "nope")], "does not exist"),
    ("logdir is an empty folder", "clear", lambda t: [str((t / "e").mkdir() or t / "e")],
     "no TensorBoard event files"),
    ("logdir is a text file", "clear",
     lambda t: [str((t / "x.txt").write_text("hi") and t / "x.txt")], "neither an event file"),
    ("logdir is a FIFO", "clear", lambda t: [str(os.mkfifo(t / "f") or t / "f")],
     "not a regular file"),
    ("no attn/ tag in the run", "clear", lambda t: [str(_plain(t / "p"))], "no attn/ tags"),
    ("a FIFO named like an event file beside a run", "correct", lambda t: [str(_fifo(t / "r"))],
     "not a regular file"),
    ("a corrupt event file beside a run", "correct",
     lambda t: [str(write_run(t / "r")), ] if (t / "r").mkdir() or (
         t / "r" / "events.out.tfevents.9.bad").write_bytes(b"garbage" * 9) or True else [],
     "skipped unreadable event file"),
    ("metrics.csv without a step column", "clear",
     lambda t: [str(_csv(t / "c", "a,b\n1,2\n"))], "nothing readable"),
    ("metrics.csv with garbage values", "correct",
     lambda t: [str(_csv(t / "c", f"step,attn/{BLOCK}/mask/mean,attn/{BLOCK}/mask/std\n"
                                  "0,0.5,0.1\nx,abc,\n1,0.4,0.1\n"))], "report of 1 run"),
    ("attn/config that is not JSON", "correct",
     lambda t: [str(_texts(t / "r", attn__config="{not json"))], "is not JSON"),
    ("attn/config that is a list", "correct",
     lambda t: [str(_texts(t / "r", attn__config="[1, 2]"))], "not a JSON object"),
    ("invalid thresholds in attn/config", "correct",
     lambda t: [str(write_run(t / "r", config={"thresholds": {"std_threshold": 9}}))],
     "the run's thresholds are invalid"),
    ("unknown thresholds in attn/config", "correct",
     lambda t: [str(write_run(t / "r", config={"thresholds": {"mystery": 1}}))],
     "unknown to this version"),
    ("an attn/problems entry without fields", "correct",
     lambda t: [str(_texts(t / "r", attn__problems=json.dumps({"block": "x"})))],
     "lacks a field"),
    ("a problem of a kind this version does not know", "correct",
     lambda t: [str(write_run(t / "r", config={"thresholds": {}},
                              problems=[problem("from_the_future", 20)]))], "report of 1 run"),
    ("--metric logged by no run", "clear",
     lambda t: [str(write_run(t / "r")), "--metric", "val/nothing"], "is logged by no run"),
    ("--metric empty", "clear", lambda t: [str(write_run(t / "r")), "--metric", ""],
     "--metric must be a scalar tag"),
    ("--output is a file", "clear",
     lambda t: [str(write_run(t / "r")), "--output-file"], "is a file, not a folder"),
    ("NAME=LOGDIR twice", "clear",
     lambda t: [f"a={write_run(t / 'r')}", f"a={write_run(t / 's')}"], "given twice"),
    ("named and unnamed LOGDIRs mixed", "clear",
     lambda t: [f"a={write_run(t / 'r')}", str(write_run(t / "s"))], "name every LOGDIR"),
    ("no LOGDIR at all", "clear", lambda t: [], "the following arguments are required"),
    ("an unknown option", "clear", lambda t: [str(write_run(t / "r")), "--colour"],
     "unrecognized arguments"),
    ("a title with HTML in it", "correct",
     lambda t: [str(write_run(t / "r")), "--title", "<script>x</script>"], "report of 1 run"),
    ("NaN and Inf values in the statistics", "correct",
     lambda t: [str(write_run(t / "r", std=float("nan")))], "report of 1 run"),
    ("a run that logged one point only", "correct",
     lambda t: [str(write_run(t / "r", steps=(5,)))], "report of 1 run"),
    ("two LOGDIRs with the same folder name", "correct",
     lambda t: [str(write_run(t / "a" / "dsa")), str(write_run(t / "b" / "dsa"))],
     "report of 2 run"),
    ("a run with evaluation points only", "correct",
     lambda t: [str(_eval_only(t / "r"))], "report of 1 run"),
    ("huge and negative step numbers", "correct",
     lambda t: [str(write_run(t / "r", steps=(-5, 0, 10**12)))], "report of 1 run"),
]


def _eval_only(path: Path) -> Path:
    w = SummaryWriter(str(path))
    for step in (10, 20):
        for tag, value in (("mask/mean", 0.5), ("mask/std", 0.1)):
            w.add_scalar(f"val/attn/{BLOCK}/{tag}", value, step)
    w.close()
    return path


@pytest.mark.parametrize(("case", "outcome", "make", "says"), CASES, ids=[c[0] for c in CASES])
def test_report_input(case, outcome, make, says, tmp_path, capsys):
    argv = make(tmp_path)
    out = tmp_path / "out"
    if "--output-file" in argv:
        argv.remove("--output-file")
        out.write_text("a file")
    code = None
    try:
        code = main([*argv, "--output", str(out), "--no-progress"])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stderr
    if outcome == "clear":
        assert code in (1, 2)
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and says in errors[0], stderr
    else:
        assert code == 0, stderr
        assert says in stdout + stderr
        assert (out / "report.html").exists()
