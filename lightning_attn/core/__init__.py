"""The core: what the diagnostics know, with no Lightning import (and, but for
:mod:`.accumulator` and :mod:`.tensor_checks`, no torch: the offline report reads it alone).

Read by the blocks (what to accumulate), the callbacks (what to log and judge) and the
offline report (what the logs mean) alike:

- :mod:`.statistics`: each statistic, declared once — its accumulator slots and how they
  reduce, the reported quantities with their tags, charts and titles.
- :mod:`.accumulator`: the on-device accumulator that lays the slots out (torch).
- :mod:`.point`: one point's statistics of every block as columns (what the rules and the
  scalars read), and where each block's slots sit in the collector's read vector.
- :mod:`.presentation`: the report's panels, the summary table's columns, short block names.
- :mod:`.problems`: each problem kind, declared once — its rule, thresholds, words, remedy
  and chart lines; :class:`HealthThresholds`; verdicts.
- :mod:`.tags`: the tag schema (format and parse).
- :mod:`.categories`: the warning categories; :mod:`.validation` and :mod:`.tensor_checks`:
  the argument checks.

Each public name has one home: the names below are this package's, and no other package
exports them again.
"""

from . import categories as _categories
from .categories import *  # noqa: F403 - every category, listed in categories.__all__
from .presentation import short_names
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
    BlockInfo,
    BlockStats,
    GlobalStats,
    HeadStats,
    MaskStats,
    ParameterSpec,
    RecordingConfig,
    RouterStats,
    StatisticsLayout,
    block_stats,
)
from .tags import ScalarTag, scalar_metrics

__all__ = [
    "HISTOGRAM_BINS",
    "PHASES",
    "PROBLEM_KINDS",
    "SECTIONS",
    "VERDICT_WORDS",
    "BlockInfo",
    "BlockStats",
    "GlobalStats",
    "HeadStats",
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
    "short_names",
    "verdict",
    *_categories.__all__,
]
