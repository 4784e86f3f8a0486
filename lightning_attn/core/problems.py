"""Every problem kind, declared once: its rule, thresholds, words, remedy and chart lines.

A :class:`ProblemKind`'s rule measures one quantity of every block of a point at once, from
the point's columns (:class:`Reading`), against :class:`HealthThresholds`; a
:class:`Measurement` is one block's reading: the value, the limit, whether it is bad and
whether it is *clear*, past the limit by the recovery margin on the healthy side (made only
for the blocks asked for, :class:`Measured`). :func:`find_problems` turns the bad
measurements into :class:`Problem` records (structured: kind, block, quantity, value,
threshold, step, detail, hint); the callbacks warn with them, the summary table shows their
titles, the report draws their threshold lines and gives verdicts with :func:`verdict`.
Pure functions of the statistics: the callbacks and the report get the same answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import categories as w
from .point import Items, PointColumns
from .statistics import (
    SECTIONS,
    GlobalStats,
    ParameterSpec,
    RecordingConfig,
)
from .validation import check_fraction, check_int, check_positive_float

__all__ = [
    "PROBLEM_KINDS",
    "VERDICT_WORDS",
    "describe",
    "HealthThresholds",
    "Line",
    "Measurement",
    "Problem",
    "ProblemKind",
    "find_problems",
    "measure",
    "measure_point",
    "phrase",
    "problems_of",
    "verdict",
]


@dataclass(frozen=True)
class HealthThresholds:
    """Every threshold of the health rules.

    Args:
        std_threshold: a mask whose std is below this has collapsed.
        saturation_low: a mask value below this is saturated (near 0).
        saturation_high: a mask value above this is saturated (near 1).
        saturation_threshold: warn when the saturated share exceeds this.
        router_collapse_threshold: warn when the normalised router entropy is below this.
        router_indifference_threshold: warn when it is above this ...
        indifference_warmup_steps: ... at ``step >= indifference_warmup_steps``.
        dead_branch_factor: a branch whose mean weight is below ``dead_branch_factor / K``
            is dead (``0.1`` gives the ``1/(10K)`` rule).
        temperature_min: a learnable temperature below this has drifted.
        temperature_max: a learnable temperature above this has drifted.
        unit_margin: a learnable blend (alpha, beta) more than this outside ``[0, 1]`` has
            drifted (the blocks' default ``alpha=1.0`` sits on the edge: a first step past it
            is not yet a drift).
        head_entropy_threshold: an attention head whose normalised entropy (entropy / log of
            the keys a query may see) is below this has collapsed.
        max_logit_threshold: warn when an attention logit (scaled, before the softmax)
            passes this.
        recovery_margin: the report calls a warned block *recovered* only once the statistic
            is back past its threshold by this share of the threshold (hysteresis: noise
            around a threshold does not flip a verdict).
    """

    std_threshold: float = 0.02
    # the forward counts the saturated values: the defaults are the recording's
    saturation_low: float = RecordingConfig.saturation_low
    saturation_high: float = RecordingConfig.saturation_high
    saturation_threshold: float = 0.5
    router_collapse_threshold: float = 0.1
    router_indifference_threshold: float = 0.98
    indifference_warmup_steps: int = 500
    dead_branch_factor: float = 0.1
    temperature_min: float = 0.05
    temperature_max: float = 20.0
    # Re-derived on cluttered digits: CoordinateAttention's unbounded alphas settle at 1.3-1.4
    # (stage 2), and the bounded block, which cannot pass 1, is ahead at the configs' budget
    # on each of 3 seeds (docs/remedies.md), so an alpha past 1 is not a helpful state to
    # tolerate; 0.05 only spares the first steps past the default alpha=1.0.
    unit_margin: float = 0.05
    # Normalised entropy 0.1 leaves exp(0.1 * log N) effective keys per query: 1.7 of ViT-B's
    # 197 tokens, 2.1 of 2048: (nearly) one-hot attention, the "entropy collapse" Zhai et al.
    # 2023 tie to unstable training, and the "near-zero entropy" before ViT-22B diverged
    # (Dehghani et al. 2023). At initialisation heads sit near 1. Heads that specialise on one
    # key by design (previous-token heads of language models) may sit low: lower it there.
    head_entropy_threshold: float = 0.1
    # Kimi K2's QK-clip threshold tau = 100: past it, K2 rescales a head's query and key
    # weights (MuonClip). Dehghani et al. 2023 traced ViT-22B's divergence to "extremely
    # large values in attention logits"; a fresh transformer's logits are a few units.
    max_logit_threshold: float = 100.0
    recovery_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in (
            "std_threshold", "saturation_low", "saturation_high", "saturation_threshold",
            "router_collapse_threshold", "router_indifference_threshold", "dead_branch_factor",
            "unit_margin", "head_entropy_threshold", "recovery_margin",
        ):
            object.__setattr__(self, name, check_fraction(name, getattr(self, name)))
        check_int("indifference_warmup_steps", self.indifference_warmup_steps, 0)
        for name in ("temperature_min", "temperature_max", "max_logit_threshold"):
            object.__setattr__(self, name, check_positive_float(name, getattr(self, name)))
        for low, high in (("temperature_min", "temperature_max"),
                          ("saturation_low", "saturation_high")):
            if not getattr(self, low) < getattr(self, high):
                raise ValueError(
                    f"{low} must be below {high}, got {low}={getattr(self, low)} and "
                    f"{high}={getattr(self, high)}"
                )

    def resolve(self, value: float | str | None) -> float | None:
        """A number, or the value of the field it names (a :class:`ParameterSpec` bound)."""
        return getattr(self, value) if isinstance(value, str) else value

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> tuple[HealthThresholds, list[str]]:
        """Thresholds from a run's ``attn/config`` entry, and notes on what was ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        notes = [f"thresholds unknown to this version, ignored: {', '.join(unknown)}"] if (
            unknown) else []
        return cls(**{k: v for k, v in doc.items() if k in known}), notes


