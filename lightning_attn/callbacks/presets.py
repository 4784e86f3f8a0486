"""Single-purpose callbacks: :class:`AttentionDiagnostics` with some parts switched off.

Each takes :class:`AttentionDiagnostics`' keyword arguments (thresholds, intervals,
include/exclude, ...) and fixes what it is for. Several may share a Trainer: they record the
same forwards once and each reads what it needs.
"""

from __future__ import annotations

from typing import Any

from .diagnostics import AttentionDiagnostics

__all__ = [
    "AttentionMapLogger",
    "AttentionSummary",
    "MaskHealthMonitor",
    "ParameterTrajectoryMonitor",
    "RouterEntropyMonitor",
]


def _preset(fixed: dict[str, Any], defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict:
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise TypeError(f"this preset fixes {clash}; use AttentionDiagnostics to choose them")
    return {**defaults, **kwargs, **fixed}


class RouterEntropyMonitor(AttentionDiagnostics):
    """Router entropy (and normalised), usage of each branch; router collapse, indifference
    and dead-branch warnings. ``AttentionDiagnostics(sections=["router"], num_images=0,
    summary=False)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_preset({"sections": ("router",)},
                                   {"num_images": 0, "summary": False}, kwargs))


class MaskHealthMonitor(AttentionDiagnostics):
    """Mean, std, min, max and saturation of every mask; collapse and saturation warnings.
    ``AttentionDiagnostics(sections=["mask"], num_images=0, summary=False)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_preset({"sections": ("mask",)},
                                   {"num_images": 0, "summary": False}, kwargs))


class ParameterTrajectoryMonitor(AttentionDiagnostics):
    """Temperature / alpha / alpha_h / alpha_w / beta and their gradient norms; drift and
    non-finite warnings. ``AttentionDiagnostics(sections=["param"], num_images=0,
    summary=False)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_preset({"sections": ("param",)},
                                   {"num_images": 0, "summary": False}, kwargs))


class AttentionMapLogger(AttentionDiagnostics):
    """Attention maps over the first validation / test batch's images, every epoch
    (TensorBoard ``val/attn/maps``). ``AttentionDiagnostics(sections=[], summary=False)``."""

    def __init__(self, num_images: int = 8, **kwargs: Any) -> None:
        super().__init__(**_preset({"sections": (), "num_images": num_images},
                                   {"summary": False, "eval_statistics": False}, kwargs))


class AttentionSummary(AttentionDiagnostics):
    """The ``rich`` table at the end of each training epoch, nothing logged, problems shown in
    the table only. ``AttentionDiagnostics(log_statistics=False, on_problem="ignore",
    num_images=0)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_preset(
            {"log_statistics": False, "summary": True},
            {"on_problem": "ignore", "num_images": 0, "eval_statistics": False}, kwargs,
        ))
