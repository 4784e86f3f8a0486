"""Runs grouped by experiment: the versions of one training run joined, evaluations attached.

Every ``lightning-attn fit`` (or ``Trainer.fit``) with the diagnostics writes an
``attn/config`` record holding a ``run_id``, kept in its checkpoints: a fit resumed from
``last.ckpt`` logs to a new ``version_N`` with the same ``run_id``, and so does a
``validate``/``test`` of one of its checkpoints (``fn`` says which). Within each LOGDIR given
to the report:

* the training versions that share a ``run_id`` become one run, their curves joined in step
  order (where two versions logged the same step, the later version's value is kept: it is
  what the resumed run continued from);
* an evaluation (``fn`` validate / test) joins the run whose ``run_id`` it carries; one whose
  training run is not there stays a run of its own, judged on its evaluation points;
* a version without ``attn/config`` (older runs, CSV logs) stays as it is.

A folder holding several ``run_id`` s (two writers at once, or one logger reused by a sweep
or by ``trainer.validate`` before ``fit``) is read as that many runs
(:attr:`~.reading.RunLog.parts`, each noted), grouped like any other.

Each ``validate``/``test`` call writes an ``attn/evaluation`` record with the step of the
weights it evaluated (its checkpoint's) and the step Lightning logged the module's own
metrics at (0 in a new Trainer). The diagnostics' evaluation tags are already at the first;
the module's metrics of that call are moved there too, so a checkpoint's ``val/acc`` sits at
the checkpoint's step, not at 0. An evaluation of weights of unknown step (no checkpoint, a
new Trainer) is never attached to a training run: it stays a run of its own, drawn as a
marker (:func:`step_unknown`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.tags import CONFIG_TAG, EVALUATION_TAG, ScalarTag, is_attention_tag
from .reading import RunLog, Series, merge_logs, natural_key

__all__ = ["group_experiments", "step_unknown"]

_VERSION = re.compile(r"^(?P<base>.*?)/?version_\d+$")


@dataclass(frozen=True)
class _Identity:
    run_id: str | None
    fn: str  # "fit", "validate", "test" or "unknown"
    ckpt: str | None


def _identity(run: RunLog) -> _Identity:
    config = None
    for _, text in run.texts.get(CONFIG_TAG, []):
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        config = doc if isinstance(doc, dict) else config
    if config is not None and isinstance(config.get("run_id"), str):
        return _Identity(config["run_id"], str(config.get("fn") or "fit"),
                         config.get("ckpt_path"))
    stages = {t.stage for t in map(ScalarTag.parse, run.scalars) if t is not None}
    fn = "fit" if "train" in stages else ("test" if stages == {"test"} else
                                          "validate" if stages else "unknown")
    return _Identity(None, fn, None)


def _evaluations(run: RunLog) -> list[dict]:
    """The ``attn/evaluation`` records of a run, in step order."""
    out = []
    for _, text in run.texts.get(EVALUATION_TAG, []):
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("phase") in ("val", "test") and isinstance(
                doc.get("logged_step"), int):
            out.append(doc)
    return out


def step_unknown(run: RunLog) -> bool:
    """Whether ``run`` holds evaluations only, all of weights whose step is unknown: its
    steps say nothing (the figures draw its values as markers, not against the step)."""
    records = _evaluations(run)
    return bool(records) and all(r.get("step") is None for r in records) and not any(
        (t := ScalarTag.parse(tag)) is not None and t.stage == "train" for tag in run.scalars)


def _place_evaluations(run: RunLog, evaluation_only: bool) -> None:
    """Move the module's own metrics of each evaluation from the step Lightning logged them
    at to the step of the weights evaluated: in a version of its own every scalar logged at
    that step; beside a fit (``trainer.test(ckpt_path="best")`` after ``fit``) the tags of
    the evaluation's stage (``test/...``), so the fit's own points stay."""
    for record in _evaluations(run):
        step, logged = record.get("step"), record["logged_step"]
        if not isinstance(step, int) or step == logged:
            continue
        prefix = f"{record['phase']}/"
        for tag, series in list(run.scalars.items()):
            if is_attention_tag(tag) or logged not in series.steps or not (
                    evaluation_only or tag.startswith(prefix)):
                continue
            points = dict(zip(series.steps, series.values, strict=True))
            points[step] = points.pop(logged)
            run.scalars[tag] = Series(sorted(points), [points[s] for s in sorted(points)])


def _first_step(run: RunLog) -> int:
    """The first step with a diagnostics scalar (not, say, TensorBoard's ``hp_metric``)."""
    steps = [s.steps[0] for tag, s in run.scalars.items()
             if len(s) and ScalarTag.parse(tag) is not None]
    return min(steps, default=0)


def _base(labels: Sequence[str]) -> str:
    bases = {(_VERSION.match(label).group("base") if _VERSION.match(label) else label)
             for label in labels}
    return bases.pop() if len(bases) == 1 and "" not in bases else labels[0]


def group_experiments(runs: Sequence[RunLog]) -> list[RunLog]:
    """The runs of one LOGDIR grouped by experiment (see the module docstring)."""
    runs = [part for run in runs for part in (run.parts or [run])]
    ids = [_identity(r) for r in runs]
    for run, ident in zip(runs, ids, strict=True):
        _place_evaluations(run, ident.fn in ("validate", "test"))
    fits: dict[str, list[int]] = {}
    for i, ident in enumerate(ids):
        if ident.run_id is not None and ident.fn == "fit":
            fits.setdefault(ident.run_id, []).append(i)
    attached: dict[str, list[int]] = {}
    out: list[RunLog] = []
    placed: set[int] = set()
    for i, ident in enumerate(ids):
        if ident.run_id in fits and ident.fn != "fit" and not step_unknown(runs[i]):
            attached.setdefault(ident.run_id, []).append(i)
    for i, ident in enumerate(ids):
        if i in placed:
            continue
        if ident.run_id not in fits or (ident.fn != "fit" and i not in attached.get(
                ident.run_id, [])):
            placed.add(i)
            run = runs[i]
            if step_unknown(run):
                run.notes.append(f"an evaluation ({ident.fn}) of a model in memory, not of a "
                                 "fit's checkpoint: the step its weights were trained to is "
                                 "unknown, so its values are drawn as markers, not against the "
                                 "step, and judged")
            elif ident.fn in ("validate", "test") and not any(
                    (t := ScalarTag.parse(tag)) is not None and t.stage == "train"
                    for tag in run.scalars):
                where = (f" of checkpoint {ident.ckpt}; the training run it evaluated is "
                         "not under this LOGDIR" if ident.ckpt else
                         " of a model in memory, not of a fit's checkpoint")
                run.notes.append(f"an evaluation ({ident.fn}){where}, so its evaluation "
                                 "points are judged")
            out.append(run)
            continue
        members = sorted(fits[ident.run_id],
                         key=lambda j: (_first_step(runs[j]), natural_key(runs[j].name)))
        evals = sorted(attached.get(ident.run_id, []), key=lambda j: natural_key(runs[j].name))
        placed.update(members, evals)
        notes = []
        if len(members) > 1:
            notes.append("joined the versions of one training run (same run_id): " + ", ".join(
                f"{runs[j].name} from step {_first_step(runs[j])}" for j in members))
        for j in evals:
            where = f" of checkpoint {ids[j].ckpt}" if ids[j].ckpt else ""
            notes.append(f"attached {runs[j].name}: {ids[j].fn}{where}")
        if len(members) == 1 and not evals:
            out.append(runs[members[0]])
            continue
        # Evaluations add their points, not their configuration (the fit's stays).
        evaluations = []
        for j in evals:
            run = runs[j]
            texts = {t: v for t, v in run.texts.items() if t != CONFIG_TAG}
            evaluations.append(RunLog(run.name, run.path, run.kind, run.scalars, run.images,
                                      texts, run.notes, run.streams))
        name = _base([runs[j].name for j in members])
        out.append(merge_logs(name, [runs[j] for j in members] + evaluations, notes))
    return out
