"""Long runs: read by streaming and kept as envelopes, judged exactly as before.

Every case is judged three ways: while it is read (:class:`StreamJudge`), by reading it
again (the replay), and from whole series; each must give the verdicts, warnings and
numbers of the oracle: tensorboard's EventAccumulator reading every point and the report's
judging as it was before streaming (``long_runs.oracle``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_attn.report.document import MetricSummary
from lightning_attn.report.experiments import group_experiments
from lightning_attn.report.reading import find_runs, read_runs, replay
from lightning_attn.report.series import parse_tags
from lightning_attn.report.verdicts import StreamJudge, judge_run

from .long_runs import (
    BLOCKS,
    INF_AT,
    NAN_AT,
    SPIKE_HIGH,
    SPIKE_LOW,
    STEPS,
    accumulated,
    config,
    oracle,
    write_csv_run,
    write_long_run,
)
from .synthetic import problem, write_run

A, B, C, D = BLOCKS


def _problem(kind: str, step: int, block: str = A) -> dict:
    return {"block": block, "kind": kind, "value": 0.5, "threshold": 0.1, "step": step,
            "message": f"{kind} at {step}"}


def _single(tmp: Path, **kw) -> list[Path]:
    write_long_run(tmp / "run", **kw)
    return [tmp / "run"]


def _joined(tmp: Path) -> list[Path]:
    conf = config(run_id="resumed", on_problem="ignore")
    write_long_run(tmp / "exp" / "version_0", tuple(range(0, 2000, 10)), conf=conf)
    # resumed from an earlier checkpoint: steps 1500-1996 logged again, with other values
    write_long_run(tmp / "exp" / "version_1", tuple(range(1500, 3000, 10)), conf=conf, seed=1,
                   shift=0.01)
    return [tmp / "exp" / "version_0", tmp / "exp" / "version_1"]


def _joined_batches(tmp: Path) -> list[Path]:
    # as the callback writes: each batch of diagnostics points after the module's losses
    conf = config(run_id="resumed", on_problem="ignore")
    write_long_run(tmp / "exp" / "version_0", tuple(range(0, 2000, 10)), conf=conf, batch=32)
    write_long_run(tmp / "exp" / "version_1", tuple(range(1500, 3000, 10)), conf=conf, seed=1,
                   shift=0.01, batch=32)
    return [tmp / "exp" / "version_0", tmp / "exp" / "version_1"]


def _disordered(tmp: Path) -> list[Path]:
    # steps 100-140 written again at the end, with other values: the later ones count
    extra = [(s, {f"attn/{D}/mask/std": 0.0005, f"attn/{D}/mask/mean": 0.4})
             for s in range(100, 150, 10)]
    return _single(tmp, conf=config(on_problem="ignore"), extra=extra)


def _evaluation(tmp: Path) -> list[Path]:
    write_long_run(tmp / "run", conf=config(fn="validate"), val_every=0, phase="val")
    return [tmp / "run"]


CASES = {
    "recomputed warnings": lambda t: _single(t, conf=config(on_problem="ignore")),
    "logged warnings": lambda t: _single(t, conf=config(), problems=[
        _problem("mask_collapse", 800, C), _problem("mask_saturation", 1600),
        _problem("mask_saturation", 2000), _problem("dead_branch", 2800, B)]),
    "no config": lambda t: _single(t),
    "versions joined": _joined,
    "written in batches": lambda t: _single(t, conf=config(), batch=32, problems=[
        _problem("mask_collapse", 800, C), _problem("mask_saturation", 1600)]),
    "versions joined, written in batches": _joined_batches,
    "steps out of order": _disordered,
}
#: (name, most points kept per series, judge while reading)
MODES = [("while read", 16, True), ("read again", 16, False), ("whole series", 10**6, False)]


def _load(root: Path, limit: int, watch: bool):
    sources = find_runs(root)
    return group_experiments(read_runs(sources, progress=False, limit=limit,
                                       watch=StreamJudge if watch else None))


def _metric(points: dict[int, float], mode: str) -> MetricSummary:
    """MetricSummary as it was computed from a whole series."""
    steps = sorted(points)
    finite = [(points[s], s) for s in steps if math.isfinite(points[s])]
    best = (max if mode == "max" else min)(finite, key=lambda p: p[0]) if finite else None
    return MetricSummary(points[steps[-1]], steps[-1], *(best or (None, None)))


def _check(run, scalars: dict[str, dict[int, float]]) -> None:
    tags = parse_tags(run)
    health = judge_run(run, tags)
    verdicts, warnings = oracle(scalars, tags)
    assert set(health.verdicts) == set(verdicts)
    for block, v in verdicts.items():
        got = health.verdicts[block]
        assert (got.status, got.text, got.kinds, got.step) == (v.status, v.text, v.kinds, v.step)
    assert [(p.block, p.kind, p.step) for p in health.warnings] == [
        (p.block, p.kind, p.step) for p in warnings]
    for got, want in zip(health.warnings, warnings, strict=True):
        for field in ("value", "threshold"):
            a, b = getattr(got, field), getattr(want, field)
            assert a == pytest.approx(b, abs=1e-12) or (math.isnan(a) and math.isnan(b))
    for tag, mode in (("train/loss", "min"), ("val/acc", "max"),
                      (f"attn/{A}/mask/mean", "max"), (f"attn/{A}/mask/mean", "min")):
        if tag in scalars:
            got, want = MetricSummary.of(run.scalars[tag], mode), _metric(scalars[tag], mode)
            assert got.final == pytest.approx(want.final, abs=1e-12), tag
            assert got.best == pytest.approx(want.best, abs=1e-12), tag
            assert (got.final_step, got.best_step) == (want.final_step, want.best_step), tag
    for tag, points in scalars.items():
        series = run.scalars[tag]
        assert len(series) == len(points), tag
        assert (series.first_step, series.last_step) == (min(points), max(points)), tag


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for name, make in CASES.items():
        tmp = tmp_path_factory.mktemp(name.replace(" ", "-"))
        directories = make(tmp)
        out[name] = (tmp, accumulated(directories)[0])
    return out


@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("case", list(CASES))
def test_verdicts_warnings_and_numbers_are_those_of_every_point(written, case, mode):
    root, scalars = written[case]
    _, limit, watch = mode
    (run,) = _load(root, limit, watch)
    if limit < len(STEPS):
        assert not run.scalars[f"attn/{A}/mask/std"].exact  # an envelope
    _check(run, scalars)


def test_a_usual_run_is_judged_while_it_is_read(written):
    for case in ("logged warnings", "written in batches"):
        (run,) = _load(written[case][0], 16, True)
        assert run.streams[0].ordered
        assert run.watched is not None and run.watched.usable(run, parse_tags(run))
    for case in ("versions joined", "steps out of order"):  # these are read again
        (run,) = _load(written[case][0], 16, True)
        assert run.watched is None or not run.watched.usable(run, parse_tags(run))


@pytest.mark.parametrize("known", [True, False], ids=["tags known", "tags unknown"])
def test_a_run_written_in_batches_is_replayed_in_step_order(written, known):
    # the diagnostics' points come after the module's losses of later steps: replayed
    # family by family and merged, every step is one point holding both
    root, scalars = written["written in batches"]
    (run,) = _load(root, 16, False)
    points = list(replay(run.streams, tags=run.scalars if known else None))
    assert [step for step, _ in points] == sorted({s for p in scalars.values() for s in p})
    for step, point in points:
        want = {tag: p[step] for tag, p in scalars.items() if step in p}
        assert point.keys() == want.keys()
        np.testing.assert_array_equal([point[t] for t in want], list(want.values()))


def test_an_evaluation_run_is_judged_on_its_points(tmp_path):
    directories = _evaluation(tmp_path)
    scalars, _ = accumulated(directories)
    for _, limit, watch in MODES:
        (run,) = _load(tmp_path / "run", limit, watch)
        tags = parse_tags(run)
        assert judge_run(run, tags).phase == "val"
        _check(run, scalars)


def test_csv_runs_too(tmp_path):
    planted = write_long_run(tmp_path / "events", conf=config(on_problem="ignore"), val_every=0)
    write_csv_run(tmp_path / "csv", planted)
    scalars: dict[str, dict[int, float]] = {}
    with open(tmp_path / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag not in ("step", "epoch"):
                    scalars.setdefault(tag, {})[int(row["step"])] = float(value)
    for _, limit, watch in MODES:
        (run,) = _load(tmp_path / "csv", limit, watch)
        assert run.kind == "csv"
        _check(run, scalars)


@pytest.mark.parametrize("watch", [True, False], ids=["while read", "read again"])
def test_the_envelope_keeps_the_extremes_the_warning_steps_and_the_nans(tmp_path, watch):
    planted = write_long_run(tmp_path / "run", conf=config(on_problem="ignore"))
    (run,) = _load(tmp_path / "run", 16, watch)
    tags = parse_tags(run)
    health = judge_run(run, tags)
    warned = {(p.block, p.step) for p in health.warnings}
    assert {(A, NAN_AT), (A, 1600), (B, 2800), (C, 800)} <= warned
    index = {s: i for i, s in enumerate(planted.steps)}
    blocks = tags.train
    for block, step in warned:  # every curve of the block passes through the warning's point
        for mask_or_group in (*blocks[block].masks.values(), blocks[block].router):
            for quantity, series in mask_or_group.items():
                if isinstance(series, dict):  # per branch
                    continue
                tag = series_tag(block, mask_or_group, quantity)
                kept = dict(zip(series.steps, series.values, strict=True))
                if tag is None:  # the saturated share, drawn from every point
                    mask = f"attn/{block}/mask/"
                    want = planted.values[mask + "sat_low"][index[step]] + planted.values[
                        mask + "sat_high"][index[step]]
                else:
                    want = planted.values[tag][index[step]]
                assert not series.exact and step in kept, (block, quantity)
                assert kept[step] == want or (math.isnan(want) and math.isnan(kept[step]))
    mean = blocks[A].masks["mask"]["mean"]
    kept = dict(zip(mean.steps, mean.values, strict=True))
    assert len(mean.steps) <= 5 * 16 // 4 + len(warned)  # a few points, not 300
    assert kept[SPIKE_HIGH] == pytest.approx(0.97, abs=1e-6)  # the extremes, where they are
    assert kept[SPIKE_LOW] == pytest.approx(0.03, abs=1e-6)
    assert math.isnan(kept[NAN_AT]) and NAN_AT in mean.nonfinite()[0]
    std = blocks[A].masks["mask"]["std"]
    assert INF_AT in std.nonfinite()[0] and std.nonfinite()[1] == 1


def series_tag(block: str, group: dict, quantity: str) -> str | None:
    """The logged tag of a block's curve (``None``: a derived one)."""
    if quantity == "saturated":
        return None
    section = "router" if quantity.startswith(("entropy", "usage")) else "mask"
    return f"attn/{block}/{section}/{quantity}"


