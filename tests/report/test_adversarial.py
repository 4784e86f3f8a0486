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

from lightning_attn.core.tags import encode_name
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


def _points(w: SummaryWriter, block: str, steps, stage: str = "") -> None:
    for step in steps:
        for tag, value in (("mask/mean", 0.5), ("mask/std", 0.1)):
            w.add_scalar(f"{stage}attn/{block}/{tag}", value, step)


def _config(w: SummaryWriter, run_id: object, fn: str = "fit") -> None:
    w.add_text("attn/config", json.dumps({"run_id": run_id, "fn": fn, "thresholds": {}}), 0)


def _one_writer(path: Path, *runs: tuple[str, str]) -> Path:
    """One writer (a logger reused): ``(run_id, fn)`` one after another, each with points."""
    w = SummaryWriter(str(path))
    for run_id, fn in runs:
        _config(w, run_id, "fit" if fn == "none" else fn)
        if fn != "none":  # "none": the configuration alone
            _points(w, BLOCK, (10, 20), "val/" if fn == "validate" else "")
    w.close()
    return path


def _two_writers(path: Path, second: str | None = "b" * 32) -> Path:
    """Two writers at once in one folder, their events interleaved (``second`` None: the
    second writes without attn/config, as an earlier release or a user's own writer)."""
    first, other = SummaryWriter(str(path), filename_suffix=".1"), SummaryWriter(
        str(path), filename_suffix=".2")
    _config(first, "a" * 32)
    if second is not None:
        _config(other, second)
    for step in (10, 20, 30):
        _points(first, BLOCK, (step,))
        if second is not None:
            _points(other, BLOCK, (step,))
        else:
            other.add_scalar("train/loss", 1.0, step)
    first.close()
    other.close()
    return path


def _named(path: Path, *blocks: str, raw: bool = False) -> Path:
    """A run whose blocks carry ``blocks`` names (their tags encoded, or ``raw``)."""
    w = SummaryWriter(str(path))
    for block in blocks:
        _points(w, block if raw else encode_name(block), (10, 20))
    w.close()
    return path


def _versions(path: Path) -> Path:
    for version, steps in (("version_0", (10, 20)), ("version_1", (30, 40))):
        w = SummaryWriter(str(path / version))
        _config(w, "c" * 32)
        _points(w, BLOCK, steps)
        w.close()
    return path


LIFECYCLES_AND_NAMES: list[tuple[str, str, Callable[[Path], list[str]], str]] = [
    ("two writers at once in one folder, two run_ids", "correct",
     lambda t: [str(_two_writers(t / "r"))], "this folder holds 2 runs"),
    ("a writer without attn/config beside a run", "correct",
     lambda t: [str(_two_writers(t / "r", None))], "report of 1 run"),
    ("one logger reused by a sweep: two run_ids one after another", "correct",
     lambda t: [str(_one_writer(t / "r", ("a" * 32, "fit"), ("b" * 32, "fit")))],
     "report of 2 run(s)"),
    ("validate before fit on one logger", "correct",
     lambda t: [str(_one_writer(t / "r", ("a" * 32, "validate"), ("b" * 32, "fit")))],
     "of a model in memory"),
    ("three runs in one folder, one of them resumed into it", "correct",
     lambda t: [str(_one_writer(t / "r", ("a" * 32, "fit"), ("b" * 32, "fit"),
                                ("a" * 32, "fit")))], "this folder holds 2 runs"),
    ("an earlier release's two callbacks: two run_ids, the first without points", "correct",
     lambda t: [str(_one_writer(t / "r", ("a" * 32, "none"), ("b" * 32, "fit")))],
     "report of 1 run"),
    ("two versions of one run_id (a resumed fit)", "correct",
     lambda t: [str(_versions(t / "exp"))], "joined the versions of one training run"),
    ("attn/config whose run_id is not a string", "correct",
     lambda t: [str(_one_writer(t / "r", (5, "fit")))], "report of 1 run"),
    ("a block named 'res/3x3'", "correct", lambda t: [str(_named(t / "r", "net.res/3x3"))],
     "### `net.res/3x3`"),
    ("a block named 'a%2Fb' (a literal percent)", "correct",
     lambda t: [str(_named(t / "r", "a%2Fb"))], "### `a%2Fb`"),
    ("a block named with HTML", "correct",
     lambda t: [str(_named(t / "r", "<img src=x onerror=alert(1)>"))],
     "### `<img src=x onerror=alert(1)>`"),
    ("a block named with backticks", "correct", lambda t: [str(_named(t / "r", "a`b``c"))],
     "### ```a`b``c```"),
    ("a block named with a newline", "correct", lambda t: [str(_named(t / "r", "a\nb"))],
     "### `a b`"),
    ("a block named with a lone surrogate", "correct",
     lambda t: [str(_named(t / "r", "x\ud800"))], "report of 1 run"),
    ("blocks whose names differ only in '/' and '-'", "correct",
     lambda t: [str(_named(t / "r", "res/3x3", "res-3x3"))], "### `res-3x3`"),
    ("a tag with an invalid percent sequence", "correct",
     lambda t: [str(_named(t / "r", "net%ZZ", raw=True))], "### `net%ZZ`"),
    ("a run named with Markdown and HTML", "correct",
     lambda t: [f"<b>x</b>|*y*={_named(t / 'r', 'net')}"], "\\<b\\>x\\</b\\>\\|\\*y\\*"),
    ("a title with a backtick and HTML", "correct",
     lambda t: [str(_named(t / "r", "net")), "--title", "`<script>`"],
     "# \\`\\<script\\>\\`"),
]


def _eval_only(path: Path) -> Path:
    w = SummaryWriter(str(path))
    for step in (10, 20):
        for tag, value in (("mask/mean", 0.5), ("mask/std", 0.1)):
            w.add_scalar(f"val/attn/{BLOCK}/{tag}", value, step)
    w.close()
    return path


CASES += LIFECYCLES_AND_NAMES


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
        assert says in stdout + stderr + (out / "report.md").read_text(encoding="utf-8")
        assert (out / "report.html").exists()
