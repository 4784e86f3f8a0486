"""Figures of the report, drawn with matplotlib's object API onto the Agg canvas.

``matplotlib.figure.Figure`` is used directly, never ``pyplot``: no global figure manager,
no backend switch in the user's session (a notebook keeps its own), nothing to close.
Every function returns PNG bytes.

* :func:`block_figure`: one block of one run, a panel per statistic against the step
  (training solid; validation / test dashed with markers), the thresholds as dotted lines,
  and a red line at the step of each warning.
* :func:`comparison_figure`: one statistic, one panel per run, shared axes.
* :func:`metrics_figure`: the ``--metric`` scalars, runs overlaid.

An evaluation of weights whose step is unknown (no checkpoint) is never drawn against the
step: in the metrics as a horizontal marker line, in its block figures with no step axis.

A curve kept as an envelope (:mod:`.curves`: more than ``CURVE_POINTS`` points) is drawn
through the points it kept, the first, last, lowest and highest of each bucket of steps, which
at the figure's width is the same line as every point; a min-max band is drawn from its
buckets. Non-finite values are marked with a cross at the foot of the panel, in a whole
series and an envelope alike (a NaN is otherwise only a gap in the line).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..environment import missing_extra

try:
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory
except ImportError as err:  # the `report` extra
    raise missing_extra("matplotlib", "The report (its figures)") from err

from ..core import presentation
from ..core.presentation import comparisons, short_names
from ..core.problems import PROBLEM_KINDS, HealthThresholds, Problem, phrase
from ..core.statistics import BlockInfo, Quantity, all_quantities
from .curves import CURVE_POINTS
from .reading import Series
from .series import BlockSeries

__all__ = [
    "COMPARISONS",
    "Comparison",
    "block_figure",
    "comparison_figure",
    "metrics_figure",
]

DPI = 110
PANEL_WIDTH = 4.2  # inches
PANEL_HEIGHT = 2.8
COLUMNS = 3
STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.7,
    "legend.fontsize": 7.5,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "#dddddd",
    "lines.linewidth": 1.5,
    "axes.formatter.useoffset": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "text.parse_math": False,  # a name with two "$" is text, not math (nor a parse error)
}
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f", "#d62728",
)
THRESHOLD_COLOR = "#555555"
#: The axis / legend words for an evaluation of weights whose step is unknown.
UNKNOWN_STEP = "no checkpoint: step unknown"
WARNING_COLOR = "#d62728"
STAGE_KEYS = {
    "train": "solid: training (each logging step)",
    "val": "dashed with dots: validation (each epoch)",
    "test": "stars: test",
}
STAGE_STYLE = {
    "train": {"linestyle": "-"},
    "val": {"linestyle": "--", "marker": "o", "markersize": 3.5},
    "test": {"linestyle": "none", "marker": "*", "markersize": 9},
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _clean(values: Sequence[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _stage_style(stage: str) -> dict:
    return STAGE_STYLE.get(stage, STAGE_STYLE["val"])


NONFINITE_LABEL = "non-finite value (NaN or Inf)"
ENVELOPE_NOTE = (
    f"curves of more than {CURVE_POINTS} points: the first, last, lowest and highest point "
    f"of each of {CURVE_POINTS // 4} step ranges"
)


def _mark_nonfinite(ax, s: Series, color: str) -> None:
    """A cross at the foot of the panel at each non-finite value's step (an envelope: the
    first of each bucket)."""
    steps, _ = s.nonfinite()
    if steps:
        ax.plot(steps, [0.03] * len(steps), transform=blended_transform_factory(
            ax.transData, ax.transAxes), linestyle="none", marker="x", markersize=5,
            color=color, markeredgewidth=1.4, label=NONFINITE_LABEL, clip_on=False)


def _band(ax, lo: Series, hi: Series, **style) -> None:
    """The band between a low and a high series: at their common steps, or for envelopes
    from each bucket's lowest low and highest high."""
    if lo.exact and hi.exact:
        common = dict(zip(hi.steps, hi.values, strict=True))
        steps = [s for s in lo.steps if s in common]
        low = dict(zip(lo.steps, lo.values, strict=True))
        ax.fill_between(steps, _clean([low[s] for s in steps]),
                        _clean([common[s] for s in steps]), **style)
        return
    xs, lows, highs = [], [], []
    for series, pick in ((lo, 2), (hi, 3)):
        env = series.envelope()
        if env is None:
            steps, values = series.arrays()
            env = (steps, steps, values, values)
        middle = (env[0] + env[1]) / 2.0
        xs.append(middle)
        (lows if pick == 2 else highs).append(np.where(np.isfinite(env[pick]), env[pick],
                                                       np.nan))
    x = xs[0]
    upper = np.interp(x, xs[1], np.nan_to_num(highs[0], nan=np.nanmax(highs[0])
                                              if np.isfinite(highs[0]).any() else 0.0))
    ax.fill_between(x, lows[0], upper, **style)




