"""The core: what the diagnostics know, with no Lightning import.

Read by the blocks (what to accumulate), the callbacks (what to log and judge) and the
offline report (what the logs mean) alike:

- :mod:`.statistics`: each statistic, declared once — its accumulator slots and how they
  reduce, the reported quantities with their tags, charts and titles, the summary table.
- :mod:`.problems`: each problem kind, declared once — its rule, thresholds, words, remedy
  and chart lines; :class:`HealthThresholds`; verdicts.
- :mod:`.tags`: the tag schema (format and parse).
- :mod:`.warnings`: the warning categories; :mod:`.validation`: the argument checks.
"""

from . import warnings as _warnings
from .problems import (
    PROBLEM_KINDS,
    VERDICT_WORDS,
    HealthThresholds,
    Measurement,
    Problem,
    ProblemKind,
    Verdict,
    find_problems,
    measure,
    verdict,
)
from .statistics import (
    HISTOGRAM_BINS,
    PHASES,
    SECTIONS,
    Accumulator,
    BlockInfo,
    BlockStats,
    GlobalStats,
    MaskStats,
    ParameterSpec,
    RecordingConfig,
    RouterStats,
    StatisticsLayout,
    block_stats,
)
from .tags import ScalarTag, scalar_metrics
from .warnings import *  # noqa: F403 - every category, listed in warnings.__all__

__all__ = [
    "HISTOGRAM_BINS",
    "PHASES",
    "PROBLEM_KINDS",
    "SECTIONS",
    "VERDICT_WORDS",
    "Accumulator",
    "BlockInfo",
    "BlockStats",
    "GlobalStats",
    "HealthThresholds",
    "MaskStats",
    "Measurement",
    "ParameterSpec",
    "Problem",
    "ProblemKind",
    "RecordingConfig",
    "RouterStats",
    "ScalarTag",
    "StatisticsLayout",
    "Verdict",
    "block_stats",
    "find_problems",
    "measure",
    "scalar_metrics",
    "verdict",
    *_warnings.__all__,
]
