"""The Lightning side of ``lightning-attn``: :class:`AttentionCLI` and what it adds to
LightningCLI. Imported by :mod:`lightning_attn.cli` only for the training subcommands, so that
``lightning-attn report`` and ``--help`` of the report never import Lightning."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from . import __version__
from .callbacks import AttentionDiagnostics
from .callbacks.diagnostics import check_distinct
from .cli import DESCRIPTION, PROG, debugging
from .core.tags import is_attention_tag
from .data import ClutteredDigitsDataModule
from .modules import AttentionClassifier

__all__ = [
    "AttentionCLI",
    "BestCheckpoint",
    "ParameterError",
    "build_cli",
    "trainer_defaults",
]



class ParameterError(ValueError):
    """A value refused by our checks or by the Trainer, with the command-line key it came
    from (``key``, ``None`` where no one key is to blame) and what to use instead."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def trainer_defaults() -> dict:
    """Trainer defaults: a TensorBoard logger under ``runs/`` (override with
    ``--trainer.logger.*``). A ``RichProgressBar`` is added by :class:`AttentionCLI`."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "lightning_attn"},
        },
    }


# -- help ---------------------------------------------------------------------------------
#: Shown by ``--help`` besides every option of ours (``model.*``, ``data.*``,
#: ``diagnostics.*``); ``--help=all`` shows the rest (the Trainer has about 50 options and a
#: help action per pluggable class).
BRIEF_OPTIONS = frozenset({
    "help", "config", "print_config", "seed_everything", "ckpt_path",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.precision",
    "trainer.max_epochs", "trainer.max_steps", "trainer.log_every_n_steps", "trainer.logger",
    "trainer.callbacks", "trainer.limit_train_batches", "trainer.limit_val_batches",
    "trainer.default_root_dir",
    "checkpoint.monitor", "checkpoint.mode", "checkpoint.save_top_k", "checkpoint.dirpath",
})
OUR_PREFIXES = ("model.", "data.", "diagnostics.")


def _name(action: argparse.Action) -> str:
    long = [o for o in action.option_strings if o.startswith("--")]
    return (long[-1] if long else action.dest).lstrip("-").rstrip("+")


def brief(action: argparse.Action) -> bool:
    """Whether plain ``--help`` shows ``action``: ours (but the ``.help`` actions of the
    pluggable classes), and the Trainer's most used."""
    name = _name(action)
    if name.endswith(".help") and name != "help":
        return False
    return name in BRIEF_OPTIONS or name.startswith(OUR_PREFIXES)


class _HelpAction(argparse._HelpAction):
    """``-h``/``--help``: our options; ``--help=all``: every option."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None) -> None:  # noqa: A002 - argparse's keyword
        argparse.Action.__init__(self, option_strings=option_strings, dest=dest,
                                 default=default, nargs="?", choices=("all",), help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.show_all = values == "all"
        parser.print_help()
        parser.exit()


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of ``parser`` and of its subcommands' parsers."""
    found = {o for o in parser._option_string_actions if o.startswith("--")}
    for action in parser._actions:
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            found |= _options(sub)
    return found


def _like(given: str, options: set[str]) -> list[str]:
    """The options ``given`` abbreviates, else the two most like it."""
    longer = sorted(o for o in options if o.startswith(given) and "." not in o[len(given):])
    return longer[:3] or difflib.get_close_matches(given, sorted(options), n=2, cutoff=0.75)


_SUBCLASSES = re.compile(r",? ?known subclasses: ([^)]*)")


def _ours_only(found: re.Match) -> str:
    ours = [c.strip() for c in found.group(1).split(",") if c.strip().startswith(
        "lightning_attn.")]
    return f", of this package: {', '.join(ours)}" if ours else ""