def test_the_figure_draws_the_kept_points_and_marks_the_nans(tmp_path):
    from matplotlib.figure import Figure

    from lightning_attn.report.figures import NONFINITE_LABEL, _draw, _panels

    write_long_run(tmp_path / "run", conf=config(on_problem="ignore"))
    (run,) = _load(tmp_path / "run", 16, True)
    tags = parse_tags(run)
    health = judge_run(run, tags)
    stages = {s: b[A] for s, b in tags.blocks.items() if A in b}
    panel = next(p for row in _panels(stages, health.thresholds, str) for p in row
                 if p.title.startswith("mask mean"))
    ax = Figure().subplots()
    _draw(ax, panel, health.block_warnings(A))
    lines: dict[str, object] = {}
    for line in ax.get_lines():  # the training curve is drawn first
        lines.setdefault(line.get_label(), line)
    marked = {c.get_label(): c for c in ax.collections}
    mean = lines["mean"]
    assert SPIKE_HIGH in list(mean.get_xdata()) and 0.97 == pytest.approx(
        max(v for v in mean.get_ydata() if v == v), abs=1e-6)
    assert list(lines[NONFINITE_LABEL].get_xdata()) == [NAN_AT]
    assert "warning: non-finite values (step 1500)" in marked


EXISTING = {  # the runs of tests/report/synthetic.py, as the other report tests write them
    "plain": {},
    "NaN std": {"std": float("nan")},
    "collapsed, logged": {"std": 0.001, "config": {"thresholds": {}},
                          "problems": [problem("mask_collapse", 20)]},
    "evaluation too": {"evaluation": True, "other": {"val/acc": 0.7}},
    "huge and negative steps": {"steps": (-5, 0, 10**12)},
    "one point": {"steps": (5,)},
}


@pytest.mark.parametrize("kwargs", list(EXISTING.values()), ids=list(EXISTING))
def test_the_existing_synthetic_runs_are_judged_as_before(tmp_path, kwargs):
    write_run(tmp_path / "run", **kwargs)
    scalars, _ = accumulated([tmp_path / "run"])
    for _, limit, watch in MODES:
        (run,) = _load(tmp_path / "run", max(limit, 8), watch)
        _check(run, scalars)


def test_the_planted_training_run_is_judged_as_before(planted_run):
    """A real Lightning run: its diagnostics, validation points and metrics."""
    scalars, _ = accumulated([planted_run.tensorboard])
    for _, limit, watch in MODES:
        (run,) = _load(planted_run.tensorboard, limit, watch)
        _check(run, scalars)
        if watch:
            assert run.watched is not None and run.watched.usable(run, parse_tags(run))
