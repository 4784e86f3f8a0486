"""Lightning callbacks that diagnose attention blocks through their observation point.

========================================  ==================================================
callback                                  what it does
========================================  ==================================================
:class:`RouterEntropyMonitor`             router entropy (and normalised), branch usage
:class:`MaskHealthMonitor`                mask mean, std, saturation; collapse/saturation
:class:`ParameterTrajectoryMonitor`       temperature / alpha / beta and gradient norms
:class:`AttentionMapLogger`               mask overlays on fixed validation images
:class:`AttentionSummary`                 ``rich`` table at the end of each training epoch
:class:`AttentionDiagnostics`             all of the above, one pass per block
========================================  ==================================================

Blocks are found by :func:`find_attention_blocks`; statistics are gathered only on logging
steps (:class:`LoggingSchedule`), exactly over the global batch under DDP
(:class:`StatisticsCollector`), and problems are reported once per block and kind
(:mod:`.health`, :mod:`.warnings`). Tags are listed in :mod:`.tags`.
"""

from .attention_map import AttentionMapLogger
from .base import AttentionStatsCallback
from .collector import StatisticsCollector
from .diagnostics import AttentionDiagnostics
from .discovery import BlockLayout, describe_block, find_attention_blocks
from .health import PROBLEM_KINDS, HealthThresholds, Problem, find_problems
from .mask_health import MaskHealthMonitor
from .parameter_trajectory import ParameterTrajectoryMonitor
from .router_entropy import RouterEntropyMonitor
from .schedule import LoggingSchedule
from .statistics import (
    BlockStats,
    GlobalStats,
    MaskStats,
    RouterStats,
    mask_stats_from_sums,
    mask_sums,
    router_entropy,
    router_stats_from_sums,
    router_sums,
)
from .summary import AttentionSummary, render_summary
from .warnings import (
    AttentionProblemError,
    AttentionWarning,
    DeadBranchWarning,
    MaskCollapseWarning,
    MaskSaturationWarning,
    NonFiniteWarning,
    RouterCollapseWarning,
    RouterIndifferenceWarning,
)

__all__ = [
    "PROBLEM_KINDS",
    "AttentionDiagnostics",
    "AttentionMapLogger",
    "AttentionProblemError",
    "AttentionStatsCallback",
    "AttentionSummary",
    "AttentionWarning",
    "BlockLayout",
    "BlockStats",
    "DeadBranchWarning",
    "GlobalStats",
    "HealthThresholds",
    "LoggingSchedule",
    "MaskCollapseWarning",
    "MaskHealthMonitor",
    "MaskSaturationWarning",
    "MaskStats",
    "NonFiniteWarning",
    "ParameterTrajectoryMonitor",
    "Problem",
    "RouterCollapseWarning",
    "RouterEntropyMonitor",
    "RouterIndifferenceWarning",
    "RouterStats",
    "StatisticsCollector",
    "describe_block",
    "find_attention_blocks",
    "find_problems",
    "mask_stats_from_sums",
    "mask_sums",
    "render_summary",
    "router_entropy",
    "router_stats_from_sums",
    "router_sums",
]