def describe(kind: str, quantity: str, value: float, threshold: float) -> str:
    """``"mask std 0.0031 < 0.02"``: a value against its threshold, in words."""
    if kind == "nonfinite":
        return f"NaN or Inf in {value:g} {quantity or 'quantities'}"
    relation = "<" if value < threshold else ">"
    return f"{quantity or 'value'} {value:.3g} {relation} {threshold:.3g}"


@dataclass(frozen=True)
class Measurement:
    """One kind's reading of one block at one point.

    ``value`` against ``threshold``; ``bad``: the rule fires; ``clear``: the value is past the
    threshold on the healthy side by the recovery margin. ``quantity`` says what ``value``
    is (``"mask std"``, a parameter's name), ``detail`` the whole finding in words.
    """

    value: float
    threshold: float
    bad: bool
    clear: bool
    quantity: str
    detail: str


@dataclass(frozen=True)
class Problem:
    """One problem of one block at one step, structured (the message is derived)."""

    block: str
    kind: str
    value: float
    threshold: float
    step: int
    quantity: str = ""
    detail: str = ""
    hint: str = ""

    @property
    def message(self) -> str:
        """The warning's text: block, step, finding and what to try."""
        return (f"attention block {self.block!r} at step {self.step}: {self.detail}. "
                f"Try: {self.hint}.")

    def describe(self) -> str:
        """The value against its threshold, in words (``"alpha_h 1.02 > 1"``)."""
        return describe(self.kind, self.quantity, self.value, self.threshold)

    def to_json(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "message": self.message}

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> Problem:
        """Raises ``KeyError``/``TypeError``/``ValueError`` on a bad document. A document
        of an older version (one ``message``, no ``detail``/``hint``) keeps its message as
        the detail."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in doc.items() if k in names}
        for key in ("block", "kind"):
            values[key] = str(doc[key])
        values.update(value=float(doc["value"]), threshold=float(doc["threshold"]),
                      step=int(doc["step"]))
        if "detail" not in values and "message" in doc:
            values["detail"] = str(doc["message"])
        return cls(**values)


@dataclass(frozen=True)
class Line:
    """A threshold drawn on a report panel: its label, height, and first step."""

    panel: str
    label: str
    y: float
    x0: int = 0


def _fmt(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class Reading:
    """One problem kind read on every block of a point at once (a few array operations).

    Per block (``(blocks,)`` arrays): ``applies`` (the kind reads something of it), its
    ``value`` against ``threshold``, ``bad`` and ``clear`` (see :class:`Measurement`);
    ``quantity(b)`` and ``detail(b)`` say it in words for block ``b`` (made only for the
    blocks that need them: a problem, or a measurement asked for).
    """

    applies: np.ndarray
    value: np.ndarray
    threshold: np.ndarray
    bad: np.ndarray
    clear: np.ndarray
    quantity: Callable[[int], str]
    detail: Callable[[int], str]

    def measurement(self, b: int) -> Measurement:
        return Measurement(float(self.value[b]), float(self.threshold[b]), bool(self.bad[b]),
                           bool(self.clear[b]), self.quantity(b), self.detail(b))

    def window(self, start: int, stop: int) -> Reading:
        """Blocks ``[start, stop)`` of this reading (views), numbered from 0."""
        cut = slice(start, stop)
        quantity, detail = self.quantity, self.detail
        return Reading(self.applies[cut], self.value[cut], self.threshold[cut], self.bad[cut],
                       self.clear[cut], lambda b: quantity(start + b),
                       lambda b: detail(start + b))


def _below(value: np.ndarray, limit: np.ndarray,
           t: HealthThresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(bad, clear)`` for a quantity that must not fall below ``limit``."""
    return value < limit, value >= limit * (1 + t.recovery_margin)


