"""Offline report: event files (or ``metrics.csv``) of one or more runs -> one HTML page.

``lightning-attn report LOGDIR [LOGDIR ...] --output DIR`` or, from Python::

    from lightning_attn.report import write_report
    files = write_report({"baseline": "runs/baseline", "DSA": "runs/dsa"}, "report",
                         metrics=["val/acc"])

=====================  =========================================================================
module                 what it does
=====================  =========================================================================
:mod:`.reading`        find runs, read event files (streaming, by records) or CSV; replay
:mod:`.records`        event-file records: framing, CRC32C by chunks, records too big to hold
:mod:`.curves`         a series in bounded memory: every point, or an envelope (M4 buckets)
:mod:`.experiments`    versions of one training run joined, evaluations attached
:mod:`.series`         group the ``attn/`` tags by stage and block; ``attn/config``/``problems``
:mod:`.statistics`     logged scalars -> ``GlobalStats`` (the one adapter)
:mod:`.verdicts`       thresholds, warnings and verdicts by the core's rules, every point
:mod:`.figures`        matplotlib figures (PNG)
:mod:`.images`         a logged image at the size shown (large PNGs decoded in strips)
:mod:`.document`       the report's content; :mod:`.page` lays it out as HTML and Markdown
:mod:`.writer`         :func:`write_report`
:mod:`.command`        the ``lightning-attn report`` command
=====================  =========================================================================
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module defining it. Imported on first use: ``lightning-attn report
#: --help`` and ``from lightning_attn.report.command import ...`` import none of them.
_EXPORTS = {
    **dict.fromkeys(("MetricSpec", "Report", "ReportTable", "RunReport", "build_report"),
                    ".document"),
    "group_experiments": ".experiments",
    **dict.fromkeys(("ReportError", "RunLog", "find_runs", "read_runs"), ".reading"),
    **dict.fromkeys(("RunTags", "parse_tags"), ".series"),
    "stats_from_scalars": ".statistics",
    **dict.fromkeys(("RunHealth", "judge_run", "thresholds_from_config"), ".verdicts"),
    **dict.fromkeys(("ReportFiles", "load_runs", "write_report"), ".writer"),
}

__all__ = [
    "MetricSpec",
    "Report",
    "ReportError",
    "ReportFiles",
    "ReportTable",
    "RunHealth",
    "RunLog",
    "RunReport",
    "RunTags",
    "build_report",
    "find_runs",
    "group_experiments",
    "judge_run",
    "load_runs",
    "parse_tags",
    "read_runs",
    "stats_from_scalars",
    "thresholds_from_config",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
