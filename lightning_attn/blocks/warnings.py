"""Warning categories of lightning-attn, for filtering with ``warnings.filterwarnings``."""

from __future__ import annotations

__all__ = ["AttentionWarning", "MaskCollapseWarning"]


class AttentionWarning(UserWarning):
    """Base category of every warning lightning-attn emits about attention health."""


class MaskCollapseWarning(AttentionWarning):
    """A mask's spread fell below its threshold: the mask is (nearly) constant."""
