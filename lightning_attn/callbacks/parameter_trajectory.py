"""ParameterTrajectoryMonitor: temperature, alpha and beta of every block over training."""

from __future__ import annotations

from collections.abc import Sequence

from .base import AttentionStatsCallback

__all__ = ["ParameterTrajectoryMonitor"]


class ParameterTrajectoryMonitor(AttentionStatsCallback):
    """Logs each block's scalar parameters and, when learnable, their gradient norms.

    ``attn/<block>/param/<name>`` for every name the block reports (``temperature`` for
    DSA; ``alpha`` or ``alpha_h``/``alpha_w``, and ``beta`` for CoordinateAttention), fixed
    or learnable, read after the optimizer step; ``attn/<block>/param/<name>_grad_norm`` for
    the learnable ones: the norm of the gradient of the ``nn.Parameter`` behind it (``t_raw``
    for a learnable temperature), read in ``on_before_optimizer_step`` (after unscaling and
    the DDP all-reduce). Warns when a parameter becomes NaN or Inf.

    Args:
        include, exclude: fnmatch patterns of block names to watch / leave out.
        log_every_n_steps: ``None`` follows the Trainer; ``0`` never.
        on_problem: ``"warn"``, ``"raise"`` or ``"ignore"``.
    """

    _sections = frozenset({"param"})
    _kinds = ("nonfinite",)

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        on_problem: str = "warn",
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            log_every_n_steps=log_every_n_steps,
            on_problem=on_problem,
        )
