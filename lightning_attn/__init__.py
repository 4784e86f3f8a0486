"""lightning-attn: attention blocks for CNNs and Lightning callbacks that diagnose them.

Blocks (``lightning_attn.blocks``, pure torch): :class:`DynamicSpatialAttention` and
:class:`CoordinateAttention` (alias ``CoordinateAtt``), built directly or by name with
:func:`create_attention` (``"dsa"``, ``"coord"``, ``"none"``).

Recording
---------
Each block measures itself inside its own forward, with tensor operations only, so that the
diagnostics see through ``torch.compile`` and cost nothing on steps that do not log: while
``block.recording`` is on, ``forward`` adds its masks' sums, counts, extrema and histogram
counts (and the router's entropy and branch usage) to an accumulator on the device; the
callbacks (``lightning_attn.callbacks``) switch it on for logging steps, read it once, reduce
it across processes and reset it. A block of your own joins by inheriting
:class:`RecordingMixin` and calling ``self.record(masks=..., router_weights=...)`` at the end
of its forward (see :mod:`lightning_attn.blocks.recording`); a module you cannot edit joins
through an adapter (:func:`register_attention_adapter`). What is measured and judged is
declared once in :mod:`lightning_attn.core`.
"""

from .blocks import (
    AttentionBlock,
    AttentionWarning,
    AuxLossWeights,
    CoordinateAtt,
    CoordinateAttention,
    DynamicSpatialAttention,
    IdentityAttention,
    MaskCollapseWarning,
    RecordingConfig,
    RecordingMixin,
    attention_aux_loss,
    attention_names,
    create_attention,
    quick_mask_check,
    register_attention,
    register_attention_adapter,
)
from .core import HealthThresholds

__version__ = "0.1.0"

__all__ = [
    "AttentionBlock",
    "AttentionWarning",
    "AuxLossWeights",
    "CoordinateAtt",
    "CoordinateAttention",
    "DynamicSpatialAttention",
    "HealthThresholds",
    "IdentityAttention",
    "MaskCollapseWarning",
    "RecordingConfig",
    "RecordingMixin",
    "TemperatureSchedule",
    "attention_aux_loss",
    "attention_names",
    "create_attention",
    "quick_mask_check",
    "register_attention",
    "register_attention_adapter",
]


def __getattr__(name: str):
    # The callback needs Lightning; `import lightning_attn` alone stays pure torch.
    if name == "TemperatureSchedule":
        from .callbacks import TemperatureSchedule

        return TemperatureSchedule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
