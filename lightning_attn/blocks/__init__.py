"""Attention blocks: pure ``torch.nn`` modules, no Lightning import.

- :class:`DynamicSpatialAttention`, :class:`CoordinateAttention` (alias ``CoordinateAtt``),
  built directly or by name with :func:`create_attention` (names: the immutable
  :data:`BUILTIN_FACTORIES`, ``factories=`` for one call, or :func:`register_attention`).
- :mod:`.aux_loss`: the auxiliary router losses (importance, load balance, entropy bonus,
  z-loss) and :func:`attention_aux_loss`, which adds them to any module's loss.
- :mod:`.recording`: how a block measures itself inside its forward (the protocol the
  diagnostics read); what it measures is declared once in :mod:`lightning_attn.core`.
- :mod:`.adapters`: the attention already in users' models (timm, torchvision, their own)
  records through hooks, without a change to its code; :mod:`.heads`: transformer attention
  measures its heads (timm, ``nn.MultiheadAttention``, Hugging Face, a user's own with
  :class:`HeadRecordingMixin`); :mod:`.discovery` finds every attention module of a model;
  :mod:`.census` says, for every attention-like class, whether it is diagnosed or why not;
  :mod:`.projections`: where a module keeps each head's query and key weights (QK-clip).
- :mod:`.kernels`: the ``backend`` implementations (torch fused path, Triton).

What the blocks measure (``RecordingConfig``, the statistics) and the warning categories are
:mod:`lightning_attn.core`'s: each public name has one home.
"""

from .adapters import (
    BUILTIN_ADAPTERS,
    AttentionAdapter,
    attention_adapter,
    register_attention_adapter,
)
from .aux_loss import (
    AUX_TERMS,
    AuxLossWeights,
    RouterAuxMixin,
    attention_aux_loss,
    attention_aux_terms,
    find_router_blocks,
    router_aux_terms,
)
from .coordinate import CoordinateAtt, CoordinateAttention, HSwish
from .discovery import find_attention_blocks
from .dynamic_spatial import DynamicSpatialAttention
from .heads import HEAD_ADAPTERS, HeadRecordingMixin
from .mask_check import quick_mask_check
from .projections import QueryKeyProjections, query_key_projections
from .recording import AttentionBlock, RecordingMixin, spatial_map
from .registry import (
    BUILTIN_FACTORIES,
    FactoryRegistration,
    IdentityAttention,
    attention_names,
    create_attention,
    register_attention,
)

__all__ = [
    "AUX_TERMS",
    "BUILTIN_ADAPTERS",
    "BUILTIN_FACTORIES",
    "HEAD_ADAPTERS",
    "AttentionAdapter",
    "AttentionBlock",
    "AuxLossWeights",
    "CoordinateAtt",
    "CoordinateAttention",
    "DynamicSpatialAttention",
    "FactoryRegistration",
    "HSwish",
    "HeadRecordingMixin",
    "IdentityAttention",
    "QueryKeyProjections",
    "RecordingMixin",
    "RouterAuxMixin",
    "attention_adapter",
    "attention_aux_loss",
    "attention_aux_terms",
    "attention_names",
    "create_attention",
    "find_attention_blocks",
    "find_router_blocks",
    "quick_mask_check",
    "query_key_projections",
    "register_attention",
    "register_attention_adapter",
    "router_aux_terms",
    "spatial_map",
]
