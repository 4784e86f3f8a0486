"""``lightning-attn``: LightningCLI for :class:`AttentionClassifier` on cluttered digits.

Subcommands ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI) and ``report``
(:mod:`lightning_attn.report`, its own ``--help``). Examples::

    lightning-attn fit --config examples/configs/dsa.yaml
    lightning-attn fit --config examples/configs/dsa.yaml \\
        --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp
    lightning-attn fit --config examples/configs/dsa.yaml \\
        --ckpt_path runs/dsa/version_0/checkpoints/last.ckpt                      # resume
    lightning-attn test --config examples/configs/dsa.yaml --ckpt_path <checkpoint>

Defaults added to LightningCLI's: a ``TensorBoardLogger`` under ``runs/`` (``--trainer.logger``),
a ``RichProgressBar`` (always on), a ``ModelCheckpoint`` (``--checkpoint.*``) keeping the
best ``val/acc``, the latest state as ``last.ckpt`` (resume with ``--ckpt_path``) and one more
checkpoint when a run is interrupted (Ctrl-C or an error) and
``lightning_attn.callbacks.AttentionDiagnostics`` (``--diagnostics.*``).

This module imports nothing heavy: ``report`` is dispatched before Lightning is imported, and
the LightningCLI itself lives in :mod:`lightning_attn._trainer_cli` (``AttentionCLI``,
``build_cli`` and ``trainer_defaults`` are found here too).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from .environment import MissingExtraError, ignore_known_warnings

if TYPE_CHECKING:
    from ._trainer_cli import AttentionCLI, ParameterError, build_cli, trainer_defaults

__all__ = [
    "DESCRIPTION",
    "AttentionCLI",
    "ParameterError",
    "build_cli",
    "main",
    "trainer_defaults",
]

PROG = "lightning-attn"
DESCRIPTION = (
    "lightning-attn: train, validate, test and predict with AttentionClassifier (a CNN with "
    "DynamicSpatialAttention or CoordinateAttention after every stage) on cluttered digits, "
    "with the attention diagnostics on. Start from a config: "
    "lightning-attn fit --config examples/configs/dsa.yaml. Afterwards, one page of curves, "
    "maps, warnings and verdicts: lightning-attn report LOGDIR --output DIR (its own --help). "
    "A refused value ends with one line naming it; LIGHTNING_ATTN_DEBUG=1 shows the traceback"
)
DEBUG_VARIABLE = "LIGHTNING_ATTN_DEBUG"
_LAZY = ("AttentionCLI", "ParameterError", "build_cli", "trainer_defaults")


def __getattr__(name: str) -> Any:
    # The LightningCLI needs Lightning: imported on first use, never by `report`.
    if name in _LAZY:
        from . import _trainer_cli

        return getattr(_trainer_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def debugging() -> bool:
    """Whether ``LIGHTNING_ATTN_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-attn``.

    A value our checks or the Trainer refuse ends with one line,
    ``lightning-attn: error: <key>: <why>``, and exit status 2, as a usage error;
    ``LIGHTNING_ATTN_DEBUG=1`` shows the traceback instead. A run ended by SIGTERM saves what
    Lightning saves (the ``ModelCheckpoint``'s checkpoint on exception) and exits with status
    143 (128 + SIGTERM), so a scheduler sees it was killed.
    """
    argv = sys.argv[1:] if args is None else list(args)
    ignore_known_warnings()
    if argv[:1] == ["report"]:  # offline, not a LightningCLI subcommand: no Lightning
        from .report.command import main as report

        code = report(argv[1:])
        if code:
            raise SystemExit(code)
        return
    from jsonargparse import ArgumentError
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ._trainer_cli import ParameterError, build_cli

    try:
        # A parse error is raised (and printed below as one line), not printed with the usage.
        build_cli(args, parser_kwargs={"exit_on_error": False})
    except SIGTERMException:  # a SystemExit without a code: status 0, "success", otherwise
        print(f"{PROG}: stopped by SIGTERM (exit status 143)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except ArgumentError as err:  # jsonargparse's own check of a type, choice or key
        if debugging():
            raise
        message = " ".join(str(err).split())
        _fail(f"{message} ({PROG} {' '.join(argv[:1])} --help lists the options)")
    except (ParameterError, MissingExtraError) as err:
        if debugging():
            raise
        _fail(str(err))


if __name__ == "__main__":
    main()
