"""Health rules: which reduced statistics are problems, and how each is reported once.

:func:`find_problems` is pure: it reads a :class:`~.statistics.GlobalStats` (identical on every
process after the reduction) and returns the problems of that step. :class:`ProblemReporter`
turns each ``(block, kind)`` into at most one warning (rank zero) or one
:class:`~.warnings.AttentionProblemError` (raised on every process at the same step).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lightning.pytorch.utilities import rank_zero_warn

from ..blocks.statistics import GlobalStats, MaskStats, RouterStats
from ..blocks.validation import check_choice, check_fraction, check_int, check_positive_float
from ..blocks.warnings import (
    AttentionProblemError,
    DeadBranchWarning,
    MaskCollapseWarning,
    MaskSaturationWarning,
    NonFiniteWarning,
    ParameterDriftWarning,
    RouterCollapseWarning,
    RouterIndifferenceWarning,
)

__all__ = [
    "ON_PROBLEM",
    "PROBLEM_KINDS",
    "HealthThresholds",
    "Problem",
    "ProblemKind",
    "ProblemReporter",
    "find_problems",
]


@dataclass(frozen=True)
class ProblemKind:
    """A kind of problem: its warning category, the statistics it reads, a short title."""

    name: str
    category: type[Warning]
    sections: frozenset[str]
    title: str


PROBLEM_KINDS: dict[str, ProblemKind] = {
    k.name: k
    for k in (
        ProblemKind("mask_collapse", MaskCollapseWarning, frozenset({"mask"}), "collapse"),
        ProblemKind("mask_saturation", MaskSaturationWarning, frozenset({"mask"}), "saturation"),
        ProblemKind("router_collapse", RouterCollapseWarning, frozenset({"router"}), "r.collapse"),
        ProblemKind(
            "router_indifference", RouterIndifferenceWarning, frozenset({"router"}), "indifference"
        ),
        ProblemKind("dead_branch", DeadBranchWarning, frozenset({"router"}), "dead branch"),
        ProblemKind(
            "nonfinite", NonFiniteWarning, frozenset({"mask", "router", "param"}), "non-finite"
        ),
        ProblemKind("parameter_drift", ParameterDriftWarning, frozenset({"param"}), "drift"),
    )
}

#: What a callback does with a problem: warn once, raise, stop training, or nothing.
ON_PROBLEM: tuple[str, ...] = ("warn", "raise", "stop", "ignore")

#: Learnable parameters with a meaningful range of [0, 1] (blends of attention and identity).
UNIT_INTERVAL_PARAMETERS: tuple[str, ...] = ("alpha", "alpha_h", "alpha_w", "beta")


@dataclass(frozen=True)
class HealthThresholds:
    """Every threshold of the health rules (each a constructor argument of the callbacks).

    Args:
        std_threshold: a mask whose std is below this has collapsed.
        saturation_low, saturation_high: a mask value below / above these is saturated.
        saturation_threshold: warn when the saturated share exceeds this.
        router_collapse_threshold: warn when the normalised router entropy is below this.
        router_indifference_threshold: warn when it is above this ...
        indifference_warmup_steps: ... at ``global_step >= indifference_warmup_steps``.
        dead_branch_factor: a branch whose mean weight is below ``dead_branch_factor / K``
            is dead (``0.1`` gives the ``1/(10K)`` rule).
        temperature_min, temperature_max: a learnable temperature outside this range has
            drifted.
        unit_margin: a learnable alpha / alpha_h / alpha_w / beta more than this outside
            ``[0, 1]`` has drifted (the blocks' default ``alpha=1.0`` sits on the edge: a
            first step past it is not yet a drift).
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
    unit_margin: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "std_threshold", "saturation_low", "saturation_high", "saturation_threshold",
            "router_collapse_threshold", "router_indifference_threshold", "dead_branch_factor",
            "unit_margin",
        ):
            object.__setattr__(self, name, check_fraction(name, getattr(self, name)))
        check_int("indifference_warmup_steps", self.indifference_warmup_steps, 0)
        for name in ("temperature_min", "temperature_max"):
            object.__setattr__(self, name, check_positive_float(name, getattr(self, name)))
        if not self.temperature_min < self.temperature_max:
            raise ValueError(
                f"temperature_min must be below temperature_max, got temperature_min="
                f"{self.temperature_min} and temperature_max={self.temperature_max}"
            )
        if not self.saturation_low < self.saturation_high:
            raise ValueError(
                f"saturation_low must be below saturation_high, got saturation_low="
                f"{self.saturation_low} and saturation_high={self.saturation_high}"
            )


