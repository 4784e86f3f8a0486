"""``lightning-attn``: LightningCLI for :class:`AttentionClassifier` on cluttered digits.

Subcommands ``fit``, ``validate``, ``test``, ``predict`` (LightningCLI) and ``report``
(:mod:`lightning_attn.report`, its own ``--help``). Examples::

    lightning-attn fit --config examples/configs/dsa.yaml
    lightning-attn fit --config examples/configs/dsa.yaml \\
        --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp
    lightning-attn fit --config examples/configs/dsa.yaml \
        --ckpt_path runs/dsa/version_0/checkpoints/last.ckpt                      # resume
    lightning-attn test --config examples/configs/dsa.yaml --ckpt_path <checkpoint>

Defaults added to LightningCLI's: a ``TensorBoardLogger`` under ``runs/`` (``--trainer.logger``),
a ``RichProgressBar`` (always on), a ``ModelCheckpoint`` (``--checkpoint.*``) keeping the
best ``val/acc``, the latest state as ``last.ckpt`` (resume with ``--ckpt_path``) and one more
checkpoint when a run is interrupted (Ctrl-C or an error) and, when the package has it,
``lightning_attn.callbacks.AttentionDiagnostics`` (``--diagnostics.*``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_attn import __version__
from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.callbacks.diagnostics import check_distinct
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier

__all__ = ["DESCRIPTION", "AttentionCLI", "build_cli", "main", "trainer_defaults"]

DESCRIPTION = (
    "lightning-attn: train, validate, test and predict with AttentionClassifier (a CNN with "
    "DynamicSpatialAttention or CoordinateAttention after every stage) on cluttered digits, "
    "with the attention diagnostics on. Start from a config: "
    "lightning-attn fit --config examples/configs/dsa.yaml. Afterwards, one page of curves, "
    "maps, warnings and verdicts: lightning-attn report LOGDIR --output DIR (its own --help). "
    "A refused value ends with one line naming it; LIGHTNING_ATTN_DEBUG=1 shows the traceback"
)


def trainer_defaults() -> dict:
    """Trainer defaults: a TensorBoard logger under ``runs/`` (override with
    ``--trainer.logger.*``). A ``RichProgressBar`` is added by :class:`AttentionCLI`."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lightning_attn"},
        },
    }


class AttentionCLI(LightningCLI):
    """LightningCLI with a best-``val/acc`` checkpoint and the attention diagnostics always on.

    Checkpoints go to ``<logger.log_dir>/checkpoints`` (``runs/<name>/version_N/``).
    """

    #: The configuration parsed last (set before the classes are instantiated).
    parsed: Any = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_on_exception": True,
                "checkpoint.save_last": True,  # `last.ckpt`: what a resume wants
            }
        )
        parser.add_lightning_class_args(AttentionDiagnostics, "diagnostics")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # A RichProgressBar unless the run turns the bar off or brings its own: the Trainer
        # refuses `enable_progress_bar=False` next to a progress-bar callback.
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        check_distinct([*given, *callbacks])  # the hint, before Lightning's generic refusal
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given + list(callbacks)
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        # What was parsed, for naming the full key of a value the classes then refuse.
        AttentionCLI.parsed = self.config

    def _run_subcommand(self, subcommand: str) -> None:
        # A checkpoint that is not there fails only after the model and data are set up,
        # deep inside the checkpoint loader: checked first.
        ckpt = self.config_init[subcommand].get("ckpt_path")
        if isinstance(ckpt, (str, os.PathLike)) and str(ckpt) not in _CKPT_ALIASES and (
            "://" not in str(ckpt) and not Path(ckpt).is_file()
        ):
            raise ValueError(f"ckpt_path must be an existing checkpoint file, got {str(ckpt)!r}")
        super()._run_subcommand(subcommand)


