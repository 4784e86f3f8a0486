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
(:mod:`lightning_attn.blocks.recording`) -> one collective (:mod:`.collector`) -> statistics,
problems and tags as declared in :mod:`lightning_attn.core` -> the writer seam
(:mod:`.writers`) -> loggers, the table (:mod:`.summary`), the report.
"""

from ..core import warnings as _warnings
from ..core.problems import PROBLEM_KINDS, HealthThresholds, Problem, find_problems
from ..core.statistics import SECTIONS, BlockStats, GlobalStats, MaskStats, RouterStats
from ..core.warnings import *  # noqa: F403 - every category, listed in warnings.__all__
from .collector import StatisticsCollector
from .diagnostics import AttentionDiagnostics
from .health import ON_PROBLEM, ProblemReporter
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
    "AttentionSummary",
    "BlockStats",
    "DiagnosticsOutput",
    "DiagnosticsWriter",
    "GlobalStats",
    "HealthThresholds",
    "LoggingSchedule",
    "MaskHealthMonitor",
    "MaskStats",
    "ParameterTrajectoryMonitor",
    "Problem",
    "ProblemReporter",
    "RouterEntropyMonitor",
    "RouterStats",
    "StatisticsCollector",
    "TemperatureSchedule",
    "TensorBoardWriter",
    "find_problems",
    "register_writer",
    "render_summary",
    *_warnings.__all__,
]
