"""The construction conventions the blocks share with ``torch.nn`` and timm.

So that both blocks are drop-ins wherever timm takes an attention layer
(``attn_layer=`` / ``se_layer=`` / ``timm.layers.create_attn``), they accept what timm passes:

- the channel count first, by position;
- ``device`` / ``dtype``, the ``torch.nn`` factory keywords (timm >= 1.0.22 passes both,
  usually ``None``): parameters and buffers are created there directly;
- timm's layer names: ``act_layer`` and ``gate_layer`` as timm's activation names
  (``"swish"``, ``"hard_swish"``, ``"hard_sigmoid"``, ...) or classes (``nn.SiLU``,
  ``nn.Hardswish``, timm's own ``HardSwish`` ...), ``bias``, and timm's channel reduction
  ``rd_ratio`` / ``rd_divisor`` / ``rd_channels`` (a middle width where a block has one,
  checked and unused where it has none);
- every other keyword timm's model configs pass to an attention layer is refused, with its
  reason in :data:`TIMM_KEYWORDS_REFUSED`.

Nothing here imports timm: timm's classes are recognised by their module and name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.tensor_checks import check_device, check_dtype
from ..core.validation import MAX_CHANNELS, check_choice, check_finite_float, check_size
from .kernels import BACKENDS, load_triton_ops

__all__ = [
    "ACTIVATIONS",
    "ActLayer",
    "BlockSettings",
    "GATES",
    "HSwish",
    "TIMM_KEYWORDS_REFUSED",
    "activation_name",
    "check_reduction",
    "constructor_arguments",
    "factory_kwargs",
    "gate_name",
    "make_activation",
    "make_divisible",
]


#: The keywords timm's model configs pass to ``attn_layer`` / ``se_layer`` that neither
#: block takes (a ``TypeError`` names them), each with the reason.
TIMM_KEYWORDS_REFUSED: Mapping[str, str] = MappingProxyType({
    "block_size": "the block size of timm's BatNonLocalAttn, which bat_resnext26ts's config "
                  "passes along with attn_layer='bat'; neither block has blocks of positions. "
                  "Replacing that layer, pass attn_kwargs={} too",
})


class HSwish(nn.Module):
    """``x * relu6(x + 3) / 6``, written as the seed writes it (same rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (timm's ``"quick_gelu"``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class HardMish(nn.Module):
    """``0.5 x * clamp(x + 2, 0, 2)`` (timm's ``"hard_mish"``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (x + 2.0).clamp(min=0.0, max=2.0)


#: Activation name -> a factory of a parameter-free module. ``"hswish"`` is the seed's own
#: formula; the others are the ``torch.nn`` modules timm builds for the same names.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "hswish": HSwish,
    "relu": functools.partial(nn.ReLU, inplace=True),
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "hard_mish": HardMish,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid,
    "identity": nn.Identity,
}
#: The gates: a mask must lie in [0, 1].
GATES: tuple[str, ...] = ("sigmoid", "hardsigmoid")

# timm's (and torch's) other spellings of the same activations.
_ALIASES = {
    "swish": "silu",
    "hard_swish": "hswish",
    "hardswish": "hswish",
    "hard_sigmoid": "hardsigmoid",
}
_TORCH_CLASSES: dict[type, str] = {
    HSwish: "hswish", nn.Hardswish: "hswish", nn.ReLU: "relu", nn.ReLU6: "relu6",
    nn.SiLU: "silu", nn.Mish: "mish", nn.GELU: "gelu", QuickGELU: "quick_gelu",
    HardMish: "hard_mish", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.CELU: "celu",
    nn.SELU: "selu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
    nn.Identity: "identity",
}
# timm.layers.activations / activations_me classes, by name (timm is never imported here).
_TIMM_CLASSES = {
    "Swish": "silu", "SwishMe": "silu", "Mish": "mish", "MishMe": "mish",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hswish", "HardSwishMe": "hswish",
    "HardSigmoid": "hardsigmoid", "HardSigmoidMe": "hardsigmoid", "HardMish": "hard_mish",
    "HardMishMe": "hard_mish", "GELU": "gelu", "GELUTanh": "gelu_tanh",
    "QuickGELU": "quick_gelu",
}

#: What ``act_layer`` / ``gate_layer`` take: a name or a module class (or a
#: ``functools.partial`` of one).
ActLayer = str | type[nn.Module] | Callable[..., nn.Module]


def _class_name(cls: type) -> str | None:
    if cls in _TORCH_CLASSES:
        return _TORCH_CLASSES[cls]
    if getattr(cls, "__module__", "").startswith("timm."):
        return _TIMM_CLASSES.get(cls.__name__)
    return None


def _layer_class(value: object) -> type | None:
    """The class of ``value``: itself, or the function of a ``functools.partial`` of one
    whose only keyword is ``inplace`` (as timm builds ``partial(nn.ReLU, inplace=True)``)."""
    if isinstance(value, functools.partial) and not value.args and set(value.keywords) <= {
        "inplace"
    }:
        value = value.func
    return value if isinstance(value, type) else None


def activation_name(argument: str, value: object) -> str:
    """The canonical activation name (a key of :data:`ACTIVATIONS`) of ``value``: a name or
    alias (case-insensitive; timm's names included) or an activation class of ``torch.nn``,
    of timm, or of this package. Anything else is a ``ValueError`` naming ``argument``."""
    if isinstance(value, str):
        name = value.lower()
        name = _ALIASES.get(name, name)
        if name in ACTIVATIONS:
            return name
    else:
        cls = _layer_class(value)
        name = _class_name(cls) if cls is not None else None
        if name is not None:
            return name
    if isinstance(value, str) and value.lower() == "prelu":
        why = " (prelu has parameters, which would add state-dict keys; it is not supported)"
    else:
        why = ""
    raise ValueError(
        f"{argument} must be an activation name among {sorted({*ACTIVATIONS, *_ALIASES})} "
        f"or an activation class of torch.nn or timm, got {value!r}{why}"
    )


def make_activation(name: str, layer: object = None) -> nn.Module:
    """A new activation module: ``layer()`` when ``layer`` is the class (or partial) the
    caller passed (so timm's ``nn.Hardswish`` runs as timm would run it), otherwise the
    package's own module for ``name``."""
    if layer is not None and not isinstance(layer, str) and _layer_class(layer) is not None:
        return layer()
    return ACTIVATIONS[name]()


def gate_name(argument: str, value: object) -> str:
    """``"sigmoid"`` or ``"hardsigmoid"`` from a name or class (as :func:`activation_name`);
    a gate must map into ``[0, 1]``, so other activations are a ``ValueError``."""
    try:
        name = activation_name(argument, value)
    except ValueError:
        name = None
    if name not in GATES:
        raise ValueError(
            f"{argument} must be a gate mapping into [0, 1]: 'sigmoid' or 'hard_sigmoid' "
            f"(or nn.Sigmoid, nn.Hardsigmoid, timm's HardSigmoid), got {value!r}"
        )
    return name


@dataclass(frozen=True)
class BlockSettings:
    """The checked settings of a block, what its layers are built from: each block's own
    subclass adds its fields and a ``check`` classmethod, the one place its constructor's
    arguments are validated."""

    backend: str
    factory_kwargs: Mapping[str, object]  # device / dtype for the torch.nn constructors

    #: The settings the block keeps as plain attributes (its forward reads them).
    ATTRIBUTES: ClassVar[tuple[str, ...]] = ("backend",)

    @staticmethod
    def check_backend_and_factory(
        owner: str, backend: object, device: object, dtype: object
    ) -> tuple[str, dict[str, object]]:
        """``(backend, factory_kwargs)`` checked, the Triton kernels loaded for ``"triton"``
        (a clear error where they cannot load, before anything is built)."""
        dd = factory_kwargs(device, dtype)
        backend = check_choice("backend", backend, BACKENDS)
        if backend == "triton":
            load_triton_ops(f"{owner}(backend='triton')")
        return backend, dd

    def set_attributes(self, module: nn.Module) -> None:
        """Set :attr:`ATTRIBUTES` on ``module``: plain attributes, which a forward reads as
        constants and a user may still change (``block.backend = "plain"``)."""
        for name in self.ATTRIBUTES:
            setattr(module, name, getattr(self, name))


def constructor_arguments(frame_locals: Mapping[str, object]) -> dict[str, object]:
    """The arguments of a constructor, from its ``locals()`` taken before it binds any other
    name: each parameter by name, less ``self`` and the ``__class__`` cell of a method that
    calls ``super()``. A block hands them all to its one check this way, so a new keyword
    cannot be forgotten there (the check takes each by name and refuses one it lacks)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


def factory_kwargs(device: object, dtype: object) -> dict[str, object]:
    """``{"device": ..., "dtype": ...}`` for ``torch.nn`` layer constructors, checked."""
    return {"device": check_device("device", device), "dtype": check_dtype("dtype", dtype)}


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), one
    ``divisor`` higher when rounding lost more than 10%: the rounding rule of MobileNet and
    timm's ``rd_divisor``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def check_reduction(
    rd_ratio: object = None,
    rd_divisor: object = None,
    rd_channels: object = None,
    limit: int = MAX_CHANNELS,
) -> tuple[float | None, int | None, int | None]:
    """timm's reduction keywords checked: ``rd_ratio`` in ``(0, 1]``, ``rd_divisor`` (which
    needs ``rd_ratio``) and ``rd_channels`` ints in ``[1, limit]``; each may be ``None``."""
    if rd_channels is not None:
        rd_channels = check_size("rd_channels", rd_channels, 1, limit, "MAX_CHANNELS")
    if rd_ratio is None:
        if rd_divisor is not None:
            raise ValueError(f"rd_divisor={rd_divisor!r} needs rd_ratio (timm's meaning)")
        return None, None, rd_channels
    r = check_finite_float("rd_ratio", rd_ratio)
    if not 0 < r <= 1:
        raise ValueError(f"rd_ratio must be in (0, 1], got {rd_ratio!r}")
    if rd_divisor is not None:
        rd_divisor = check_size("rd_divisor", rd_divisor, 1, limit, "MAX_CHANNELS")
    return r, rd_divisor, rd_channels


def reduced_width(
    channels: int,
    reduction: int,
    min_mid_channels: int,
    rd_ratio: object = None,
    rd_divisor: object = None,
    rd_channels: object = None,
    default_reduction: int = 32,
    default_min_mid: int = 8,
    limit: int = MAX_CHANNELS,
) -> int:
    """The middle width of a block with a bottleneck.

    - default: ``max(min_mid_channels, channels // reduction)``;
    - ``rd_ratio=r`` (timm's name, ``0 < r <= 1``): ``max(min_mid_channels, floor(channels *
      r))``, so ``rd_ratio=1/n`` is ``reduction=n``; with ``rd_divisor=d`` the product is
      rounded to a multiple of ``d`` first (:func:`make_divisible`);
    - ``rd_channels=m``: exactly ``m`` (timm: "overrides rd_ratio").

    An explicit ``reduction`` or ``min_mid_channels`` that contradicts them is a
    ``ValueError``.
    """
    rd_ratio, rd_divisor, rd_channels = check_reduction(rd_ratio, rd_divisor, rd_channels, limit)
    if rd_channels is not None:
        if reduction != default_reduction or min_mid_channels != default_min_mid:
            raise ValueError(
                f"rd_channels={rd_channels!r} sets the middle width exactly; it contradicts "
                f"reduction={reduction!r} / min_mid_channels={min_mid_channels!r}: give one"
            )
        return rd_channels
    if rd_ratio is None:
        return max(min_mid_channels, channels // reduction)
    if reduction != default_reduction and not math.isclose(
        reduction * rd_ratio, 1.0, rel_tol=1e-6
    ):
        raise ValueError(
            f"rd_ratio={rd_ratio!r} contradicts reduction={reduction!r}: give one of them"
        )
    # 1e-9 absorbs the binary rounding of 1/n (49 * (1/49) is 0.9999999999999999).
    width = channels * rd_ratio
    if rd_divisor is not None:
        return max(min_mid_channels, make_divisible(width, rd_divisor))
    return max(min_mid_channels, math.floor(width + 1e-9))
