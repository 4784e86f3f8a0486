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

from ..core.problems import Verdict
from .document import MetricSpec, Report, ReportTable, RunReport, build_report
from .experiments import group_experiments
from .reading import ReportError, RunLog, find_runs, read_runs
from .series import RunTags, parse_tags
from .statistics import stats_from_scalars
from .verdicts import RunHealth, judge_run, thresholds_from_config
from .writer import ReportFiles, load_runs, write_report

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
    "Verdict",
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
