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
    "CoordOptions",
    "DSAOptions",
    "Downsample",
    "block_kwargs",
    "block_options",
    "options_dataclass",
]

AttentionName = Literal["dsa", "coord", "none"]
"""The blocks of :func:`~lightning_attn.create_attention` (``"none"``: no attention)."""
Activation = Literal["relu", "gelu", "silu"]
Downsample = Literal["maxpool", "avgpool", "stride"]


def options_dataclass(block: type, name: str) -> type:
    """A frozen dataclass with one field per keyword argument of ``block.__init__`` that has
    a default (same name, type and default; required arguments such as ``in_channels`` are
    left to the caller), documented by the block's docstring."""
    init = block.__init__
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError):  # an annotation that does not resolve at run time
        hints = {}
    fields = [
        (p.name, hints.get(p.name, Any), dataclasses.field(default=p.default))
        for p in inspect.signature(init).parameters.values()
        if p.name != "self"
        and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.__module__ = __name__  # importable (pickling) and named in --help
    cls.__qualname__ = name
    cls.__doc__ = (
        f"Constructor arguments of :class:`{block.__name__}` (generated from its signature).\n"
        + inspect.cleandoc(block.__doc__ or "").partition("\n")[2]
    )
    return cls


DSAOptions = options_dataclass(DynamicSpatialAttention, "DSAOptions")
CoordOptions = options_dataclass(CoordinateAttention, "CoordOptions")
BLOCK_OPTIONS: dict[str, type] = {"dsa": DSAOptions, "coord": CoordOptions}
"""Attention name -> its options dataclass."""


def _make(cls: type, values: Mapping[str, Any], argument: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"{argument} has unknown keys {unknown}; valid keys: {names}")
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
    see :func:`block_options`) with ``attention_kwargs`` on top. Blocks without an options
    dataclass (``"none"``, names added with ``register_attention``) get ``attention_kwargs``
    alone."""
    if attention_kwargs is not None and not isinstance(attention_kwargs, Mapping):
        raise TypeError(f"attention_kwargs must be a dict or None, got {attention_kwargs!r}")
    extra = dict(attention_kwargs or {})
    if attention not in BLOCK_OPTIONS:
        return extra
    base = block_options(attention, options.get(attention))
    return dataclasses.asdict(_make(BLOCK_OPTIONS[attention], {**base, **extra},
                                    f"attention_kwargs for {attention!r}"))