@dataclass(frozen=True)
class Problem:
    """One problem of one block at one step, with the message to show."""

    block: str
    kind: str
    value: float
    threshold: float
    step: int
    message: str


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _problem(
    block: str, kind: str, value: float, threshold: float, step: int, text: str, hint: str
) -> Problem:
    message = f"attention block {block!r} at step {step}: {text}. Try: {hint}."
    return Problem(block, kind, value, threshold, step, message)


def find_problems(
    stats: GlobalStats,
    thresholds: HealthThresholds,
    kinds: Iterable[str] | None = None,
    sections: Iterable[str] | None = None,
) -> list[Problem]:
    """The problems of ``stats`` among ``kinds`` (default: all), reading only the statistics
    in ``sections`` (default: ``mask``, ``router``, ``param``).

    At most one problem per block and kind (the worst mask / branch), in block order. Pure:
    the callbacks and the report call it on the same statistics and get the same answer.
    """
    kinds = set(PROBLEM_KINDS if kinds is None else kinds)
    sections = frozenset(("mask", "router", "param") if sections is None else sections)
    out: list[Problem] = []
    for block, bs in stats.blocks.items():
        masks = bs.masks if "mask" in sections else {}
        router = bs.router if "router" in sections else None
        params = bs.params if "param" in sections else {}
        args = (block, stats.step, thresholds)
        if "nonfinite" in kinds:
            out += _nonfinite(*args, masks, router, params)
        finite = {n: m for n, m in masks.items() if not m.nonfinite}
        if finite:
            out += _mask_problems(*args, kinds, finite)
        if router is not None and not router.nonfinite and router.num_branches >= 2:
            out += _router_problems(*args, kinds, router)
        if "parameter_drift" in kinds and params:
            out += _drift(*args, params, bs.trainable)
    return out


def _drift(
    block: str, step: int, t: HealthThresholds, params: dict[str, float], trainable: frozenset
) -> list[Problem]:
    bad = []
    for name, v in params.items():
        if name not in trainable or not math.isfinite(v):
            continue
        m = t.unit_margin
        if name in UNIT_INTERVAL_PARAMETERS and not -m <= v <= 1.0 + m:
            bad.append((
                name, v, f"{name} = {_fmt(v)} outside [0, 1] (by more than unit_margin={m})",
                -m if v < 0 else 1.0 + m,
            ))
        elif name == "temperature" and not t.temperature_min <= v <= t.temperature_max:
            low = v < t.temperature_min
            bad.append((
                name, v,
                f"temperature = {_fmt(v)} "
                + (f"< temperature_min={t.temperature_min}" if low
                   else f"> temperature_max={t.temperature_max}"),
                t.temperature_min if low else t.temperature_max,
            ))
    if not bad:
        return []
    name, value, _, limit = bad[0]
    return [
        _problem(
            block, "parameter_drift", value, limit, step,
            "learnable " + ", ".join(text for *_, text, _ in bad) + ": the parameter left "
            "the range where it blends attention and identity (alpha, beta) or keeps the gate "
            "responsive (temperature)",
            "a lower learning rate or more weight decay for it, fixing it (learnable_alpha="
            "False, learnable_temperature=False), or a bounded parametrisation (e.g. "
            "torch.nn.utils.parametrize with a sigmoid); alpha > 1 or < 0 amplifies or "
            "inverts the mask",
        )
    ]


def _nonfinite(
    block: str,
    step: int,
    t: HealthThresholds,
    masks: dict[str, MaskStats],
    router: RouterStats | None,
    params: dict[str, float],
) -> list[Problem]:
    bad = [f"mask {n!r} ({m.nonfinite} values)" for n, m in masks.items() if m.nonfinite]
    if router is not None and router.nonfinite:
        bad.append(f"router weights ({router.nonfinite} values)")
    bad += [f"parameter {n!r} = {v}" for n, v in params.items() if not math.isfinite(v)]
    if not bad:
        return []
    return [
        _problem(
            block, "nonfinite", float(len(bad)), 0.0, step,
            "NaN or Inf in " + ", ".join(bad),
            "a lower learning rate, gradient clipping (Trainer(gradient_clip_val=1.0)), float32 "
            "instead of 16-bit precision, or a larger `eps` for a learnable temperature; look "
            "for the first step where the inputs of this block blow up",
        )
    ]


