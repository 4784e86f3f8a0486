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
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.tags import CONFIG_TAG, ScalarTag
from .reading import RunLog, natural_key

__all__ = ["group_experiments"]

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


def _first_step(run: RunLog) -> int:
    """The first step with a diagnostics scalar (not, say, TensorBoard's ``hp_metric``)."""
    steps = [s.steps[0] for tag, s in run.scalars.items()
             if len(s) and ScalarTag.parse(tag) is not None]
    return min(steps, default=0)


def _join(name: str, runs: Sequence[RunLog], notes: list[str]) -> RunLog:
    """One run from several, in order: a later run's value wins on a shared step."""
    first = runs[0]
    out = RunLog(name, first.path, first.kind, notes=list(notes))
    for run in runs:
        for tag, series in run.scalars.items():
            out.scalars[tag] = out.scalars[tag].joined(series) if tag in out.scalars else series
        out.streams += run.streams
        for tag, images in run.images.items():
            out.images[tag] = sorted(out.images.get(tag, []) + images, key=lambda r: r.step)
        for tag, texts in run.texts.items():
            out.texts[tag] = sorted(out.texts.get(tag, []) + texts, key=lambda t: t[0])
        out.notes += run.notes
    return out


def _base(labels: Sequence[str]) -> str:
    bases = {(_VERSION.match(label).group("base") if _VERSION.match(label) else label)
             for label in labels}
    return bases.pop() if len(bases) == 1 and "" not in bases else labels[0]


def group_experiments(runs: Sequence[RunLog]) -> list[RunLog]:
    """The runs of one LOGDIR grouped by experiment (see the module docstring)."""
    ids = [_identity(r) for r in runs]
    fits: dict[str, list[int]] = {}
    for i, ident in enumerate(ids):
        if ident.run_id is not None and ident.fn == "fit":
            fits.setdefault(ident.run_id, []).append(i)
    attached: dict[str, list[int]] = {}
    out: list[RunLog] = []
    placed: set[int] = set()
    for i, ident in enumerate(ids):
        if ident.run_id in fits and ident.fn != "fit":
            attached.setdefault(ident.run_id, []).append(i)
    for i, ident in enumerate(ids):
        if i in placed:
            continue
        if ident.run_id not in fits:
            placed.add(i)
            run = runs[i]
            if ident.fn in ("validate", "test") and not any(
                    (t := ScalarTag.parse(tag)) is not None and t.stage == "train"
                    for tag in run.scalars):
                where = f" of checkpoint {ident.ckpt}" if ident.ckpt else ""
                run.notes.append(f"an evaluation ({ident.fn}){where}; the training run it "
                                 "evaluated is not under this LOGDIR, so its evaluation "
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
        out.append(_join(name, [runs[j] for j in members] + evaluations, notes))
    return out
