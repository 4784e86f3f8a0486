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

import sys

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_attn import __version__
from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier

__all__ = ["DESCRIPTION", "AttentionCLI", "build_cli", "main", "trainer_defaults"]

DESCRIPTION = (
    "lightning-attn: train, validate, test and predict with AttentionClassifier (a CNN with "
    "DynamicSpatialAttention or CoordinateAttention after every stage) on cluttered digits, "
    "with the attention diagnostics on. Start from a config: "
    "lightning-attn fit --config examples/configs/dsa.yaml. Afterwards, one page of curves, "
    "maps, warnings and verdicts: lightning-attn report LOGDIR --output DIR (its own --help)"
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
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given + list(callbacks)
        ):
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


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
        args=args,
        parser_kwargs=parser_kwargs,
        **kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Console-script entry point ``lightning-attn``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:  # offline, not a LightningCLI subcommand
        from lightning_attn.report.command import main as report

        code = report(argv[1:])
        if code:
            raise SystemExit(code)
        return
    build_cli(args)


if __name__ == "__main__":
    main()