def _brief_formatter(formatter: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter`` with only this package's classes in the lists of known subclasses
    (every ``nn.Module`` for ``--model.backbone``: some 700 lines)."""

    class BriefFormatter(formatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            return _SUBCLASSES.sub(_ours_only, super()._get_help_string(action))

    return BriefFormatter


class AttentionArgumentParser(LightningArgumentParser):
    """No abbreviated options (``--trainer.max_epoch`` is refused, not read as
    ``max_epochs``), and a ``--help`` a person can read (see :func:`brief`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        add_help = kwargs.pop("add_help", True)
        super().__init__(*args, add_help=False, **kwargs)
        self.show_all = False
        if add_help:
            self.add_argument(
                "-h", "--help", action=_HelpAction,
                help="show our options (--help=all: every option of the Trainer and its "
                "callbacks too) and exit",
            )

    def error(self, message: str, ex: Exception | None = None):
        # An unknown option is named with the options it is closest to.
        # (Raised again by each parent parser: named once.)
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown and "did you mean" not in message:
            said = []
            for given in unknown.group(1).split():
                given = given.split("=")[0]
                if given.startswith("--"):
                    like = _like(given, _options(self))
                    said += [f"{given}: did you mean {' or '.join(like)}?"] if like else []
            if said:
                message = f"{message} ({'; '.join(said)})"
        return super().error(message, ex)

    def format_help(self, formatter: argparse.HelpFormatter | None = None) -> str:
        if self.show_all or not any(a.dest == "model" or _name(a).startswith("model.")
                                    for a in self._actions):
            return super().format_help()  # the top-level parser: subcommands only
        shown = [a for a in self._actions if brief(a)]
        kept = {id(a) for a in shown}
        saved = (self.usage, self.formatter_class,
                 [(g, list(g._group_actions)) for g in self._action_groups])
        try:
            self.usage = f"{self.prog} [-h | --help=all] [-c CONFIG] [--KEY VALUE ...]"
            self.formatter_class = _brief_formatter(self.formatter_class)
            for group, actions in saved[2]:
                group._group_actions[:] = [a for a in actions if id(a) in kept]
            text = super().format_help()
        finally:
            self.usage, self.formatter_class = saved[:2]
            for group, actions in saved[2]:
                group._group_actions[:] = actions
        hidden = sum(1 for a in self._actions if a.option_strings) - len(shown)
        prog = self.prog.replace(" [options]", "")
        return text + (
            f"\n{hidden} more options (the Trainer's, ModelCheckpoint's, the optimizer's) and "
            f"the classes each option takes: {prog} --help=all. The options of one class: "
            f"{prog} --model.optimizer.help SGD\n"
        )


# -- the checkpoint ------------------------------------------------------------------------
def nearest_keys(key: str, keys: list[str], n: int = 3) -> list[str]:
    """The ``n`` keys most like ``key`` (the diagnostics' ``attn/`` tags only when ``key``
    is one of them)."""
    pool = keys if is_attention_tag(key) else [k for k in keys if not is_attention_tag(k)]
    close = difflib.get_close_matches(key, pool, n=n, cutoff=0.4)
    stage = key.split("/")[0] + "/"
    return close or [k for k in pool if k.startswith(stage)][:n] or pool[:n]


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; a monitored metric that is not logged is named with
    the nearest logged ones (Lightning lists every logged metric, some 45 here, on one
    line), once."""

    _missing_told = False

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self.save_top_k == 0 or self.monitor is None or self.monitor in monitor_candidates:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
            return
        keys = list(monitor_candidates)
        validated = trainer.fit_loop.epoch_loop.val_loop._has_run
        message = (
            f"ModelCheckpoint(monitor={self.monitor!r}): no {self.monitor!r} among the "
            f"{len(keys)} logged metrics (nearest: {', '.join(nearest_keys(self.monitor, keys))})"
            + ("" if validated else "; validation has not run yet (a run shorter than "
               "trainer.val_check_interval / one epoch, or limit_val_batches=0)")
            + f". No best checkpoint is kept; last.ckpt is. Log {self.monitor!r} or set "
            "--checkpoint.monitor to a logged metric (null: none)"
        )
        if validated:
            raise MisconfigurationException(message)
        if not self._missing_told:
            self._missing_told = True
            rank_zero_warn(message)
        self._save_monitor_checkpoint(trainer, monitor_candidates)


# -- the Trainer's refusals ---------------------------------------------------------------
def _machine() -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"this machine has the CPU and {gpus} GPU(s)" if gpus else (
        "this machine has the CPU and no GPU visible to torch")


def _strategies(message: str) -> str:
    from lightning.pytorch.strategies import StrategyRegistry

    names = sorted(StrategyRegistry.available_strategies())
    given = re.search(r"strategy(?:='| `)([^'`]*)", message)
    close = difflib.get_close_matches(given.group(1), names, n=2) if given else []
    close = [c for c in close if c != given.group(1)] if given else []
    return ("did you mean " + " or ".join(close) + "? " if close else "") + (
        f"{_machine()}; common strategies: auto, ddp, ddp_spawn (CPU or GPU), fsdp, "
        "deepspeed (GPU); lightning.pytorch.strategies.StrategyRegistry lists all")


#: (pattern of Lightning's message, the key to blame, what to use instead); first match.
TRAINER_MISTAKES: tuple[tuple[str, str, Callable[[str], str]], ...] = (
    (r"strategy `|strategy name|strategy=|DeepSpeed", "trainer.strategy", _strategies),
    (r"gpu backend|Accelerator` can not run|accelerator is not available|torch_xla",
     "trainer.accelerator",
     lambda m: f"{_machine()}: use --trainer.accelerator cpu, or auto for what there is"),
    (r"requested gpu|only has|devices", "trainer.devices",
     lambda m: f"{_machine()}: --trainer.devices auto takes what there is; N >= 1 a count "
               "(processes on the CPU)"),
    (r"num_nodes", "trainer.num_nodes", lambda m: "1 on one machine"),
    (r"precision", "trainer.precision",
     lambda m: "32-true everywhere, bf16-mixed on recent CPUs and GPUs, 16-mixed on GPUs"),
)


def trainer_mistake(err: BaseException) -> ParameterError:
    """Lightning's refusal of the Trainer's arguments as one line: the key, Lightning's own
    words and what to use instead."""
    message = " ".join(str(err).split())
    for pattern, key, hint in TRAINER_MISTAKES:
        if re.search(pattern, message):
            return ParameterError(key, f"{message} ({hint(message)})")
    return ParameterError("trainer", message)


# -- our refusals -------------------------------------------------------------------------
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
        config.items() if isinstance(config, Mapping) else ())
    for key, value in items:
        if key.startswith("_"):
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


class AttentionCLI(LightningCLI):
    """LightningCLI with a best-``val/acc`` checkpoint and the attention diagnostics always on.

    Checkpoints go to ``<logger.log_dir>/checkpoints`` (``runs/<name>/version_N/``). A value
    our checks or the Trainer refuse is raised as a :class:`ParameterError` naming its
    command-line key (with ``LIGHTNING_ATTN_DEBUG=1``, as it was raised).
    """

    def __init__(self, *args: Any, parser_class: type = AttentionArgumentParser,
                 **kwargs: Any) -> None:
        #: The configuration parsed (set before the classes are instantiated).
        self.parsed: Any = None
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
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
        try:
            return super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
            # The accelerator, devices, strategy, ... this machine cannot give: one line.
            if debugging() or _ours(err):
                raise
            raise trainer_mistake(err) from err

    def before_instantiate_classes(self) -> None:
        # What was parsed, for naming the full key of a value the classes then refuse.
        self.parsed = self.config

    @contextmanager
    def _naming_refusals(self) -> Iterator[None]:
        try:
            yield
        except (ValueError, TypeError) as err:
            if isinstance(err, ParameterError) or not _ours(err) or debugging():
                raise
            config = self.parsed
            if config is not None and getattr(config, "subcommand", None):
                config = config[config.subcommand]
            key = _parameter(err, config)
            message = str(err)
            name = key.split(".")[-1] if key else None
            if name and message.startswith(f"{name} "):
                message = message[len(name) + 1:]  # "temperature must be ..." -> "must be ..."
            raise ParameterError(key, message) from err

    def instantiate_classes(self) -> None:
        with self._naming_refusals():
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with self._naming_refusals():
            # A checkpoint that is not there fails only after the model and data are set
            # up, deep inside the checkpoint loader: checked first.
            ckpt = self.config_init[subcommand].get("ckpt_path")
            if isinstance(ckpt, (str, os.PathLike)) and str(ckpt) not in _CKPT_ALIASES and (
                "://" not in str(ckpt) and not Path(ckpt).is_file()
            ):
                raise ValueError(
                    f"ckpt_path must be an existing checkpoint file, got {str(ckpt)!r}"
                )
            super()._run_subcommand(subcommand)


#: What Lightning accepts as ``ckpt_path`` besides a file.
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def build_cli(args: list[str] | dict | None = None, **kwargs: Any) -> AttentionCLI:
    """Parse ``args`` (default ``sys.argv[1:]``), build and run; returns the CLI object.

    ``kwargs`` go to :class:`~lightning.pytorch.cli.LightningCLI` (e.g. ``run=False``).
    """
    parser_kwargs = {
        "prog": PROG, "description": DESCRIPTION, "version": __version__,
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