def _above(value: np.ndarray, limit: np.ndarray,
           t: HealthThresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(bad, clear)`` for a quantity that must not rise above ``limit``."""
    return value > limit, value <= limit * (1 - t.recovery_margin)


def _pick(block: np.ndarray, value: np.ndarray, valid: np.ndarray, n: int,
          largest: bool) -> np.ndarray:
    """For each of ``n`` blocks, the index of its valid item with the smallest (``largest``:
    largest) value, the first such on a tie (as ``min``/``max``); ``-1`` where it has none."""
    out = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(valid)
    if len(idx):
        order = np.lexsort((-value[idx] if largest else value[idx], block[idx]))
        chosen, blocks = idx[order], block[idx][order]
        first = np.empty(len(blocks), dtype=bool)
        first[0], first[1:] = True, blocks[1:] != blocks[:-1]
        out[blocks[first]] = chosen[first]
    return out


def _reading(n: int, chosen: np.ndarray, value: np.ndarray, limit: np.ndarray | float,
             judge, t: HealthThresholds, quantity: str,
             detail: Callable[[int, int], str]) -> Reading:
    """A :class:`Reading` from each block's chosen item (``-1``: none) and its value."""
    applies = chosen >= 0
    v = np.full(n, math.nan)
    v[applies] = value[chosen[applies]]
    limit = (np.full(n, float(limit)) if np.ndim(limit) == 0
             else np.array(limit, dtype=float))
    with np.errstate(invalid="ignore"):
        bad, clear = judge(v, limit, t)
    return Reading(applies, v, limit, bad & applies, clear & applies, lambda b: quantity,
                   lambda b: detail(b, int(chosen[b])))


def _masks(point: PointColumns, finite_std: bool = False) -> tuple[Items, np.ndarray]:
    m = point.masks
    valid = m.present & (m.cols["nonfinite"] == 0)
    if finite_std:  # a std undefined at this point (one value) is not measured
        valid &= np.isfinite(m.cols["std"])
    return m, valid


# -- the rules: each reads every block of a point at once ------------------------------------


def _mask_collapse(point: PointColumns, t: HealthThresholds, step: int,
                   sections: frozenset[str]) -> Reading | None:
    m, valid = _masks(point, finite_std=True)
    std, mean = m.cols["std"], m.cols["mean"]
    limit = t.std_threshold
    chosen = _pick(m.block, std, valid, point.num_blocks, largest=False)
    return _reading(
        point.num_blocks, chosen, std, limit, _below, t, "mask std",
        lambda b, i: f"mask {m.names[i]!r} std {_fmt(std[i])} < std_threshold={limit} (mean "
                     f"{_fmt(mean[i])}): the mask is nearly constant and no longer selects")


def _mask_saturation(point: PointColumns, t: HealthThresholds, step: int,
                     sections: frozenset[str]) -> Reading | None:
    m, valid = _masks(point)
    c = m.cols
    limit = t.saturation_threshold
    chosen = _pick(m.block, c["saturated"], valid, point.num_blocks, largest=True)
    return _reading(
        point.num_blocks, chosen, c["saturated"], limit, _above, t, "saturated share",
        lambda b, i: f"mask {m.names[i]!r} has {c['saturated'][i]:.1%} of its values "
                     f"saturated ({c['sat_low'][i]:.1%} < {t.saturation_low}, "
                     f"{c['sat_high'][i]:.1%} > {t.saturation_high}), above "
                     f"saturation_threshold={limit}: the gate passes almost no gradient")


def _routers(point: PointColumns) -> list[tuple[Items, np.ndarray]]:
    # routers that route: finite, two branches or more
    return [(g, g.present & (g.cols["nonfinite"] == 0)) for g in point.routers if g.width >= 2]


def _grouped_reading(n: int, groups: list[tuple[Items, np.ndarray]], value_of, limit_of,
                     judge, t: HealthThresholds, quantity: str, detail) -> Reading | None:
    """A rule over groups of blocks (routers by number of branches, heads by number of
    heads): each block's value from its group's column, where ``groups`` marks it valid;
    ``None`` (no block to read) without groups."""
    if not groups:
        return None
    chosen = np.full(n, -1, dtype=np.int64)
    group_of = np.full(n, -1, dtype=np.int64)
    values = np.full(n, math.nan)
    limits = np.full(n, math.nan)
    for j, (g, valid) in enumerate(groups):
        blocks = g.block[valid]
        chosen[blocks] = np.flatnonzero(valid)
        group_of[blocks] = j
        values[blocks] = value_of(g)[valid]
        limits[blocks] = limit_of(g)
    applies = chosen >= 0
    with np.errstate(invalid="ignore"):
        bad, clear = judge(values, limits, t)
    return Reading(applies, values, limits, bad & applies, clear & applies,
                   lambda b: quantity, lambda b: detail(groups[group_of[b]][0], int(chosen[b])))


def _router_rule(point: PointColumns, t: HealthThresholds, value_of, limit_of, judge,
                 quantity: str, detail) -> Reading | None:
    """A router rule over the router groups (one per number of branches) of a point."""
    return _grouped_reading(point.num_blocks, _routers(point), value_of,
                            lambda g: limit_of(g.width), judge, t, quantity, detail)


def _router_collapse(point: PointColumns, t: HealthThresholds, step: int,
                     sections: frozenset[str]) -> Reading | None:
    limit = t.router_collapse_threshold

    def detail(g: Items, i: int) -> str:
        usage = g.cols["usage"][i]
        top = int(np.argmax(usage))
        return (f"normalised router entropy {_fmt(g.cols['entropy_norm'][i])} < "
                f"router_collapse_threshold={limit}: the router sends nearly every sample to "
                f"one branch (branch {top}, mean weight {_fmt(usage[top])})")

    return _router_rule(point, t, lambda g: g.cols["entropy_norm"], lambda k: limit, _below,
                        "normalised entropy", detail)


def _router_indifference(point: PointColumns, t: HealthThresholds, step: int | np.ndarray,
                         sections: frozenset[str]) -> Reading | None:
    warm = np.asarray(step) >= t.indifference_warmup_steps
    if not warm.any():
        return None
    limit = t.router_indifference_threshold
    reading = _router_rule(
        point, t, lambda g: g.cols["entropy_norm"], lambda k: limit, _above,
        "normalised entropy",
        lambda g, i: f"normalised router entropy {_fmt(g.cols['entropy_norm'][i])} > "
                     f"router_indifference_threshold={limit} after indifference_warmup_steps="
                     f"{t.indifference_warmup_steps}: the router weighs all branches (nearly) "
                     "equally for every input and does not route")
    if reading is None or warm.all():
        return reading
    # points of several steps judged at once (the report): only those past the warm-up
    return dataclasses.replace(reading, applies=reading.applies & warm, bad=reading.bad & warm,
                               clear=reading.clear & warm)


def _dead_branch(point: PointColumns, t: HealthThresholds, step: int,
                 sections: frozenset[str]) -> Reading | None:
    def detail(g: Items, i: int) -> str:
        usage = g.cols["usage"][i]
        k = int(np.argmin(usage))
        return (f"branch {k} has mean router weight {_fmt(usage[k])} < dead_branch_factor/K="
                f"{_fmt(t.dead_branch_factor / g.width)}: it is (almost) never used")

    return _router_rule(point, t, lambda g: g.cols["usage"].min(axis=1),
                        lambda k: t.dead_branch_factor / k, _below, "branch weight", detail)


def _worst_head(values: np.ndarray, largest: bool) -> str:
    # "head 3 of 12": the first of the lowest (highest) finite heads
    if len(values) == 0:
        return ""
    key = np.where(np.isnan(values), math.inf, -values if largest else values)
    return f" (head {int(np.argmin(key))} of {len(values)})"


def _heads(point: PointColumns, name: str) -> list[tuple[Items, np.ndarray]]:
    return [(g, g.present & (g.cols["nonfinite"] == 0) & np.isfinite(g.cols[name]))
            for g in point.heads]


def _head_rule(point: PointColumns, t: HealthThresholds, name: str, limit: float, judge,
               quantity: str, detail) -> Reading | None:
    return _grouped_reading(point.num_blocks, _heads(point, name), lambda g: g.cols[name],
                            lambda g: float(limit), judge, t, quantity, detail)


def _head_entropy_collapse(point: PointColumns, t: HealthThresholds, step: int,
                           sections: frozenset[str]) -> Reading | None:
    limit = t.head_entropy_threshold
    return _head_rule(
        point, t, "entropy_min", limit, _below, "lowest head entropy",
        lambda g, i: f"the lowest attention head entropy"
                     f"{_worst_head(g.cols['head_entropy'][i], largest=False)} is "
                     f"{_fmt(g.cols['entropy_min'][i])} < head_entropy_threshold={limit} "
                     f"(normalised: 0 one-hot, 1 uniform; mean over heads "
                     f"{_fmt(g.cols['entropy_mean'][i])}): its queries attend to (nearly) one "
                     "key each")


def _logit_growth(point: PointColumns, t: HealthThresholds, step: int,
                  sections: frozenset[str]) -> Reading | None:
    limit = t.max_logit_threshold
    return _head_rule(
        point, t, "max_logit", limit, _above, "max attention logit",
        lambda g, i: f"the max attention logit"
                     f"{_worst_head(g.cols['head_max_logit'][i], largest=True)} is "
                     f"{_fmt(g.cols['max_logit'][i])} > max_logit_threshold={limit:g} (scaled, "
                     "before the softmax): the query and key weights are growing and the "
                     "softmax turns one-hot")


def _nonfinite_parts(point: PointColumns, sections: frozenset[str]) -> list:
    """``(block of each bad thing, its words)`` column pairs of what is NaN or Inf, in the
    sections read."""
    parts = []
    if "mask" in sections:
        m = point.masks
        bad = m.present & (m.cols["nonfinite"] > 0)
        parts.append((m.block[bad], [f"mask {m.names[i]!r} ({int(m.cols['nonfinite'][i])} "
                                     "values)" for i in np.flatnonzero(bad)]))
    if "router" in sections:
        for g in point.routers:
            bad = g.present & (g.cols["nonfinite"] > 0)
            parts.append((g.block[bad], [f"router weights ({int(v)} values)"
                                         for v in g.cols["nonfinite"][bad]]))
    if "heads" in sections:
        for g in point.heads:
            bad = g.present & (g.cols["nonfinite"] > 0)
            parts.append((g.block[bad], [f"attention logits of {int(v)} heads"
                                         for v in g.cols["nonfinite"][bad]]))
    if "param" in sections:
        p = point.params
        bad = ~np.isfinite(p.value)
        parts.append((p.block[bad], [f"parameter {p.names[i]!r} = {p.value[i]}"
                                     for i in np.flatnonzero(bad)]))
        bad = p.has_grad & ~np.isfinite(p.grad)
        parts.append((p.block[bad], [f"the gradient of parameter {p.names[i]!r} (norm "
                                     f"{p.grad[i]})" for i in np.flatnonzero(bad)]))
    return parts


def _nonfinite(point: PointColumns, t: HealthThresholds, step: int,
               sections: frozenset[str]) -> Reading | None:
    n = point.num_blocks
    parts = _nonfinite_parts(point, sections)
    count = np.zeros(n)
    for blocks, _ in parts:
        np.add.at(count, blocks, 1)

    said: dict[int, list[str]] = {}  # the words of each block with something non-finite
    for blocks, texts in parts:
        for blk, words in zip(blocks.tolist(), texts, strict=True):
            said.setdefault(blk, []).append(words)

    def detail(b: int) -> str:
        return "NaN or Inf in " + ", ".join(said.get(b, ()))

    return Reading(np.ones(n, dtype=bool), count, np.zeros(n), count > 0, count == 0,
                   lambda b: "quantities", detail)


@functools.lru_cache(maxsize=64)
def _drift_bounds(specs: tuple[ParameterSpec | None, ...], t: HealthThresholds) -> tuple:
    """Per parameter row: the drift limits and the band inside them that counts as clear,
    resolved against the thresholds (fixed for a run: computed once)."""
    lo, hi, clear_lo, clear_hi, words = [], [], [], [], []
    for spec in specs:
        if spec is None:
            lo.append(-math.inf), hi.append(math.inf), clear_lo.append(-math.inf)
            clear_hi.append(math.inf), words.append(("", "", ""))
            continue
        margin = t.resolve(spec.margin) or 0.0
        low, high = t.resolve(spec.low), t.resolve(spec.high)
        a = -math.inf if low is None else low - margin
        z = math.inf if high is None else high + margin
        lo.append(a), hi.append(z)
        clear_lo.append(a + _recovery_band(t, margin, a))
        clear_hi.append(z - _recovery_band(t, margin, z))
        if margin:
            where = (f"[{low:g}, {high:g}]" if low is not None and high is not None
                     else f">= {low:g}" if low is not None else f"<= {high:g}")
            text = f"outside {where} (by more than {spec.margin}={margin:g})"
            words.append((text, text, spec.hint))
        else:
            words.append((f"< {spec.low}={a:g}", f"> {spec.high}={z:g}", spec.hint))
    return (np.asarray(lo), np.asarray(hi), np.asarray(clear_lo), np.asarray(clear_hi),
            tuple(words), np.asarray([s is not None for s in specs], dtype=bool))


def _recovery_band(t: HealthThresholds, margin: float, bound: float) -> float:
    """How far inside a drift limit a parameter must be to count as clear of it."""
    if not math.isfinite(bound):
        return 0.0
    return t.recovery_margin * (margin if margin > 0 else abs(bound))


def _first_per_block(block: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """For each block, its first row among ``rows`` (a boolean mask); ``-1`` where none."""
    out = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(rows)[::-1]  # assigned last to first: the first row wins
    out[block[idx]] = idx
    return out


def _drift(point: PointColumns, t: HealthThresholds, step: int,
           sections: frozenset[str]) -> Reading | None:
    p, n = point.params, point.num_blocks
    if not len(p):
        return None
    lo, hi, clear_lo, clear_hi, words, has_spec = _drift_bounds(p.specs, t)
    v = p.value
    rows = p.trainable & has_spec & np.isfinite(v)
    with np.errstate(invalid="ignore"):
        bad = rows & ~((lo <= v) & (v <= hi))
        clear = rows & (clear_lo <= v) & (v <= clear_hi)
    applies = np.zeros(n, dtype=bool)
    applies[p.block[rows]] = True
    unclear = np.zeros(n)
    np.add.at(unclear, p.block[rows & ~clear], 1)
    # the row a block's measurement names: its first drifted, else first not clear, else first
    first = _first_per_block(p.block, rows, n)
    for candidates in (rows & ~clear, bad):
        found = _first_per_block(p.block, candidates, n)
        first = np.where(found >= 0, found, first)
    value = np.full(n, math.nan)
    limit = np.full(n, math.nan)
    has = first >= 0
    value[has] = v[first[has]]
    named = first[has]
    limit[has] = np.where(v[named] < lo[named], lo[named], hi[named])
    any_bad = np.zeros(n, dtype=bool)
    any_bad[p.block[bad]] = True

    def detail(b: int) -> str:
        drifted = [i for i in np.flatnonzero(bad & (p.block == b)).tolist()]
        said = ", ".join(f"{p.names[i]} = {_fmt(v[i])} "
                         f"{words[i][0] if v[i] < lo[i] else words[i][1]}" for i in drifted)
        hints = "; ".join(dict.fromkeys(words[i][2] for i in drifted if words[i][2]))
        return (f"learnable {said}: the parameter left the range its block declares for it"
                + (f" ({hints})" if hints else ""))

    return Reading(applies, value, limit, any_bad, applies & (unclear == 0),
                   lambda b: p.names[int(first[b])], detail)


def _param_lines(t: HealthThresholds, specs: Mapping[str, ParameterSpec]) -> list[Line]:
    lines = []
    for name, spec in specs.items():
        margin = t.resolve(spec.margin) or 0.0
        for bound, sign in ((spec.low, -1), (spec.high, 1)):
            value = t.resolve(bound)
            if value is not None:
                lines.append(Line("parameters", f"drift: {name} beyond {value + sign * margin:g}",
                                  value + sign * margin))
    return lines


@dataclass(frozen=True)
class ProblemKind:
    """A kind of problem.

    Attributes:
        name: its key (``"mask_collapse"``).
        category: the warning it raises.
        section: the statistics it reads (``"mask"``, ``"router"``, ``"param"``, ``"heads"``;
            ``None``: all of them).
        title: a word for the summary table (``"collapse"``).
        phrase: the verdict's words (``"collapsed"``).
        hint: what to try, naming the argument or callback that applies the remedy.
        rule: the reading of every block of a point at once (:class:`Reading`; ``None``:
            does not apply at this step), from the point's columns, the thresholds, the step
            (or each block's step, ``(blocks,)``: see :func:`measure_point`) and the sections
            read.
        thresholds: the :class:`HealthThresholds` fields it reads.
        panel: the report panel that shows its quantity (``None``: every panel of its
            section).
        lines: the threshold lines it draws, given the thresholds, ``K`` and the specs of
            the block's learnable parameters.
    """

    name: str
    category: type[Warning]
    section: str | None
    title: str
    phrase: str
    hint: str
    rule: Callable[[PointColumns, HealthThresholds, int | np.ndarray, frozenset[str]],
                   Reading | None]
    thresholds: tuple[str, ...] = ()
    panel: str | None = None
    lines: Callable[[HealthThresholds, int, Mapping[str, ParameterSpec]], list[Line]] = (
        lambda t, k, specs: [])


#: Every problem kind, in the order problems are listed.
PROBLEM_KINDS: dict[str, ProblemKind] = {k.name: k for k in (
    ProblemKind(
        "mask_collapse", w.MaskCollapseWarning, "mask", "collapse", "collapsed",
        "DSA: a lower temperature (mask = gate(logit / T): a high T flattens it towards 0.5), "
        "or a lower start= of TemperatureSchedule if it fires while the schedule holds T "
        "high; in either block a lower learning rate for the attention, and check that the "
        "features reaching the block vary (flat features give a flat mask, as often at "
        "initialisation: a collapse that clears is warned about again only if it returns)",
        _mask_collapse, ("std_threshold",), "mask std",
        lambda t, k, s: [Line("mask std", f"collapse < {t.std_threshold:g}", t.std_threshold)],
    ),
    ProblemKind(
        "mask_saturation", w.MaskSaturationWarning, "mask", "saturation", "saturated",
        "DSA: TemperatureSchedule(start=4.0, end=1.0, handoff='learnable') keeps the gate "
        "soft while the branches learn (exclude=[...] a block it should leave sharper), "
        "learnable_temperature=True with a larger eps as a floor (T >= eps), or "
        "gate='hardsigmoid'; a gate saturated near 1 passes its input and can be benign",
        _mask_saturation,
        ("saturation_low", "saturation_high", "saturation_threshold"),
        "mask saturation (share of values)",
        lambda t, k, s: [Line("mask saturation (share of values)",
                              f"saturation: below + above > {t.saturation_threshold:g}",
                              t.saturation_threshold)],
    ),
    ProblemKind(
        "router_collapse", w.RouterCollapseWarning, "router", "r.collapse",
        "router collapsed onto one branch",
        "the router balance loss: AttentionClassifier(aux_loss={'balance': 0.01}) "
        "(--model.aux_loss.balance 0.01) or loss = loss + attention_aux_loss(self, "
        "balance=0.01); z_loss=1e-3 if the router logits grow; less weight decay on the "
        "router, or a single-branch block if one branch is all you need",
        _router_collapse, ("router_collapse_threshold",), "router entropy",
        lambda t, k, s: [Line("router entropy", f"collapse < {t.router_collapse_threshold:g}",
                              t.router_collapse_threshold)],
    ),
    ProblemKind(
        "router_indifference", w.RouterIndifferenceWarning, "router", "indifference",
        "router ignoring its input",
        "lower or zero router-loss weights (aux_loss balance / importance / entropy push "
        "towards uniform routing), a larger router_hidden, a higher learning rate for the "
        "router, fewer branches, or a longer indifference_warmup_steps if the run is young",
        _router_indifference,
        ("router_indifference_threshold", "indifference_warmup_steps"), "router entropy",
        lambda t, k, s: [Line(
            "router entropy",
            f"indifference > {t.router_indifference_threshold:g} (from step "
            f"{t.indifference_warmup_steps})",
            t.router_indifference_threshold, t.indifference_warmup_steps)],
    ),
    ProblemKind(
        "dead_branch", w.DeadBranchWarning, "router", "dead branch", "dead branch",
        "the router balance loss (aux_loss={'balance': 0.01} or {'importance': 0.1}, or "
        "attention_aux_loss(self, balance=0.01)) brings usage back to every branch; or remove "
        "the branch (fewer `kernels` or use_dilated=False)",
        _dead_branch, ("dead_branch_factor",), "branch usage (mean router weight)",
        lambda t, k, s: [Line(
            "branch usage (mean router weight)",
            f"dead < {t.dead_branch_factor / k:.3g} (dead_branch_factor / K)",
            t.dead_branch_factor / k)] if k else [],
    ),
    ProblemKind(
        "head_entropy_collapse", w.HeadEntropyCollapseWarning, "heads", "h.collapse",
        "attention head collapsed onto one key",
        "QK normalisation (timm: qk_norm=True, e.g. timm.create_model('vit_small_patch16_224', "
        "qk_norm=True), where the model has it) or lightning_attn.callbacks.QKClip, which "
        "rescales a head's query and key weights when its max logit passes the threshold "
        "(the logit growth that drives the collapse); a lower learning rate or a longer "
        "warm-up; heads that specialise on one key by design (previous-token heads of a "
        "language model) may sit low: lower head_entropy_threshold or exclude the module",
        _head_entropy_collapse, ("head_entropy_threshold",),
        "head entropy (normalised: 0 one-hot, 1 uniform)",
        lambda t, k, s: [Line("head entropy (normalised: 0 one-hot, 1 uniform)",
                              f"collapse < {t.head_entropy_threshold:g}",
                              t.head_entropy_threshold)],
    ),
    ProblemKind(
        "logit_growth", w.LogitGrowthWarning, "heads", "logit growth", "attention logits growing",
        "QK-clip: lightning_attn.callbacks.QKClip(threshold=100) rescales the query and key "
        "weights of a head whose max logit passes the threshold after each optimizer step "
        "(Kimi K2); or QK normalisation (timm: qk_norm=True, where the model has it); a "
        "lower learning rate or more weight decay on the query and key projections",
        _logit_growth, ("max_logit_threshold",), "max attention logit",
        lambda t, k, s: [Line("max attention logit", f"growth > {t.max_logit_threshold:g}",
                              t.max_logit_threshold)],
    ),
    ProblemKind(
        "nonfinite", w.NonFiniteWarning, None, "non-finite", "non-finite values",
        "gradient clipping (Trainer(gradient_clip_val=1.0)), a lower learning rate, float32 "
        "instead of 16-bit, the router z-loss against router-logit blow-up (aux_loss="
        "{'z_loss': 1e-3}), or a larger eps for a learnable temperature; look for the first "
        "step where this block's inputs blow up (under 16-bit mixed precision the GradScaler "
        "skips a step with an Inf gradient: a one-off early is normal, repeated ones are not)",
        _nonfinite,
    ),
    ProblemKind(
        "parameter_drift", w.ParameterDriftWarning, "param", "drift", "drifting parameter",
        "CoordinateAttention(bounded=True) keeps learnable alphas and betas in [0, 1]; a DSA "
        "temperature: TemperatureSchedule(handoff='fixed') holds it, eps is its floor, or "
        "learnable_temperature=False; a lower learning rate or more weight decay for it",
        _drift, ("temperature_min", "temperature_max", "unit_margin"), "parameters",
        lambda t, k, specs: _param_lines(t, specs),
    ),
)}


def phrase(kind: str) -> str:
    """The verdict words of a problem kind (its name for a kind this version does not know,
    as in a report of a newer version's run)."""
    declared = PROBLEM_KINDS.get(kind)
    return declared.phrase if declared is not None else kind.replace("_", " ")


def _reads(kind: ProblemKind, sections: frozenset[str]) -> bool:
    return kind.section is None or kind.section in sections


class Measured(Mapping):
    """``(block, kind) -> Measurement`` for every kind that applies to every block of a
    point, read as columns (:class:`Reading` per kind); a :class:`Measurement` (its words
    included) is made only when asked for. :meth:`bad_by_window` and :meth:`clear_at` give
    what the callback needs without making one for each block."""

    def __init__(self, names: Sequence[str], readings: Mapping[str, Reading]) -> None:
        self.names = tuple(names)
        self.readings = dict(readings)
        self._keys: list[tuple[str, str]] | None = None  # made when iterated
        self._index = {name: b for b, name in enumerate(self.names)}

    def _all_keys(self) -> list[tuple[str, str]]:
        if self._keys is None:
            self._keys = [(self.names[b], kind) for b in range(len(self.names))
                          for kind, r in self.readings.items() if r.applies[b]]
        return self._keys

    def __getitem__(self, key: tuple[str, str]) -> Measurement:
        block, kind = key
        reading = self.readings[kind]
        b = self._index[block]
        if not reading.applies[b]:
            raise KeyError(key)
        return reading.measurement(b)

    def __iter__(self):
        return iter(self._all_keys())

    def __len__(self) -> int:
        return len(self._all_keys())

    def bad_keys(self) -> list[tuple[str, str]]:
        """The ``(block, kind)`` pairs of the bad measurements (no words made), in block
        order, then kind order."""
        return [(self.names[b], kind) for b, kind in self._bad()]

    def _bad(self) -> list[tuple[int, str]]:
        # (block, kind) of each bad measurement, in block order, then kind order
        order = {kind: i for i, kind in enumerate(self.readings)}
        rows = sorted((int(b), order[kind], kind) for kind, r in self.readings.items()
                      for b in np.flatnonzero(r.bad))
        return [(b, kind) for b, _, kind in rows]

    def problem(self, key: tuple[str, str], step: int) -> Problem:
        """The :class:`Problem` of one bad measurement."""
        return self.problem_at(self._index[key[0]], key[1], step)

    def problem_at(self, b: int, kind: str, step: int) -> Problem:
        """The :class:`Problem` of block ``b``'s bad measurement of ``kind``."""
        m = self.readings[kind].measurement(b)
        return Problem(self.names[b], kind, m.value, m.threshold, step, m.quantity, m.detail,
                       PROBLEM_KINDS[kind].hint)

    def bad_by_window(self, size: int) -> dict[int, list[tuple[int, str]]]:
        """The bad measurements of a batch of points of ``size`` blocks each
        (:meth:`~.point.PointPlan.tiled`): point -> ``[(block index, kind)]``, in block
        order, then kind order (as :meth:`bad_keys`)."""
        out: dict[int, list[tuple[int, str]]] = {}
        for b, kind in self._bad():
            out.setdefault(b // size, []).append((b, kind))
        return out

    def clear_at(self, b: int, kind: str) -> bool:
        """Whether block ``b``'s statistic of ``kind`` is clear (``False`` where the kind
        does not apply)."""
        reading = self.readings.get(kind)
        return reading is not None and bool(reading.clear[b])

    def window(self, start: int, stop: int) -> Measured:
        """Blocks ``[start, stop)`` as a measurement of their own: one point of a batch of
        points judged at once (:meth:`~.point.PointPlan.tiled`)."""
        return Measured(self.names[start:stop],
                        {kind: r.window(start, stop) for kind, r in self.readings.items()})


def measure(
    stats: GlobalStats,
    thresholds: HealthThresholds,
    kinds: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
) -> Measured:
    """``(block, kind) -> Measurement`` for every kind that applies to every block: each kind
    read once on the point's columns, whatever the number of blocks."""
    return measure_point(stats.point(), stats.step, thresholds, kinds, sections)


def measure_point(
    point: PointColumns,
    step: int | np.ndarray,
    thresholds: HealthThresholds,
    kinds: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
) -> Measured:
    """:func:`measure` on a point's columns; ``step`` may also give each block its own step
    (``(blocks,)``: the report judges the blocks of many points as the blocks of one)."""
    kinds = tuple(PROBLEM_KINDS if kinds is None else kinds)
    sections = frozenset(SECTIONS if sections is None else sections)
    readings = {}
    for name in kinds:
        kind = PROBLEM_KINDS[name]
        if _reads(kind, sections):
            reading = kind.rule(point, thresholds, step, sections)
            if reading is not None:
                readings[name] = reading
    return Measured(point.names, readings)


def problems_of(measured: Mapping[tuple[str, str], Measurement], step: int) -> list[Problem]:
    """The bad measurements of one point (:func:`measure`) as :class:`Problem` records."""
    if isinstance(measured, Measured):
        return [measured.problem(key, step) for key in measured.bad_keys()]
    return [Problem(block, kind, m.value, m.threshold, step, m.quantity, m.detail,
                    PROBLEM_KINDS[kind].hint) for (block, kind), m in measured.items() if m.bad]


def find_problems(
    stats: GlobalStats,
    thresholds: HealthThresholds,
    kinds: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
) -> list[Problem]:
    """The problems of ``stats`` among ``kinds`` (default: all), reading only the statistics
    in ``sections`` (default: all). At most one per block and kind (the worst mask, branch or
    parameter), in block order, then kind order."""
    return problems_of(measure(stats, thresholds, kinds, sections), stats.step)


# -- verdicts -------------------------------------------------------------------------------

#: The verdict words, each defined once (the README's table is this one).
VERDICT_WORDS: dict[str, str] = {
    "healthy": "no warning was given and no problem at the last logged point",
    "problem": "a rule fires at the block's last logged point",
    "warned": "warned earlier; the rule does not fire at the last point, but the statistic "
              "has not stayed back past its threshold by the recovery margin",
    "recovered": "warned earlier; the statistic has been back past its threshold by the "
                 "recovery margin for at least the last 3 logged points and for at least "
                 "half of the points since the warning",
    "no data": "the block logged no training statistics",
}
#: Points a recovery must last (see ``VERDICT_WORDS["recovered"]``).
RECOVERY_POINTS = 3


@dataclass(frozen=True)
class Verdict:
    """The verdict on one block: ``status`` is a :data:`VERDICT_WORDS` key; ``kinds`` the
    problem kinds behind it; ``step`` the last logged step."""

    block: str
    status: str
    text: str
    kinds: tuple[str, ...] = ()
    step: int | None = None


def _describe(kind: str, m: Measurement) -> str:
    return describe(kind, m.quantity, m.value, m.threshold)


def verdict(
    block: str,
    history: Sequence[tuple[int, Mapping[str, Measurement]]],
    warned: Mapping[str, int],
) -> Verdict:
    """The verdict on ``block`` from its measurements at every logged point (``(step,
    {kind: measurement})``, in step order) and the kinds it was warned about (kind -> first
    step)."""
    if not history:
        return Verdict(block, "no data", "no training statistics logged")
    step, last = history[-1]
    active = [k for k in PROBLEM_KINDS if k in last and last[k].bad]
    if active:
        parts = []
        for k in active:
            since = warned.get(k)
            when = f", since step {since}" if since is not None and since < step else ""
            parts.append(f"{phrase(k)} ({_describe(k, last[k])} at step "
                         f"{step}{when})")
        return Verdict(block, "problem", "; ".join(parts), tuple(active), step)
    if not warned:
        return Verdict(block, "healthy", f"no problem at any logged step (up to step {step})",
                       (), step)
    pending = []
    for kind, first in warned.items():
        after = [m.get(kind) for s, m in history if s >= first]
        streak = 0
        for m in reversed(after):
            if m is None or not m.clear:
                break
            streak += 1
        if streak < max(RECOVERY_POINTS, math.ceil(len(after) / 2)):
            pending.append(kind)
    words = ", ".join(f"{phrase(k)} at step {s}" for k, s in warned.items())
    if pending:
        now = "; ".join(
            _describe(k, last[k]) if k in last
            else f"{k} not measured at the last point" for k in pending
        )
        return Verdict(block, "warned", f"warned earlier ({words}); at step {step}: {now}, "
                       "not yet back past the recovery margin", tuple(pending), step)
    return Verdict(block, "recovered", f"back to healthy since warned ({words}); fine at the "
                   f"last step ({step})", (), step)
