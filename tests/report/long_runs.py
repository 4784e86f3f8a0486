"""Longer synthetic runs for the report's streaming reader, written fast (the event records
with the report's own CRC writer; tensorboard's EventAccumulator reads them back in the
tests), and the report as it was judged before streaming, as the oracle.

:func:`write_long_run` plants what the verdicts and the envelopes must keep: a collapse that
recovers, a saturation that comes and goes (warned, never recovered), a dead branch at the
end, a NaN and an Inf, a global maximum and minimum at known steps, validation points and
user metrics.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.summary import text

from lightning_attn.core.problems import PROBLEM_KINDS, HealthThresholds, find_problems, measure
from lightning_attn.core.problems import verdict as core_verdict
from lightning_attn.core.statistics import SECTIONS
from lightning_attn.report.records import encode_records
from lightning_attn.report.statistics import parse_tag, stats_from_scalars
from lightning_attn.report.verdicts import _judged_phase, _logged_problems, thresholds_from_config

BLOCKS = ("net.a.attn", "net.b.attn", "net.c.attn", "net.d.attn")
SPIKE_HIGH, SPIKE_LOW, NAN_AT, INF_AT = 1240, 2350, 1500, 2510
STEPS = tuple(range(0, 3000, 10))


@dataclass(frozen=True)
class Planted:
    """Where the planted features are (steps), and every value written: ``(step, tag) ->
    value`` per stream in order."""

    steps: tuple[int, ...]
    values: dict[str, np.ndarray]  # tag -> value at each step of ``steps``


def series_values(steps: np.ndarray, seed: int = 0, shift: float = 0.0,
                  blocks: Sequence[str] = BLOCKS) -> dict[str, np.ndarray]:
    """Every training tag's values at ``steps``: four blocks (router of 3 branches, a mask,
    a temperature) that end warned (``a``), with a problem (``b``), recovered (``c``) and
    healthy (``d``)."""
    rng = np.random.default_rng(seed)
    n = len(steps)
    out: dict[str, np.ndarray] = {}
    for i, block in enumerate(blocks):
        t = steps / 3000.0
        mean = 0.5 + 0.05 * np.sin(7 * t + i) + 0.01 * rng.standard_normal(n) + shift
        std = 0.2 + 0.02 * rng.standard_normal(n)
        sat_high = np.clip(0.02 + 0.01 * rng.standard_normal(n), 0, 1)
        usage = np.stack([np.full(n, 0.6), np.full(n, 0.25), np.full(n, 0.15)])
        if i == 0:  # saturated on and off from 1600 to 2900: warned, never back for long
            flap = (steps >= 1600) & (steps < 2900) & ((steps // 50) % 2 == 0)
            sat_high[flap] = 0.6
            mean[steps == SPIKE_HIGH] = 0.97  # the highest mean
            mean[steps == SPIKE_LOW] = 0.03  # the lowest mean
            mean[steps == NAN_AT] = math.nan
            std[steps == INF_AT] = math.inf
        if i == 1:  # a dead branch at the end
            late = steps >= 2800
            usage[:, late] = np.array([[0.7], [0.2999], [0.0001]])
        if i == 2:  # a collapse, then recovered
            std[(steps >= 800) & (steps < 1000)] = 0.001
        entropy = -(usage * np.log(np.maximum(usage, 1e-12))).sum(0)
        values = {
            "router/entropy": entropy, "router/entropy_norm": entropy / math.log(3),
            "router/usage_0": usage[0], "router/usage_1": usage[1], "router/usage_2": usage[2],
            "mask/mean": mean, "mask/std": std, "mask/min": mean - std, "mask/max": mean + std,
            "mask/sat_low": np.full(n, 0.01), "mask/sat_high": sat_high,
            "param/temperature": 1.0 + t, "param/temperature_grad_norm": 0.01 * (1 + t),
        }
        out.update({f"attn/{block}/{k}": v.astype(np.float32).astype(np.float64)
                    for k, v in values.items()})
    out["train/loss"] = (2.0 * np.exp(-steps / 1000.0) + 0.1).astype(np.float32).astype(
        np.float64)
    return out


def config(run_id: str = "run", fn: str = "fit", on_problem: str = "warn") -> dict:
    return {"run_id": run_id, "fn": fn, "on_problem": on_problem,
            "thresholds": HealthThresholds().__dict__, "sections": list(SECTIONS)}


def _scalar_event(step: int, values: dict[str, float]) -> bytes:
    return Event(wall_time=float(step), step=step, summary=Summary(value=[
        Summary.Value(tag=t, simple_value=v) for t, v in values.items()])).SerializeToString()


def _text_event(tag: str, step: int, body: str) -> bytes:
    return Event(wall_time=float(step), step=step, summary=text(tag, body)).SerializeToString()


def write_long_run(
    path: Path,
    steps: Sequence[int] = STEPS,
    *,
    conf: dict | None = None,
    problems: Sequence[dict] = (),
    seed: int = 0,
    shift: float = 0.0,
    val_every: int = 500,
    image: bytes | None = None,
    extra: Sequence[tuple[int, dict[str, float]]] = (),
    phase: str = "train",
    texts: Sequence[tuple[str, int, str]] = (),
    blocks: Sequence[str] = BLOCKS,
    batch: int = 1,
) -> Planted:
    """An event file in ``path``: the config first, a point per step (one event holding the
    diagnostics, as the callback writes; the loss in its own, as Lightning does), a problem
    record right after its point, validation points and ``val/acc`` every ``val_every``
    steps, ``extra`` events appended at the end (out of order if their steps are lower),
    then ``texts`` (tag, step, text). ``batch``: the diagnostics' events (points and problem
    records) written ``batch`` points at a time, after the loss of the batch's last point,
    as the callback writes them when it reads its points in batches."""
    path.mkdir(parents=True, exist_ok=True)
    s = np.asarray(steps, dtype=np.int64)
    values = series_values(s, seed, shift, blocks)
    if phase != "train":  # an evaluation's points only
        values = {f"{phase}/{t}": v for t, v in values.items() if t.startswith("attn/")}
    by_step: dict[int, list[dict]] = {}
    for p in problems:
        by_step.setdefault(p["step"], []).append(p)
    payloads = [Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString()]
    if conf is not None:
        payloads.append(_text_event("attn/config", 0, json.dumps(conf)))
    diag = [t for t in values if "attn/" in t]
    held: list[bytes] = []  # the diagnostics' events not written yet
    for j, step in enumerate(s.tolist()):
        point = {t: float(values[t][j]) for t in diag}
        if batch > 1:  # with Lightning's epoch counter last, as the callback writes it
            point["epoch"] = 0.0
        held.append(_scalar_event(step, point))
        for p in by_step.get(step, ()):
            held.append(_text_event("attn/problems", step, json.dumps(p)))
        if "train/loss" in values:
            payloads.append(_scalar_event(step, {"train/loss": float(values["train/loss"][j])}))
        if (j + 1) % batch == 0 or j == len(s) - 1 or (
                val_every and s[min(j + 1, len(s) - 1)] % val_every == 0):
            payloads += held  # all of them before a validation (as the callback does)
            held = []
        if val_every and step % val_every == 0 and step:
            val = {f"val/{t}": float(values[t][j]) for t in diag
                   if t.endswith(("mask/mean", "mask/std", "mask/sat_low", "mask/sat_high"))}
            val["val/acc"] = float(np.float32(0.5 + step / 10000.0))
            payloads.append(_scalar_event(step, val))
    if image is not None:
        payloads.append(Event(wall_time=1.0, step=int(s[-1]), summary=Summary(value=[
            Summary.Value(tag="attn/maps", image=Summary.Image(
                height=1, width=1, colorspace=3, encoded_image_string=image))]))
                        .SerializeToString())
    for step, extra_values in extra:
        payloads.append(_scalar_event(step, extra_values))
    for tag, step, body in texts:
        payloads.append(_text_event(tag, step, body))
    (path / "events.out.tfevents.1.synthetic").write_bytes(encode_records(payloads))
    return Planted(tuple(s.tolist()), values)


def write_csv_run(path: Path, planted: Planted) -> Path:
    """The same points as CSVLogger's ``metrics.csv``."""
    path.mkdir(parents=True, exist_ok=True)
    tags = list(planted.values)
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", *tags])
        for j, step in enumerate(planted.steps):
            w.writerow([step, 0, *(repr(float(planted.values[t][j])) for t in tags)])
    return path


