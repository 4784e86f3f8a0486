"""``lightning-attn report``: the command-line face of :func:`~.writer.write_report`.

    lightning-attn report runs/dsa/version_0 --output report
    lightning-attn report baseline=runs/baseline dsa=runs/dsa coord=runs/coord \\
        --output report --metric val/acc --metric val/loss

Bad input (a LOGDIR that does not exist, no event file, no ``attn/`` tag, an unknown
metric) or a missing optional dependency (matplotlib: the ``report`` extra) ends with one line
on stderr and exit status 1; usage errors with status 2. The arguments are parsed before
anything heavy is imported: ``--help`` and a usage error never import torch or matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..environment import MissingExtraError

__all__ = ["build_parser", "main"]

PROG = "lightning-attn report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Write one self-contained HTML page (and a Markdown copy with PNG figures) from "
            "the TensorBoard event files (or CSVLogger metrics.csv) of one or more runs: per "
            "attention block the router entropy and branch usage, mask mean/std/saturation, "
            "parameters and their gradient norms against the step, the last attention-map "
            "grid, every warning with its remedy and a one-line verdict, judged with the "
            "thresholds the diagnostics callbacks used. Several runs are compared side by "
            "side."
        ),
        epilog=(
            "examples:\n"
            "  lightning-attn report runs/demo/version_0 --output report\n"
            "  lightning-attn report baseline=runs/baseline dsa=runs/dsa coord=runs/coord \\\n"
            "      --output report --metric val/acc --metric val/loss\n\n"
            "Each directory under a LOGDIR that holds event files is a version (as in "
            "TensorBoard); the versions of\none training run (a resume from last.ckpt) are "
            "joined, and the validate / test runs of its checkpoints\nattached to it. Open "
            "OUTPUT/report.html in a browser; paste OUTPUT/report.md (with its PNGs) into a "
            "README or a pull request."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "logdirs", nargs="+", metavar="LOGDIR",
        help="a run's log directory, or NAME=LOGDIR to name it on the page",
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for report.html, report.md and the figures (created)")
    p.add_argument(
        "-m", "--metric", action="append", default=[], metavar="TAG",
        help="scalar to sum up per run (final and best), e.g. val/acc; repeatable; "
        "TAG:min or TAG:max says which way is better (default: min for losses and errors)",
    )
    p.add_argument("--title", default=None, help="page title (default: the run names)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _logdirs(items: Sequence[str]) -> dict[str, str] | list[str]:
    from .reading import ReportError

    named: dict[str, str] = {}
    plain: list[str] = []
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name and path and not Path(item).exists():
            if name in named:
                raise ReportError(f"run name {name!r} is given twice")
            named[name] = path
        else:
            plain.append(item)
    if named and plain:
        raise ReportError(
            "name every LOGDIR (NAME=LOGDIR) or none of them; unnamed: " + ", ".join(plain)
        )
    return named or plain


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 bad input, 2 usage)."""
    args = build_parser().parse_args(argv)
    from .reading import ReportError  # after parsing: --help stays fast

    try:
        from .writer import write_report

        files = write_report(
            _logdirs(args.logdirs), args.output, metrics=args.metric, title=args.title,
            progress=not args.no_progress,
        )
    except (ReportError, MissingExtraError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    for note in files.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    for run in files.report.runs:
        if not run.has_attention:
            print(f"{PROG}: note: {run.name}: {run.absence}", file=sys.stderr)
    problems = sum(
        v.status == "problem" for run in files.report.runs for v in run.health.verdicts.values()
    )
    blocks = sum(len(run.health.verdicts) for run in files.report.runs)
    print(
        f"report of {len(files.report.runs)} run(s), {blocks} block(s), {problems} with a "
        f"problem at the last step: {files.html}"
    )
    print(f"markdown with {len(files.figures)} figure(s): {files.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