@dataclass
class _Panel:
    """One chart of a block: curves per stage, threshold lines, the section it belongs to."""

    title: str
    section: str
    marks: tuple[str, ...] = ()  # problem kinds whose warnings are marked on it
    # (label, stage, series, dotted)
    curves: list[tuple[str, str, Series, bool]] = field(default_factory=list)
    # (label, low, high, label of the curve whose colour the band takes)
    bands: list[tuple[str, Series, Series, str]] = field(default_factory=list)
    thresholds: list[tuple[str, float, float]] = field(default_factory=list)  # label, y, x0
    ylim: tuple[float | None, float | None] | None = None
    log: bool = False


def _label(q: Quantity, subject: str, several: bool, thresholds: HealthThresholds,
           branch_label: Callable[[int], str]) -> str:
    """A curve's label from the quantity's chart declaration."""
    text = q.chart.label.format(
        mask=subject, branch=branch_label(int(subject)) if q.per_branch else "",
        param=subject, **dataclasses.asdict(thresholds),
    )
    return f"{subject} {text}" if q.group == "mask" and several else text


def _drawn(q: Quantity, bs: BlockSeries, subject: str, s: Series) -> bool:
    # A derived curve (the saturated share) only where it differs from each of its inputs.
    if q.tag is not None or not q.inputs:
        return True
    logged = bs.masks.get(subject, {})
    return all(any(logged[n].values) for n in q.inputs if n in logged)


def _panels(
    stages: dict[str, BlockSeries], thresholds: HealthThresholds,
    branch_label: Callable[[int], str], info: BlockInfo | None = None,
) -> list[list[_Panel]]:
    """The panels of a block in rows (:func:`~lightning_attn.core.presentation.panels`), each
    with the curves of the quantities declared on it and the lines of the problem kinds that
    judge them; empty panels and rows left out."""
    ordered = sorted(stages.items(), key=lambda kv: (kv[0] != "train", kv[0]))
    k = max((bs.num_branches for bs in stages.values()), default=0)
    learnable = set(info.trainable_names) if info is not None else set(
        stages["train"].params.get("grad_norm", {}) if "train" in stages else ())
    specs = {n: s for n, s in (info.param_specs if info is not None else {}).items()
             if n in learnable}
    several = len({m for bs in stages.values() for m in bs.masks}) > 1
    rows = []
    for row in presentation.panels():
        panels = []
        for declared in row:
            panel = _Panel(declared.title, declared.section, ylim=declared.ylim,
                           log=declared.log,
                           marks=tuple(n for n, kind in PROBLEM_KINDS.items()
                                       if kind.panel == declared.title))
            on_panel = [q for q in all_quantities()
                        if q.chart is not None and q.chart.panel == declared.title]
            for stage, bs in ordered:
                edges: dict[tuple[str, str], dict[str, Series]] = {}
                for q in on_panel:
                    for subject, s in bs.curves(q):
                        label = _label(q, subject, several, thresholds, branch_label)
                        if q.chart.band is not None:
                            if stage == "train":
                                edges.setdefault((label, subject), {})[q.chart.band] = s
                        elif _drawn(q, bs, subject, s):
                            panel.curves.append((label, stage, s, q.tag is None))
                for (label, subject), edge in edges.items():
                    if set(edge) == {"low", "high"}:
                        match = next((c for c, st, _, _ in panel.curves
                                      if st == stage and (not several or c.startswith(subject))),
                                     "")
                        panel.bands.append((label if not several else f"{subject} {label}",
                                            edge["low"], edge["high"], match))
            for kind in PROBLEM_KINDS.values():
                for line in kind.lines(thresholds, k, specs):
                    if line.panel == declared.title:
                        panel.thresholds.append((line.label, line.y, line.x0))
            if panel.bands and not panel.title.endswith(")"):
                panel.title += " (band: min to max)"
            if panel.curves:
                panels.append(panel)
        if panels:
            rows.append(panels)
    return rows