#: What Lightning accepts as ``ckpt_path`` besides a file.
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def build_cli(args: list[str] | dict | None = None, **kwargs) -> AttentionCLI:
    """Parse ``args`` (default ``sys.argv[1:]``), build and run; returns the CLI object.

    ``kwargs`` go to :class:`~lightning.pytorch.cli.LightningCLI` (e.g. ``run=False``).
    """
    parser_kwargs = {
        "prog": "lightning-attn", "description": DESCRIPTION, "version": __version__,
        **kwargs.pop("parser_kwargs", {}),
    }
    return AttentionCLI(
        AttentionClassifier,
        ClutteredDigitsDataModule,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        auto_configure_optimizers=False,
        # Without a logger the config lands in the working directory: a second run there
        # replaces it instead of aborting.
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs=parser_kwargs,
        **kwargs,
    )


DEBUG_VARIABLE = "LIGHTNING_ATTN_DEBUG"


def _ours(err: BaseException) -> bool:
    """Whether ``err`` is a refusal of our own checks: a ``ValueError``/``TypeError`` raised
    by this package's code (not by torch, Lightning or a bug's division by zero elsewhere)."""
    if not isinstance(err, (ValueError, TypeError)) or err.__traceback__ is None:
        return False
    frames = traceback.extract_tb(err.__traceback__)
    package = str(Path(__file__).resolve().parent)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(package)


def _keys(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = vars(config).items() if hasattr(config, "__dict__") else (
        config.items() if isinstance(config, dict) else ())
    for key, value in items:
        if key.startswith("_") or key.startswith("__"):
            continue
        name = f"{prefix}{key}"
        yield name, value
        yield from _keys(value, f"{name}.")


def _parameter(err: BaseException, config: Any) -> str | None:
    """The command-line key of the argument ``err`` names: our messages start with the
    argument's name; among the parsed keys ending with it, the one holding the refused
    value when several do."""
    found = re.match(r"[A-Za-z_][A-Za-z0-9_]*", str(err))
    if found is None or config is None:
        return None
    name = found.group(0)
    matches = [k for k, _ in _keys(config) if k.split(".")[-1] == name]
    given = re.search(r"got (.+?)(?: \(|$|,)", str(err))
    if len(matches) > 1 and given:
        valued = [k for k, v in _keys(config) if k in matches and repr(v) == given.group(1)]
        matches = valued or matches
    return min(matches, key=len) if matches else None


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-attn``.

    A value our checks refuse ends with one line, ``lightning-attn: error: <key>: <why>``, and
    exit status 2, as a usage error; ``LIGHTNING_ATTN_DEBUG=1`` shows the traceback too. A run
    ended by SIGTERM saves what Lightning saves (the ``ModelCheckpoint``'s checkpoint on
    exception) and exits with status 143 (128 + SIGTERM), so a scheduler sees it was killed.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:  # offline, not a LightningCLI subcommand
        from lightning_attn.report.command import main as report

        code = report(argv[1:])
        if code:
            raise SystemExit(code)
        return
    AttentionCLI.parsed = None
    try:
        # A parse error is raised (and printed below as one line), not printed with the usage.
        build_cli(args, parser_kwargs={"exit_on_error": False})
    except SIGTERMException:  # a SystemExit without a code: status 0, "success", otherwise
        print("lightning-attn: stopped by SIGTERM (exit status 143)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except ArgumentError as err:  # jsonargparse's own check of a type, choice or key
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        message = " ".join(str(err).split())
        print(f"lightning-attn: error: {message} (lightning-attn {' '.join(argv[:1])} --help "
              "lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError) as err:
        if not _ours(err) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        config = AttentionCLI.parsed
        if config is not None and getattr(config, "subcommand", None):
            config = config[config.subcommand]
        key = _parameter(err, config)
        message = str(err)
        name = key.split(".")[-1] if key else None
        if name and message.startswith(f"{name} "):
            message = message[len(name) + 1:]  # "temperature must be ..." -> "must be ..."
        print(f"lightning-attn: error: {f'{key}: ' if key else ''}{message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
