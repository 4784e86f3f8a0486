"""Lightning callbacks that diagnose attention blocks from the blocks' own recording.

========================================  ==================================================
callback                                  what it does
========================================  ==================================================
:class:`AttentionDiagnostics`             everything below, configured by ``sections``
:class:`RouterEntropyMonitor`             router entropy (and normalised), branch usage
:class:`MaskHealthMonitor`                mask mean, std, min, max, saturation
:class:`ParameterTrajectoryMonitor`       temperature / alpha / beta and gradient norms
:class:`AttentionMapLogger`               mask overlays on the first validation images
:class:`AttentionSummary`                 ``rich`` table at the end of each training epoch
:class:`TemperatureSchedule`              anneals the blocks' temperature (a remedy)
========================================  ==================================================

The path of a statistic: block forward -> the block's on-device accumulator
(:mod:`lightning_attn.blocks.recording`) -> one collective (:mod:`.collector`) -> statistics
(:mod:`lightning_attn.blocks.statistics`) -> problems (:mod:`.health`) and the writer seam
(:mod:`.writers`) -> loggers, the table (:mod:`.summary`), the report. Tags: :mod:`.tags`.
"""

from ..blocks.statistics import BlockStats, GlobalStats, MaskStats, RouterStats
from ..blocks.warnings import (
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
from .collector import StatisticsCollector
from .diagnostics import SECTIONS, AttentionDiagnostics
from .health import ON_PROBLEM, PROBLEM_KINDS, HealthThresholds, Problem, find_problems
from .presets import (
    AttentionMapLogger,
    AttentionSummary,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    RouterEntropyMonitor,
)
from .schedule import LoggingSchedule
from .summary import render_summary
from .temperature import TemperatureSchedule
from .writers import DiagnosticsOutput, DiagnosticsWriter, TensorBoardWriter, register_writer

__all__ = [
    "ON_PROBLEM",
    "PROBLEM_KINDS",
    "SECTIONS",
    "AttentionDiagnostics",
    "AttentionMapLogger",
    "AttentionProblemError",
    "AttentionSummary",
    "AttentionWarning",
    "BlockStats",
    "DeadBranchWarning",
    "DiagnosticsOutput",
    "DiagnosticsWriter",
    "GlobalStats",
    "HealthThresholds",
    "LoggingSchedule",
    "MaskCollapseWarning",
    "MaskHealthMonitor",
    "MaskSaturationWarning",
    "MaskStats",
    "MissingStatisticsWarning",
    "NonFiniteWarning",
    "ParameterDriftWarning",
    "ParameterTrajectoryMonitor",
    "Problem",
    "RouterCollapseWarning",
    "RouterEntropyMonitor",
    "RouterIndifferenceWarning",
    "RouterStats",
    "StatisticsCollector",
    "TemperatureSchedule",
    "TensorBoardWriter",
    "find_problems",
    "register_writer",
    "render_summary",
]
