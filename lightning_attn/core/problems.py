"""Every problem kind, declared once: its rule, thresholds, words, remedy and chart lines.

A :class:`ProblemKind` measures one quantity of a block against :class:`HealthThresholds`
(:class:`Measurement`: the value, the limit, whether it is bad and whether it is *clear*, past
the limit by the recovery margin on the healthy side). :func:`find_problems` turns the bad
measurements into :class:`Problem` records (structured: kind, block, quantity, value,
threshold, step, detail, hint); the callbacks warn with them, the summary table shows their
titles, the report draws their threshold lines and gives verdicts with :func:`verdict`.
Pure functions of the statistics: the callbacks and the report get the same answer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import categories as w
from .statistics import (
    SECTIONS,
    BlockStats,
    GlobalStats,
    HeadStats,
    MaskStats,
    ParameterSpec,
    RouterStats,
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
    saturation_low: float = 0.05
    saturation_high: float = 0.95
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


def _below(value: float, limit: float, t: HealthThresholds) -> tuple[bool, bool]:
    """``(bad, clear)`` for a quantity that must not fall below ``limit``."""
    return value < limit, value >= limit * (1 + t.recovery_margin)


def _above(value: float, limit: float, t: HealthThresholds) -> tuple[bool, bool]:
    """``(bad, clear)`` for a quantity that must not rise above ``limit``."""
    return value > limit, value <= limit * (1 - t.recovery_margin)


def _finite_masks(bs: BlockStats) -> dict[str, MaskStats]:
    return {n: m for n, m in bs.masks.items() if not m.nonfinite}


def _finite_heads(bs: BlockStats) -> HeadStats | None:
    h = bs.heads
    return h if h is not None and not h.nonfinite else None


def _routing(bs: BlockStats) -> RouterStats | None:
    r = bs.router
    return r if r is not None and not r.nonfinite and r.num_branches >= 2 else None


# -- the rules ------------------------------------------------------------------------------


def _mask_collapse(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    # A std undefined at this point (one value) is not measured: no verdict either way.
    masks = {n: m for n, m in _finite_masks(bs).items() if m.std_defined}
    if not masks:
        return None
    name, m = min(masks.items(), key=lambda item: item[1].std)
    limit = t.std_threshold
    return Measurement(
        m.std, limit, *_below(m.std, limit, t), "mask std",
        f"mask {name!r} std {_fmt(m.std)} < std_threshold={limit} (mean {_fmt(m.mean)}): the "
        "mask is nearly constant and no longer selects",
    )


def _mask_saturation(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    masks = _finite_masks(bs)
    if not masks:
        return None
    name, m = max(masks.items(), key=lambda item: item[1].saturated)
    limit = t.saturation_threshold
    return Measurement(
        m.saturated, limit, *_above(m.saturated, limit, t), "saturated share",
        f"mask {name!r} has {m.saturated:.1%} of its values saturated "
        f"({m.saturation_split(t.saturation_low, t.saturation_high)}), above "
        f"saturation_threshold={limit}: the gate passes almost no gradient",
    )


def _router_collapse(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    r = _routing(bs)
    if r is None:
        return None
    top = max(range(r.num_branches), key=r.usage.__getitem__)
    limit = t.router_collapse_threshold
    return Measurement(
        r.entropy_norm, limit, *_below(r.entropy_norm, limit, t), "normalised entropy",
        f"normalised router entropy {_fmt(r.entropy_norm)} < router_collapse_threshold="
        f"{limit}: the router sends nearly every sample to one branch (branch {top}, mean "
        f"weight {_fmt(r.usage[top])})",
    )


def _router_indifference(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    r = _routing(bs)
    if r is None or step < t.indifference_warmup_steps:
        return None
    limit = t.router_indifference_threshold
    return Measurement(
        r.entropy_norm, limit, *_above(r.entropy_norm, limit, t), "normalised entropy",
        f"normalised router entropy {_fmt(r.entropy_norm)} > router_indifference_threshold="
        f"{limit} after indifference_warmup_steps={t.indifference_warmup_steps}: the router "
        "weighs all branches (nearly) equally for every input and does not route",
    )


def _dead_branch(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    r = _routing(bs)
    if r is None:
        return None
    limit = t.dead_branch_factor / r.num_branches
    k = min(range(r.num_branches), key=r.usage.__getitem__)
    return Measurement(
        r.usage[k], limit, *_below(r.usage[k], limit, t), "branch weight",
        f"branch {k} has mean router weight {_fmt(r.usage[k])} < dead_branch_factor/K="
        f"{_fmt(limit)}: it is (almost) never used",
    )


def _worst_head(values: Sequence[float], pick: Callable) -> str:
    # "head 3" where the per-head values are known (live); the report has the summary only.
    if not values:
        return ""
    h = pick(range(len(values)), key=lambda i: (math.isnan(values[i]), values[i]))
    return f" (head {h} of {len(values)})"


def _head_entropy_collapse(bs: BlockStats, t: HealthThresholds, step: int
                           ) -> Measurement | None:
    h = _finite_heads(bs)
    if h is None or math.isnan(h.entropy_min):
        return None
    limit = t.head_entropy_threshold
    return Measurement(
        h.entropy_min, limit, *_below(h.entropy_min, limit, t), "lowest head entropy",
        f"the lowest attention head entropy{_worst_head(h.head_entropy, min)} is "
        f"{_fmt(h.entropy_min)} < head_entropy_threshold={limit} (normalised: 0 one-hot, 1 "
        f"uniform; mean over heads {_fmt(h.entropy_mean)}): its queries attend to (nearly) "
        "one key each",
    )


def _logit_growth(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    h = _finite_heads(bs)
    if h is None or not math.isfinite(h.max_logit):
        return None
    limit = t.max_logit_threshold
    return Measurement(
        h.max_logit, limit, *_above(h.max_logit, limit, t), "max attention logit",
        f"the max attention logit{_worst_head(h.head_max_logit, max)} is {_fmt(h.max_logit)} "
        f"> max_logit_threshold={limit:g} (scaled, before the softmax): the query and key "
        "weights are growing and the softmax turns one-hot",
    )


def _nonfinite(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    bad = [f"mask {n!r} ({m.nonfinite} values)" for n, m in bs.masks.items() if m.nonfinite]
    if bs.router is not None and bs.router.nonfinite:
        bad.append(f"router weights ({bs.router.nonfinite} values)")
    if bs.heads is not None and bs.heads.nonfinite:
        bad.append(f"attention logits of {bs.heads.nonfinite} heads")
    bad += [f"parameter {n!r} = {v}" for n, v in bs.params.items() if not math.isfinite(v)]
    bad += [f"the gradient of parameter {n!r} (norm {v})" for n, v in bs.grad_norms.items()
            if not math.isfinite(v)]
    return Measurement(
        float(len(bad)), 0.0, bool(bad), not bad, "quantities", "NaN or Inf in " + ", ".join(bad)
    )


def _recovery_band(t: HealthThresholds, margin: float, bound: float) -> float:
    """How far inside a drift limit a parameter must be to count as clear of it."""
    if not math.isfinite(bound):
        return 0.0
    return t.recovery_margin * (margin if margin > 0 else abs(bound))


def _drift(bs: BlockStats, t: HealthThresholds, step: int) -> Measurement | None:
    found = []  # (name, value, violated or nearest limit, bad, clear, words, hint)
    for name, v in bs.params.items():
        spec = bs.param_specs.get(name)
        if spec is None or name not in bs.trainable or not math.isfinite(v):
            continue
        margin = t.resolve(spec.margin) or 0.0
        low, high = t.resolve(spec.low), t.resolve(spec.high)
        lo = -math.inf if low is None else low - margin
        hi = math.inf if high is None else high + margin
        bad = not lo <= v <= hi
        clear = lo + _recovery_band(t, margin, lo) <= v <= hi - _recovery_band(t, margin, hi)
        if margin:
            where = (f"[{low:g}, {high:g}]" if low is not None and high is not None
                     else f">= {low:g}" if low is not None else f"<= {high:g}")
            words = f"outside {where} (by more than {spec.margin}={margin:g})"
        else:
            words = (f"< {spec.low}={lo:g}" if v < lo else f"> {spec.high}={hi:g}")
        found.append((name, v, lo if v < lo else hi, bad, clear, words, spec.hint))
    if not found:
        return None
    bad = [f for f in found if f[3]]
    name, v, limit, *_ = (bad or [f for f in found if not f[4]] or found)[0]
    words = ", ".join(f"{n} = {_fmt(x)} {text}" for n, x, _, _, _, text, _ in bad)
    hints = "; ".join(dict.fromkeys(h for *_, h in bad if h))
    return Measurement(
        v, limit, bool(bad), all(f[4] for f in found), name,
        f"learnable {words}: the parameter left the range its block declares for it"
        + (f" ({hints})" if hints else ""),
    )


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
        rule: the measurement on one block at one step (``None``: does not apply).
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
    rule: Callable[[BlockStats, HealthThresholds, int], Measurement | None]
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


def _visible(bs: BlockStats, sections: frozenset[str]) -> BlockStats:
    # What a consumer logging only some sections sees of the block.
    return dataclasses.replace(
        bs,
        masks=bs.masks if "mask" in sections else {},
        router=bs.router if "router" in sections else None,
        params=bs.params if "param" in sections else {},
        grad_norms=bs.grad_norms if "param" in sections else {},
        heads=bs.heads if "heads" in sections else None,
    )


def measure(
    stats: GlobalStats,
    thresholds: HealthThresholds,
    kinds: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
) -> dict[tuple[str, str], Measurement]:
    """``(block, kind) -> Measurement`` for every kind that applies to every block."""
    kinds = tuple(PROBLEM_KINDS if kinds is None else kinds)
    sections = frozenset(SECTIONS if sections is None else sections)
    out = {}
    for block, bs in stats.blocks.items():
        visible = _visible(bs, sections)
        for name in kinds:
            kind = PROBLEM_KINDS[name]
            if not _reads(kind, sections):
                continue
            m = kind.rule(visible, thresholds, stats.step)
            if m is not None:
                out[(block, name)] = m
    return out


def problems_of(measured: Mapping[tuple[str, str], Measurement], step: int) -> list[Problem]:
    """The bad measurements of one point (:func:`measure`) as :class:`Problem` records."""
    return [
        Problem(block, kind, m.value, m.threshold, step, m.quantity, m.detail,
                PROBLEM_KINDS[kind].hint)
        for (block, kind), m in measured.items() if m.bad
    ]


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