# -- the oracle: every point read by tensorboard, judged as before streaming ---------------
def accumulated(directories: Sequence[Path]) -> tuple[dict[str, dict[int, float]], dict]:
    """Every scalar (tag -> step -> value, a later value winning on a repeated step, later
    directories winning over earlier ones) and the texts, read by tensorboard's
    EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, list[tuple[int, str]]] = {}
    for directory in directories:
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag == "epoch":  # Lightning's epoch counter: not a metric to the report
                continue
            for e in acc.Scalars(tag):
                scalars.setdefault(tag, {})[int(e.step)] = float(e.value)
        for tag in acc.Tags()["tensors"]:
            if acc.SummaryMetadata(tag).plugin_data.plugin_name != "text":
                continue
            for e in acc.Tensors(tag):
                for item in tensor_util.make_ndarray(e.tensor_proto).reshape(-1).tolist():
                    texts.setdefault(tag.removesuffix("/text_summary"), []).append(
                        (int(e.step), item.decode()))
    for tag in texts:
        texts[tag].sort(key=lambda t: t[0])
    return scalars, texts


def oracle(scalars: dict[str, dict[int, float]], tags) -> tuple[dict, list]:
    """``(verdicts, warnings)`` as the report judged runs before it streamed: every point of
    the judged phase from whole series, a list of every measurement per block."""
    thresholds, _, notes = thresholds_from_config(tags.config)
    sections = (tags.config or {}).get("sections")
    sections = frozenset(sections if isinstance(sections, list) else SECTIONS)
    phase = _judged_phase(tags)
    by_step: dict[int, dict[str, float]] = {}
    for tag, points in scalars.items():
        parsed = parse_tag(tag)
        if parsed is not None and parsed.stage == phase:
            for step, value in points.items():
                by_step.setdefault(step, {})[tag] = value
    first, history = {}, {}
    for step in sorted(by_step):
        stats = stats_from_scalars(step, by_step[step], tags.infos(), phase)
        measured = measure(stats, thresholds, tuple(PROBLEM_KINDS), sections)
        for block in stats.blocks:
            history.setdefault(block, []).append(
                (step, {k: m for (b, k), m in measured.items() if b == block}))
        for p in find_problems(stats, thresholds, tuple(PROBLEM_KINDS), sections):
            first.setdefault((p.block, p.kind), p)
    logged = _logged_problems(tags, notes) if phase == "train" else None
    warnings = logged if logged is not None else list(first.values())
    order = {b: i for i, b in enumerate(tags.block_names())}
    warnings = sorted(warnings, key=lambda p: (p.step, order.get(p.block, len(order)), p.kind))
    verdicts = {}
    for block in tags.block_names():
        warned = {p.kind: p.step for p in warnings if p.block == block}
        verdicts[block] = core_verdict(block, history.get(block, []), warned)
    return verdicts, warnings