def _marks(panel: _Panel, kind: str) -> bool:
    """Whether a warning of ``kind`` is marked on ``panel``: on the panel showing its
    statistic; a kind with no panel of its own (non-finite values, a kind this version does
    not know) on every panel of the sections it reads."""
    if kind in panel.marks:
        return True
    declared = PROBLEM_KINDS.get(kind)
    if declared is None or declared.panel is None:
        return declared is None or declared.section in (None, panel.section)
    return False


def _shown(text: str) -> str:
    """``text`` as matplotlib can draw it: a lone surrogate (a str Python allows in a
    module's name, no font can draw) as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _legend(label: str) -> str:
    # Matplotlib leaves a label starting with "_" out of the legend: a zero-width space
    # keeps a block or run named "_x" in it, shown as it is.
    return _shown(f"\u200b{label}" if label.startswith("_") else label)


def _warning_label(kind: str, steps: Sequence[int]) -> str:
    """``warning: saturated (step 40)``; for several, their first steps and how many more."""
    if len(steps) == 1:
        return f"warning: {phrase(kind)} (step {steps[0]})"
    shown = ", ".join(str(s) for s in steps[:3])
    more = f" and {len(steps) - 3} more" if len(steps) > 3 else ""
    return f"warnings: {phrase(kind)} (steps {shown}{more})"


def _draw(ax, panel: _Panel, warnings: Sequence[Problem]) -> None:
    colors: dict[str, str] = {}
    for label, stage, s, dotted in panel.curves:
        color = colors.setdefault(label, PALETTE[len(colors) % len(PALETTE)])
        style = dict(_stage_style(stage))
        if stage == "train" and len(s) == 1:
            style.update(marker="o", markersize=4)
        if dotted and stage == "train":
            style.update(linestyle=":")
        # one legend entry per quantity (its first stage); the line styles of the stages are
        # explained once under the figure
        ax.plot(s.steps, _clean(s.values), color=color, label=_legend(label), **style)
        _mark_nonfinite(ax, s, color)
    for label, lo, hi, match in panel.bands:
        _band(ax, lo, hi, color=colors.get(match, PALETTE[0]), alpha=0.15, linewidth=0,
              label=label)
    if panel.log:
        positive = [v for _, _, s, _ in panel.curves for v in s.values
                    if math.isfinite(v) and v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
    # Thresholds are drawn only where they do not squash the curves (a temperature of 1
    # next to a limit at 20).
    ymin, ymax = ax.get_ylim()
    span = max(ymax - ymin, 1e-9)
    steps = [x for _, _, s, _ in panel.curves for x in s.steps]
    x_start, x_end = (min(steps), max(steps)) if steps else (0, 1)
    for label, y, x0 in panel.thresholds:
        fits = panel.ylim is not None or ymin - 0.5 * span <= y <= ymax + 0.5 * span
        if not fits or x0 > x_end:
            continue
        ax.hlines(y, max(x0, x_start), x_end, colors=THRESHOLD_COLOR, linestyles=(0, (1.5, 2)),
                  linewidth=1.1, label=label)
    by_kind: dict[str, list[int]] = {}
    for p in warnings:
        if _marks(panel, p.kind):
            by_kind.setdefault(p.kind, []).append(p.step)
    for kind, steps in by_kind.items():  # one legend entry a kind, however many warnings
        ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=WARNING_COLOR,
                  linewidth=1.0, alpha=0.6, label=_warning_label(kind, steps))
    if panel.ylim is not None:
        low, high = panel.ylim
        cur_low, cur_high = ax.get_ylim()
        ax.set_ylim(low if low is not None else cur_low,
                    max(high, cur_high) if high is not None else cur_high)
    ax.set_title(_shown(panel.title))
    handles, labels = ax.get_legend_handles_labels()
    unique: dict[str, object] = {}
    for h, label in zip(handles, labels, strict=True):
        unique.setdefault(label, h)  # the first stage drawn (training) stands for the rest
    if unique:
        ax.legend(unique.values(), unique.keys(), loc="best")


def block_figure(
    title: str,
    stages: dict[str, BlockSeries],
    thresholds: HealthThresholds,
    warnings: Sequence[Problem] = (),
    branch_label: Callable[[int], str] = lambda k: f"branch {k}",
    info: BlockInfo | None = None,
    step_unknown: bool = False,
) -> bytes | None:
    """PNG of one block: a row of panels per section (router, masks, parameters), ``None``
    when the block logged nothing. ``info``: the block's description in the run's
    configuration (its learnable parameters' ranges give the drift lines).
    ``step_unknown``: the points are evaluations of weights of unknown step (no step axis)."""
    rows = _panels(stages, thresholds, branch_label, info)
    if not rows:
        return None
    cols = max(len(row) for row in rows)
    with rc_context(STYLE):
        fig = Figure(figsize=(PANEL_WIDTH * max(cols, 2), PANEL_HEIGHT * len(rows)),
                     layout="constrained")
        axes = fig.subplots(len(rows), max(cols, 2), squeeze=False, sharex=True)
        for r, row in enumerate(rows):
            for c, ax in enumerate(axes[r]):
                if c >= len(row):
                    ax.set_visible(False)
                    continue
                _draw(ax, row[c], warnings)
                ax.xaxis.set_tick_params(labelbottom=not step_unknown)
                if r == len(rows) - 1:
                    ax.set_xlabel(UNKNOWN_STEP if step_unknown else "step")
        fig.suptitle(_shown(title), fontsize=10.5, fontweight="bold", x=0.01, ha="left")
        keys = [STAGE_KEYS[s] for s in STAGE_KEYS if s in stages] if len(stages) > 1 else []
        if any(not c[2].exact for row in rows for panel in row for c in panel.curves):
            keys.append(ENVELOPE_NOTE)
        if keys:
            fig.supxlabel("   ".join(keys), fontsize=8, color="#555555", x=0.99, ha="right")
        return _png(fig)


# -- comparisons ---------------------------------------------------------------------------
#: A curve of a comparison: (block, what of it: "" or a mask / parameter name, series).
Curve = tuple[str, str, Series]
LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Comparison:
    """A quantity compared across runs (training points), with the lines of the kinds that
    judge it: made from each quantity that declares ``compare``."""

    quantity: Quantity

    @property
    def title(self) -> str:
        return self.quantity.compare.title

    @property
    def ylim(self) -> tuple[float, float] | None:
        return self.quantity.compare.ylim

    @property
    def group(self) -> str:
        return self.quantity.group

    def curves(self, bs: BlockSeries) -> list[Curve]:
        q = self.quantity
        many = len(list(bs.curves(q))) > 1
        return [(bs.name, subject if many and not q.per_branch else "", s)
                for subject, s in bs.curves(q)]

    def lines(self, thresholds: HealthThresholds) -> list[tuple[str, float]]:
        panel = self.quantity.chart.panel
        return [(line.label, line.y) for kind in PROBLEM_KINDS.values()
                for line in kind.lines(thresholds, 0, {}) if line.panel == panel
                and line.x0 == 0]


#: The report's comparisons of runs, one per quantity declaring ``compare``.
COMPARISONS: tuple[Comparison, ...] = tuple(Comparison(q) for q in comparisons())


def comparison_figure(
    comparison: Comparison,
    runs: Sequence[tuple[str, dict[str, BlockSeries], HealthThresholds]],
) -> bytes | None:
    """One panel per run (training statistics), shared x and y axes, one legend: a block has
    the same colour in every run; masks / parameters of a block differ by line style.

    ``runs``: ``(name, training blocks, thresholds)`` in column order. ``None`` when no run
    has the statistic.
    """
    per_run = [
        [c for bs in blocks.values() for c in comparison.curves(bs)] for _, blocks, _ in runs
    ]
    if not any(per_run):
        return None
    # first appearance order, each once
    blocks = list(dict.fromkeys(b for curves in per_run for b, _, _ in curves))
    subs = list(dict.fromkeys(sub for curves in per_run for _, sub, _ in curves))
    short = short_names(blocks)
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(blocks)}
    styles = {sub: LINESTYLES[i % len(LINESTYLES)] for i, sub in enumerate(subs)}
    cols = len(runs)
    thresholds_shown: set[str] = set()
    with rc_context(STYLE):
        fig = Figure(figsize=(max(4.2 * cols, 7.0), 3.0), layout="constrained")
        axes = fig.subplots(1, cols, squeeze=False, sharex=True, sharey=True)[0]
        for ax, (name, _, thresholds), curves in zip(axes, runs, per_run, strict=True):
            ax.set_title(_shown(name))
            ax.set_xlabel("step")
            ax.yaxis.set_tick_params(labelleft=True)
            if not curves:
                ax.text(0.5, 0.5, f"no {comparison.group} statistics",
                        transform=ax.transAxes, ha="center", va="center", color="#888888")
                continue
            for block, sub, s in curves:
                ax.plot(s.steps, _clean(s.values), color=colors[block],
                        linestyle=styles[sub], label=_legend(f"{short[block]} {sub}".strip()),
                        marker="o" if len(s) == 1 else None)
                _mark_nonfinite(ax, s, colors[block])
            for label, y in comparison.lines(thresholds):
                thresholds_shown.add(label)
                ax.axhline(y, color=THRESHOLD_COLOR, linestyle=(0, (1.5, 2)),
                           linewidth=1.1, label=label)
        if comparison.ylim is not None:
            low, high = axes[0].get_ylim()
            axes[0].set_ylim(min(low, comparison.ylim[0]), max(high, comparison.ylim[1]))
        handles: dict[str, object] = {}
        for ax in axes:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        lines = {k: h for k, h in handles.items() if k not in thresholds_shown}
        lines.update({k: h for k, h in handles.items() if k in thresholds_shown})  # last
        fig.legend(lines.values(), lines.keys(), loc="outside lower center",
                   ncols=min(5, len(lines)))
        title = comparison.title
        fig.suptitle(_shown(title), fontsize=10.5, fontweight="bold", x=0.01, ha="left")
        return _png(fig)


def metrics_figure(
    metrics: Sequence[str], runs: Sequence[tuple[str, dict[str, Series]]],
    unplaced: Collection[str] = (),
) -> bytes | None:
    """One panel per metric, every run that has it overlaid (a run's colour is the same in
    every panel); a metric logged once per run (a test score) as horizontal bars.
    ``runs``: ``(name, {metric: series})``; ``unplaced``: names of runs of unknown step (an
    evaluation with no checkpoint), drawn beside curves as a dashed level, not a point."""
    present = [m for m in metrics if any(m in series for _, series in runs)]
    if not present:
        return None
    colors = {name: PALETTE[i % len(PALETTE)] for i, (name, _) in enumerate(runs)}
    cols = min(COLUMNS, len(present))
    rows = math.ceil(len(present) / cols)
    with rc_context(STYLE):
        fig = Figure(figsize=(PANEL_WIDTH * cols, PANEL_HEIGHT * rows + 0.4),
                     layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= len(present):
                ax.set_visible(False)
                continue
            metric = present[i]
            ax.set_title(_shown(metric))
            logged = [(name, series[metric]) for name, series in runs if metric in series]
            if all(len(s) == 1 for _, s in logged):
                _bars(ax, logged, colors)
                continue
            for name, s in logged:
                if name in unplaced:
                    for value in _clean(s.values):
                        ax.axhline(value, color=colors[name], linestyle=(0, (4, 2)),
                                   linewidth=1.2, label=f"{_legend(name)} ({UNKNOWN_STEP})")
                    continue
                ax.plot(s.steps, _clean(s.values), color=colors[name], label=_legend(name),
                        marker="o" if len(s) <= 30 else None, markersize=4)
                _mark_nonfinite(ax, s, colors[name])
            ax.set_xlabel("step")
        handles: dict[str, object] = {}
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                       ncols=min(4, len(handles)))
        return _png(fig)


def _bars(ax, logged: Sequence[tuple[str, Series]], colors: dict[str, str]) -> None:
    names = [name for name, _ in logged][::-1]  # first run on top
    values = [s.last for _, s in logged][::-1]
    shown = _clean(values)
    ax.barh([_shown(n) for n in names], [0.0 if math.isnan(v) else v for v in shown],
            color=[colors[n] for n in names], height=0.6)
    for y, v in enumerate(values):
        ax.text(0 if not math.isfinite(v) else v, y, f" {v:.4g}", va="center", fontsize=8)
    ax.grid(axis="y", visible=False)
    ax.set_axisbelow(True)
    pad = max(0.75, (3 - len(names)) / 2 + 0.5)  # a lone bar stays slim
    ax.set_ylim(-pad, len(names) - 1 + pad)
    ax.set_xlabel(f"value at step {logged[0][1].steps[-1]}" if len(
        {s.steps[-1] for _, s in logged}) == 1 else "value")
    finite = [v for v in shown if not math.isnan(v)]
    if finite and min(finite) >= 0:
        ax.set_xlim(0, max(finite) * 1.18 or 1.0)
