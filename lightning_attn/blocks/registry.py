"""Build an attention block by name, for configuration files and LightningCLI.

The names this package defines are an immutable mapping (:data:`BUILTIN_FACTORIES`). A block
of your own is passed where it is used, or registered for the process::

    create_attention("gate", 64, factories={"gate": MyGate})     # this call
    insert_attention(model, ["layer1"], "gate", factories={"gate": MyGate})
    registration = register_attention("gate", MyGate)           # every call, until
    registration.remove()                                        # ... this (or ``with``)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn

from .coordinate import CoordinateAttention
from .dynamic_spatial import DynamicSpatialAttention

__all__ = [
    "BUILTIN_FACTORIES",
    "FactoryRegistration",
    "IdentityAttention",
    "attention_names",
    "create_attention",
    "factories_in_force",
    "register_attention",
]

#: ``factory(channels, **kwargs) -> nn.Module``: builds a block for ``(B, channels, H, W)``.
Factory = Callable[..., nn.Module]


class IdentityAttention(nn.Module):
    """``"none"``: returns its input unchanged, for no-attention baselines."""

    def __init__(self, channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _dsa(channels: int, **kwargs) -> nn.Module:
    # DSA acts on the channel mean/max maps, so its weights do not depend on channels.
    return DynamicSpatialAttention(**kwargs)


#: The blocks of this package by name (read-only).
BUILTIN_FACTORIES: Mapping[str, Factory] = MappingProxyType({
    "dsa": _dsa,
    "coord": CoordinateAttention,
    "none": IdentityAttention,
})
#: Names registered for the whole process (each with the handle that undoes it).
_registered: dict[str, Factory] = {}


class FactoryRegistration:
    """What :func:`register_attention` returns: :meth:`remove` undoes the registration (also
    as a context manager: ``with register_attention(...):``)."""

    def __init__(self, name: str, factory: Factory) -> None:
        self.name = name
        self.factory = factory

    def remove(self) -> None:
        """Forget the name (a second call does nothing)."""
        if _registered.get(self.name) is self.factory:
            del _registered[self.name]

    def __enter__(self) -> FactoryRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _check_factories(factories: Mapping[str, Factory] | None) -> dict[str, Factory]:
    if factories is None:
        return {}
    if not isinstance(factories, Mapping):
        raise TypeError(
            f"factories must be a mapping name -> factory(channels, **kwargs), got "
            f"{type(factories).__name__}"
        )
    for name, factory in factories.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"factories: a name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"factories[{name!r}] must be callable, got {factory!r}")
    return dict(factories)


def _check_new_name(name: object, known: Mapping[str, Factory], argument: str) -> None:
    """A name may not take the place of one in force (it would change what a config that
    names it builds)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{argument} must be a non-empty string, got {name!r}")
    if name in known:
        where = "built in" if name in BUILTIN_FACTORIES else "registered"
        raise ValueError(
            f"attention name {name!r} is already {where}; give your block another name"
        )


def factories_in_force(factories: Mapping[str, Factory] | None = None) -> dict[str, Factory]:
    """Name -> factory for one call: :data:`BUILTIN_FACTORIES`, the registered names, then
    ``factories`` (passed for this call; a name may not repeat one of the others)."""
    known = {**BUILTIN_FACTORIES, **_registered}
    extra = _check_factories(factories)
    for name in extra:
        _check_new_name(name, known, "factories")
    return {**known, **extra}


def attention_names(factories: Mapping[str, Factory] | None = None) -> list[str]:
    """The names :func:`create_attention` knows (with ``factories`` for one call)."""
    return sorted(factories_in_force(factories))


def register_attention(name: str, factory: Factory) -> FactoryRegistration:
    """Add ``factory(channels, **kwargs) -> nn.Module`` under ``name`` for every call of this
    process; returns the handle whose :meth:`~FactoryRegistration.remove` undoes it. To use a
    block in one place only, pass ``factories={name: factory}`` there instead."""
    _check_new_name(name, {**BUILTIN_FACTORIES, **_registered}, "name")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    _registered[name] = factory
    return FactoryRegistration(name, factory)


def create_attention(
    name: str,
    channels: int,
    *,
    factories: Mapping[str, Factory] | None = None,
    **kwargs,
) -> nn.Module:
    """Build the block named ``name`` for a ``(B, channels, H, W)`` feature map.

    ``"dsa"`` -> :class:`DynamicSpatialAttention` (``channels`` unused by its weights),
    ``"coord"`` -> :class:`CoordinateAttention`, ``"none"`` -> :class:`IdentityAttention`;
    ``factories`` adds names for this call (``{"gate": MyGate}``), beside those of
    :func:`register_attention`. Keyword arguments go to the block's constructor.
    """
    known = factories_in_force(factories)
    factory = known.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"unknown attention name {name!r}; known names: {sorted(known)}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an int >= 1, got {channels!r}")
    return factory(channels, **kwargs)
