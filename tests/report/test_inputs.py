"""Bad input: one clear line, exit status 1, no traceback; damaged files named and skipped."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from lightning_attn.cli import main as cli_main
from lightning_attn.report import ReportError, find_runs, judge_run, load_runs, parse_tags
from lightning_attn.report.command import main

from .synthetic import BLOCK, write_run


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-attn report: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_logdir(tmp_path, capsys):
    code, _, err = _run(capsys, str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert code == 1
    assert "does not exist" in _one_error_line(err) and "nope" in err
    assert not (tmp_path / "out").exists()


def test_logdir_without_event_files_or_csv(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert code == 1
    line = _one_error_line(err)
    assert "no TensorBoard event files" in line and "metrics.csv" in line


def test_run_without_attention_tags_names_the_callback(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "plain"))
    w.add_scalar("train/loss", 1.0, 0)
    w.close()
    code, _, err = _run(capsys, str(tmp_path / "plain"), "-o", str(tmp_path / "out"))
    assert code == 1
    line = _one_error_line(err)
    assert "no attn/ tags" in line
    assert "AttentionDiagnostics" in line and "lightning_attn.callbacks" in line


def test_corrupt_event_file_is_named_and_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    garbage = run / "events.out.tfevents.0.garbage"
    garbage.write_bytes(b"this is not an event file" * 10)
    code, out, err = _run(capsys, str(run), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert f"skipped unreadable event file '{garbage}'" in err
    assert "Traceback" not in err
    html = (tmp_path / "out" / "report.html").read_text()
    assert "skipped unreadable event file" in html and garbage.name in html
    assert "net.stage1.dsa" in html  # the good file was read


def test_truncated_event_file_keeps_what_precedes_the_damage(tmp_path):
    run = write_run(tmp_path / "run", steps=tuple(range(10, 110, 10)))
    (event,) = run.glob("events.out.tfevents.*")
    last = [v.tag for e in EventFileLoader(str(event)).Load() for v in e.summary.value][-1]
    data = event.read_bytes()
    event.write_bytes(data[: len(data) - 30])  # cut into the last record
    (log,) = load_runs(run, progress=False)
    (note,) = log.notes
    assert note.startswith(f"event file '{event}' is damaged at byte") and "kept the" in note
    # every record before the damage is kept: all but the last scalar written
    assert log.scalars[f"attn/{BLOCK}/mask/std"].steps[-1] == 100
    assert log.scalars[last].steps[-1] == 90


def test_only_unreadable_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.out.tfevents.1.x").write_bytes(b"\x00" * 40)
    code, _, err = _run(capsys, str(run), "-o", str(tmp_path / "out"))
    assert code == 1
    line = _one_error_line(err)
    assert "nothing readable" in line and "events.out.tfevents.1.x" in line


def test_unknown_metric_lists_the_logged_scalars(tmp_path, capsys):
    run = write_run(tmp_path / "run", other={"val/acc": 0.5})
    code, _, err = _run(capsys, str(run), "-o", str(tmp_path / "out"), "--metric", "val/accuracy")
    assert code == 1
    line = _one_error_line(err)
    assert "'val/accuracy' is logged by no run" in line and "val/acc" in line


def test_output_that_is_a_file(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (tmp_path / "out").write_text("")
    code, _, err = _run(capsys, str(run), "-o", str(tmp_path / "out"))
    assert code == 1 and "is a file" in _one_error_line(err)


def test_named_and_unnamed_logdirs_do_not_mix(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    code, _, err = _run(capsys, f"a={run}", str(run), "-o", str(tmp_path / "out"))
    assert code == 1 and "NAME=LOGDIR" in _one_error_line(err)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["some/dir"])  # no --output
    assert exc.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_lightning_attn_dispatches_report(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--help"])
    assert exc.value.code == 0
    assert "usage: lightning-attn report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert exc.value.code == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


def test_a_logdir_with_several_runs(tmp_path):
    write_run(tmp_path / "runs" / "dsa" / "version_0")
    write_run(tmp_path / "runs" / "dsa" / "version_1", std=0.001)
    sources = find_runs(tmp_path / "runs" / "dsa")
    assert [s.name for s in sources] == ["dsa/version_0", "dsa/version_1"]
    assert [s.name for s in find_runs(tmp_path / "runs" / "dsa" / "version_1", "mine")] == [
        "mine"
    ]
    verdicts = []
    for log in load_runs(tmp_path / "runs" / "dsa", progress=False):
        tags = parse_tags(log)
        verdicts.append(judge_run(log, tags).verdicts[BLOCK].status)
    assert verdicts == ["healthy", "problem"]


def test_progress_counts_every_byte_of_good_and_damaged_files(tmp_path, monkeypatch):
    import lightning_attn.report.reading as reading

    run = write_run(tmp_path / "run")
    (good,) = run.glob("events.out.tfevents.*")
    damaged = run / "events.out.tfevents.9.damaged"
    damaged.write_bytes(good.read_bytes()[:-7])
    advanced: list[int] = []

    class Bar:  # what read_runs tells its progress bar
        def __init__(self, *args, **kwargs) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *exc) -> None: ...
        def add_task(self, *args, **kwargs) -> int: return 0
        def update(self, *args, **kwargs) -> None: ...
        def advance(self, task: int, n: int) -> None: advanced.append(n)

    monkeypatch.setattr(reading, "progress_bar", Bar)
    (log,) = reading.read_runs([reading.RunSource("run", run, "tensorboard", (good, damaged))])
    assert sum(advanced) == good.stat().st_size + damaged.stat().st_size  # the bar ends full
    assert len(log.notes) == 1 and damaged.name in log.notes[0]
    assert len(log.scalars[f"attn/{BLOCK}/mask/std"]) == 3


def test_a_fifo_named_like_an_event_file_is_skipped_and_named(tmp_path):
    import os

    run = write_run(tmp_path / "run")
    os.mkfifo(run / "events.out.tfevents.0.fifo")
    (log,) = load_runs(tmp_path / "run", progress=False)  # returns: nothing blocks
    assert any("not a regular file" in n and "fifo" in n for n in log.notes)
    os.mkfifo(tmp_path / "lonely.tfevents")
    with pytest.raises(ReportError, match="not a regular file"):
        load_runs(tmp_path / "lonely.tfevents", progress=False)