def _mask_problems(
    block: str, step: int, t: HealthThresholds, kinds: set[str], masks: dict[str, MaskStats]
) -> list[Problem]:
    out = []
    name, m = min(masks.items(), key=lambda item: item[1].std)
    if "mask_collapse" in kinds and m.std < t.std_threshold:
        out.append(
            _problem(
                block, "mask_collapse", m.std, t.std_threshold, step,
                f"mask {name!r} std {_fmt(m.std)} < std_threshold={t.std_threshold} "
                f"(mean {_fmt(m.mean)}): the mask is nearly constant and no longer selects",
                "a higher temperature (DSA) or a lower alpha (CoordinateAttention), a lower "
                "learning rate for the attention, and check that the features reaching the "
                "block are not (nearly) constant",
            )
        )
    name, m = max(masks.items(), key=lambda item: item[1].saturated)
    if "mask_saturation" in kinds and m.saturated > t.saturation_threshold:
        out.append(
            _problem(
                block, "mask_saturation", m.saturated, t.saturation_threshold, step,
                f"mask {name!r} has {m.saturated:.1%} of its values saturated "
                f"({m.sat_low:.1%} < {t.saturation_low}, {m.sat_high:.1%} > "
                f"{t.saturation_high}), above saturation_threshold={t.saturation_threshold}: "
                "the gate passes almost no gradient",
                "a higher temperature (DSA: temperature=2.0 or learnable_temperature=True), "
                "gate='hardsigmoid', a lower learning rate, or normalised inputs",
            )
        )
    return out


def _router_problems(
    block: str, step: int, t: HealthThresholds, kinds: set[str], r: RouterStats
) -> list[Problem]:
    out = []
    k_count = r.num_branches
    if "router_collapse" in kinds and r.entropy_norm < t.router_collapse_threshold:
        top = max(range(k_count), key=r.usage.__getitem__)
        out.append(
            _problem(
                block, "router_collapse", r.entropy_norm, t.router_collapse_threshold, step,
                f"normalised router entropy {_fmt(r.entropy_norm)} < "
                f"router_collapse_threshold={t.router_collapse_threshold}: the router sends "
                f"nearly every sample to one branch (branch {top}, mean weight "
                f"{_fmt(r.usage[top])})",
                "a higher temperature, less weight decay on the router, a lower learning rate, "
                "or a single-branch block if one branch is all you need",
            )
        )
    if (
        "router_indifference" in kinds
        and step >= t.indifference_warmup_steps
        and r.entropy_norm > t.router_indifference_threshold
    ):
        out.append(
            _problem(
                block, "router_indifference", r.entropy_norm, t.router_indifference_threshold,
                step,
                f"normalised router entropy {_fmt(r.entropy_norm)} > "
                f"router_indifference_threshold={t.router_indifference_threshold} after "
                f"indifference_warmup_steps={t.indifference_warmup_steps}: the router weighs "
                "all branches (nearly) equally for every input and does not route",
                "a larger router_hidden, a higher learning rate for the router, fewer branches, "
                "or a longer indifference_warmup_steps if the run is still young",
            )
        )
    limit = t.dead_branch_factor / k_count
    k = min(range(k_count), key=r.usage.__getitem__)
    if "dead_branch" in kinds and r.usage[k] < limit:
        out.append(
            _problem(
                block, "dead_branch", r.usage[k], limit, step,
                f"branch {k} has mean router weight {_fmt(r.usage[k])} < "
                f"dead_branch_factor/K={_fmt(limit)}: it is (almost) never used",
                "removing the branch (fewer `kernels` or use_dilated=False), re-initialising "
                "the router, or a higher temperature early in training",
            )
        )
    return out


class ProblemReporter:
    """Reports each ``(block, kind)`` at most once, the same way on every process.

    Args:
        on_problem: ``"warn"`` (rank-zero warning of the kind's category), ``"raise"``
            (:class:`AttentionProblemError` on every process), ``"stop"`` (the warning, and
            :meth:`report` returns ``True`` so the caller stops training on every process at
            the same step) or ``"ignore"``.
    """

    def __init__(self, on_problem: str = "warn") -> None:
        self.on_problem = check_choice("on_problem", on_problem, ON_PROBLEM)
        #: ``"<block>|<kind>"`` -> step of the first report (kept in checkpoints).
        self.reported: dict[str, int] = {}

    @staticmethod
    def key(block: str, kind: str) -> str:
        return f"{block}|{kind}"

    def report(self, problems: Iterable[Problem]) -> list[Problem]:
        """Warn about / raise for the problems not reported before; returns those.

        The decision depends on the problems alone (identical on every process after the
        reduction), so every process raises, or stops, at the same step.
        """
        new = []
        for p in problems:
            key = self.key(p.block, p.kind)
            if key in self.reported:
                continue
            self.reported[key] = p.step
            new.append(p)
            if self.on_problem in ("warn", "stop"):
                rank_zero_warn(p.message, category=PROBLEM_KINDS[p.kind].category)
            elif self.on_problem == "raise":
                raise AttentionProblemError(p.message, p.block, p.kind, p.step)
        return new

    def state_dict(self) -> dict[str, int]:
        return dict(self.reported)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.reported = {str(k): int(v) for k, v in state.items()}
