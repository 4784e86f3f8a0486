"""RouterEntropyMonitor: how a DynamicSpatialAttention's router spreads its weight."""

from __future__ import annotations

from collections.abc import Sequence

from .base import AttentionStatsCallback
from .health import HealthThresholds

__all__ = ["RouterEntropyMonitor"]


class RouterEntropyMonitor(AttentionStatsCallback):
    """Logs, per routed block, the router entropy, its normalised value and branch usage.

    From the router weights ``w (B,K)`` of every training forward of a logging step (all
    micro-batches, all processes): ``attn/<block>/router/entropy`` (mean over samples of
    ``-sum_k w_k log w_k``), ``.../entropy_norm`` (the same divided by ``log K``) and
    ``.../usage_<k>`` (mean of ``w_k``). Warns about router collapse, router indifference
    (after ``indifference_warmup_steps``), dead branches and non-finite router weights.

    Args:
        include, exclude: fnmatch patterns of block names to watch / leave out.
        log_every_n_steps: ``None`` follows the Trainer; ``0`` never.
        histogram_every_n_steps: histogram of the router weights to TensorBoard (0: off).
        router_collapse_threshold: warn when ``entropy_norm`` is below this.
        router_indifference_threshold: warn when ``entropy_norm`` is above this ...
        indifference_warmup_steps: ... once ``global_step`` reaches this.
        dead_branch_factor: a branch with mean weight below ``dead_branch_factor / K`` is dead.
        on_problem: ``"warn"``, ``"raise"`` or ``"ignore"``.

    Example::

        trainer = Trainer(callbacks=[RouterEntropyMonitor(include=["backbone.*"])])
    """

    _sections = frozenset({"router"})
    _kinds = ("router_collapse", "router_indifference", "dead_branch", "nonfinite")

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int = 0,
        router_collapse_threshold: float = 0.1,
        router_indifference_threshold: float = 0.98,
        indifference_warmup_steps: int = 500,
        dead_branch_factor: float = 0.1,
        on_problem: str = "warn",
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            thresholds=HealthThresholds(
                router_collapse_threshold=router_collapse_threshold,
                router_indifference_threshold=router_indifference_threshold,
                indifference_warmup_steps=indifference_warmup_steps,
                dead_branch_factor=dead_branch_factor,
            ),
            on_problem=on_problem,
        )
