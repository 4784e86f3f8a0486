"""Typed configuration: the string choices as ``Literal`` types, and each block's constructor
arguments as a dataclass generated from its signature.

LightningCLI (jsonargparse) reads these types: ``--help`` lists the choices and every block
argument (``--model.dsa.temperature``, ``--model.coord.reduction``, ... with their types,
defaults and the block's own docs), ``--print_config`` shows them, and a bad value or an
unknown key is rejected before anything is built. The dataclasses are made from the block
constructors themselves, so a new block keyword appears here with no second definition.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from typing import Any, Literal

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention

__all__ = [
    "Activation",
    "AttentionName",
    "BLOCK_OPTIONS",
    "CHANNEL_ARGUMENTS",
    "DEPRECATED_ARGUMENTS",
    "CoordOptions",
    "DSAOptions",
    "Downsample",
    "block_kwargs",
    "block_options",
    "options_dataclass",
]

AttentionName = Literal["dsa", "coord", "none"]
"""The blocks of :func:`~lightning_attn.blocks.create_attention` (``"none"``: no attention)."""
Activation = Literal["relu", "gelu", "silu"]
Downsample = Literal["maxpool", "avgpool", "stride"]


# Deprecated spellings stay out of the typed config (Python callers may still pass them).
DEPRECATED_ARGUMENTS = ("fused",)  # -> backend=
# The input's channel count: the network gives it per stage, never a config.
CHANNEL_ARGUMENTS = ("channels", "in_channels")


def _constructor_parameters(block: type) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(block.__init__).parameters.values() if p.name != "self"]


def options_dataclass(block: type, name: str, exclude: tuple[str, ...] = ()) -> type:
    """A frozen dataclass with one field per argument of ``block.__init__`` that has a
    default and can be given by position (same name, type and default), documented by the
    block's docstring.

    Left out: required arguments, keyword-only ones (aliases such as timm's ``rd_ratio`` /
    ``act_layer`` and the factory keywords ``device`` / ``dtype``: one spelling per setting
    in a config), the channel count (``channels``: the network gives it per stage) and
    ``exclude``.
    """
    init = block.__init__
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError):  # an annotation that does not resolve at run time
        hints = {}
    fields = [
        (p.name, hints.get(p.name, Any), dataclasses.field(default=p.default))
        for p in _constructor_parameters(block)
        if p.default is not inspect.Parameter.empty
        and p.kind is p.POSITIONAL_OR_KEYWORD
        and p.name not in (*exclude, *CHANNEL_ARGUMENTS)
    ]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__  # importable (pickling) and named in --help
    cls.__qualname__ = name
    cls.__doc__ = (
        f"Constructor arguments of :class:`{block.__name__}` (generated from its signature).\n"
        + inspect.cleandoc(block.__doc__ or "").partition("\n")[2]
    )
    return cls


DSAOptions = options_dataclass(DynamicSpatialAttention, "DSAOptions", DEPRECATED_ARGUMENTS)
CoordOptions = options_dataclass(CoordinateAttention, "CoordOptions", DEPRECATED_ARGUMENTS)
BLOCK_OPTIONS: dict[str, type] = {"dsa": DSAOptions, "coord": CoordOptions}
"""Attention name -> its options dataclass."""
_BLOCKS: dict[str, type] = {"dsa": DynamicSpatialAttention, "coord": CoordinateAttention}


def _check_keys(values: Mapping[str, Any], valid: list[str], argument: str) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"{argument} has unknown keys {unknown}; valid keys: {valid}")


def _make(cls: type, values: Mapping[str, Any], argument: str) -> Any:
    _check_keys(values, [f.name for f in dataclasses.fields(cls)], argument)
    return cls(**values)


def block_options(attention: str, value: object, argument: str | None = None) -> dict[str, Any]:
    """The options of block ``attention`` as a plain dict (what checkpoints store).

    ``value``: an instance of its options dataclass, a mapping of some of its fields (the
    rest keep their defaults) or ``None`` (all defaults). An unknown key is a ``TypeError``
    naming it and the valid keys.
    """
    cls = BLOCK_OPTIONS[attention]
    argument = argument or attention
    if value is None:
        value = cls()
    elif isinstance(value, Mapping):
        value = _make(cls, value, argument)
    elif not isinstance(value, cls):
        raise TypeError(
            f"{argument} must be a {cls.__name__} or a dict of its fields, got "
            f"{type(value).__name__}"
        )
    return dataclasses.asdict(value)


def block_kwargs(
    attention: str,
    options: Mapping[str, object],
    attention_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Constructor keywords for block ``attention``: its entry of ``options`` (name -> options,
    see :func:`block_options`) with ``attention_kwargs`` on top (any keyword of the block's
    constructor, aliases and deprecated ones included; an unknown key is a ``TypeError``).
    Blocks without an options dataclass (``"none"``, names added with
    ``register_attention`` or passed as ``attention_factories``) get ``attention_kwargs``
    alone."""
    if attention_kwargs is not None and not isinstance(attention_kwargs, Mapping):
        raise TypeError(f"attention_kwargs must be a dict or None, got {attention_kwargs!r}")
    extra = dict(attention_kwargs or {})
    if attention not in BLOCK_OPTIONS:
        return extra
    valid = [p.name for p in _constructor_parameters(_BLOCKS[attention])
             if p.default is not inspect.Parameter.empty and p.name not in CHANNEL_ARGUMENTS]
    _check_keys(extra, valid, f"attention_kwargs for {attention!r}")
    return {**block_options(attention, options.get(attention)), **extra}
