"""Attention blocks: pure ``torch.nn`` modules, no Lightning import.

See :mod:`lightning_attn.blocks.observation` for how diagnostics observe them.
"""

from .coordinate import CoordinateAtt, CoordinateAttention, HSwish
from .dynamic_spatial import DynamicSpatialAttention
from .mask_check import mask_stats, quick_mask_check
from .observation import (
    MASK_NAMES,
    AttentionObservation,
    ObservableAttention,
    ObservableMixin,
    Observer,
)
from .registry import IdentityAttention, attention_names, create_attention, register_attention
from .warnings import AttentionWarning, MaskCollapseWarning

__all__ = [
    "MASK_NAMES",
    "AttentionObservation",
    "AttentionWarning",
    "CoordinateAtt",
    "CoordinateAttention",
    "DynamicSpatialAttention",
    "HSwish",
    "IdentityAttention",
    "MaskCollapseWarning",
    "ObservableAttention",
    "ObservableMixin",
    "Observer",
    "attention_names",
    "create_attention",
    "mask_stats",
    "quick_mask_check",
    "register_attention",
]
