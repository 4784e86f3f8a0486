"""Attention blocks: pure ``torch.nn`` modules, no Lightning import.

- :class:`DynamicSpatialAttention`, :class:`CoordinateAttention` (alias ``CoordinateAtt``),
  built directly or by name with :func:`create_attention`.
- :mod:`.aux_loss`: the auxiliary router losses (importance, load balance, entropy bonus,
  z-loss) and :func:`attention_aux_loss`, which adds them to any module's loss.
- :mod:`.recording`: how a block measures itself inside its forward (the protocol the
  diagnostics read); :mod:`.statistics`: each statistic, defined once.
- :mod:`.kernels`: the ``backend`` implementations (torch fused path, Triton).
- :mod:`.validation`, :mod:`.warnings`: the package's argument checks and warning categories.
"""

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
from .dynamic_spatial import DynamicSpatialAttention
from .mask_check import quick_mask_check
from .recording import (
    AttentionBlock,
    RecordingConfig,
    RecordingMixin,
    find_attention_blocks,
    spatial_map,
)
from .registry import IdentityAttention, attention_names, create_attention, register_attention
from .statistics import BlockStats, GlobalStats, MaskStats, RouterStats, StatisticsLayout
from .warnings import (
    AttentionProblemError,
    AttentionWarning,
    DeadBranchWarning,
    MaskCollapseWarning,
    MaskSaturationWarning,
    MissingStatisticsWarning,
    NonFiniteWarning,
    ParameterDriftWarning,
    RouterCollapseWarning,
    RouterIndifferenceWarning,
)

__all__ = [
    "AUX_TERMS",
    "AttentionBlock",
    "AttentionProblemError",
    "AttentionWarning",
    "AuxLossWeights",
    "BlockStats",
    "CoordinateAtt",
    "CoordinateAttention",
    "DeadBranchWarning",
    "DynamicSpatialAttention",
    "GlobalStats",
    "HSwish",
    "IdentityAttention",
    "MaskCollapseWarning",
    "MaskSaturationWarning",
    "MaskStats",
    "MissingStatisticsWarning",
    "NonFiniteWarning",
    "ParameterDriftWarning",
    "RecordingConfig",
    "RecordingMixin",
    "RouterAuxMixin",
    "RouterCollapseWarning",
    "RouterIndifferenceWarning",
    "RouterStats",
    "StatisticsLayout",
    "attention_aux_loss",
    "attention_aux_terms",
    "attention_names",
    "create_attention",
    "find_attention_blocks",
    "find_router_blocks",
    "quick_mask_check",
    "register_attention",
    "router_aux_terms",
    "spatial_map",
]
