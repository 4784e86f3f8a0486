"""lightning-attn: attention blocks for CNNs and Lightning callbacks that diagnose them.

Blocks (``lightning_attn.blocks``, pure torch): :class:`DynamicSpatialAttention` and
:class:`CoordinateAttention` (alias ``CoordinateAtt``), built directly or by name with
:func:`create_attention` (``"dsa"``, ``"coord"``, ``"none"``).

The observation point
---------------------
Diagnostics must see what a block computed (its masks, its router weights, its current
temperature / alpha / alpha_h / alpha_w / beta) without changing what it returns and
without costing anything when nobody looks. Each block therefore keeps a table of
*observers*::

    handle = block.attach_observer(fn)   # fn(block, AttentionObservation) after each forward
    ...
    handle.remove()                      # detach; attach/detach as often as you like

``AttentionObservation`` carries ``masks`` (``{"mask": (B,1,H,W)}`` for DSA,
``{"mask_h": a_h (B,C,H,1), "mask_w": a_w (B,C,1,W)}`` for CoordinateAttention),
``router_weights`` (``(B,K)`` or ``None``) and ``parameters`` (name -> 0-d tensor). All
tensors are detached views of what the forward computed anyway: no copy, no graph, no
host-device sync. With no observer attached the forward only tests whether the table is
empty. Observers are not pickled or deep-copied with the model.

Blocks also answer ``attention_parameters()`` (current scalars, detached) and
``trainable_attention_parameters()`` (the ``nn.Parameter`` behind each learnable scalar, for
gradient norms). Any module implementing these three methods
(:class:`~lightning_attn.blocks.ObservableAttention`) is found and observed by the callbacks;
:class:`~lightning_attn.blocks.ObservableMixin` implements the bookkeeping.
"""

from .blocks import (
    AttentionObservation,
    AttentionWarning,
    CoordinateAtt,
    CoordinateAttention,
    DynamicSpatialAttention,
    IdentityAttention,
    MaskCollapseWarning,
    ObservableAttention,
    ObservableMixin,
    attention_names,
    create_attention,
    quick_mask_check,
    register_attention,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionObservation",
    "AttentionWarning",
    "CoordinateAtt",
    "CoordinateAttention",
    "DynamicSpatialAttention",
    "IdentityAttention",
    "MaskCollapseWarning",
    "ObservableAttention",
    "ObservableMixin",
    "attention_names",
    "create_attention",
    "quick_mask_check",
    "register_attention",
]
