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
:class:`QKClip`                           rescales a head's query / key weights (a remedy)
========================================  ==================================================

The path of a statistic: block forward -> the block's on-device accumulator
(:mod:`lightning_attn.blocks.recording`) -> one collective (:mod:`.collector`) -> statistics,
problems and tags as declared in :mod:`lightning_attn.core` -> the writer seam
(:mod:`.writers`) -> loggers, the table (:mod:`.summary`), the report.
"""

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
from .qkclip import CLIPPED_HEADS_TAG, QKClip
from .summary import render_summary
from .temperature import TemperatureSchedule
from .writers import (
    DEFAULT_WRITERS,
    DiagnosticsOutput,
    DiagnosticsWriter,
    TensorBoardWriter,
    register_writer,
)

__all__ = [
    "CLIPPED_HEADS_TAG",
    "DEFAULT_WRITERS",
    "ON_PROBLEM",
    "AttentionDiagnostics",
    "AttentionMapLogger",
    "AttentionSummary",
    "DiagnosticsOutput",
    "DiagnosticsWriter",
    "MaskHealthMonitor",
    "ParameterTrajectoryMonitor",
    "ProblemReporter",
    "QKClip",
    "RouterEntropyMonitor",
    "StatisticsCollector",
    "TemperatureSchedule",
    "TensorBoardWriter",
    "register_writer",
    "render_summary",
]
