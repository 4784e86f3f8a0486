"""Argument and input checks of the whole package: every error names the argument and value.

Blocks, callbacks, modules and the CLI all check their arguments here (in the core, which
imports nothing else of the package).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_patterns",
    "check_int",
    "check_finite_float",
    "check_nonnegative_float",
    "check_positive_float",
    "check_float32_temperature",
    "check_unit_interval",
    "check_input",
]


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, or raise if it is not an integer ``>= minimum``.

    Any integral number counts (NumPy integers too, as config loaders produce them); a
    ``bool`` does not.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_positive_float(name: str, value: object) -> float:
    """A finite float ``> 0`` (rejects NaN and inf with the value in the message)."""
    v = _as_float(name, value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative_float(name: str, value: object) -> float:
    v = _as_float(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_finite_float(name: str, value: object) -> float:
    v = _as_float(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def check_fraction(name: str, value: object) -> float:
    """A finite number in ``[0, 1]`` (a threshold on a share or a mask value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def check_patterns(name: str, value: object, allow_none: bool) -> tuple[str, ...] | None:
    """A sequence of fnmatch patterns (a single string is taken as one pattern)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be a sequence of non-empty fnmatch patterns, got {value!r}")
    return tuple(value)


def check_unit_interval(name: str, value: object) -> float:
    """A number in ``[0, 1]``: the range in which an alpha or beta blend means something."""
    v = check_finite_float(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] (0 turns the attention off, 1 applies it fully), "
            f"got {value!r}"
        )
    return v


def check_float32_temperature(value: float, name: str = "temperature") -> float:
    """A temperature that stays a finite, non-zero number once stored in float32.

    ``1e-46`` becomes ``0`` (every mask NaN) and ``1e39`` becomes ``inf`` (every mask 0.5).
    """
    stored = float(torch.tensor(value, dtype=torch.float32))
    if stored == 0.0 or not math.isfinite(stored):
        info = torch.finfo(torch.float32)
        raise ValueError(
            f"{name}={value!r} becomes {stored} in float32, the dtype it is stored in; use a "
            f"value between {info.tiny:.3g} and {info.max:.3g}"
        )
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Case-insensitive choice among ``choices``; returns the lower-cased value."""
    choices = tuple(choices)
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value.lower()


def check_input(
    x: object,
    module_name: str,
    channels: int | None = None,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Raise a clear error unless ``x`` is a floating-point ``(B, C, H, W)`` tensor.

    ``C``, ``H`` and ``W`` must be at least 1 (``B = 0`` is a valid empty batch). With
    ``param_dtype``, ``x`` must have the parameters' dtype unless autocast is on for its
    device (which casts them itself): a bf16 input to a float32 block would otherwise fail
    deep inside a convolution.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module_name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{module_name} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{module_name} expects a floating-point input, got dtype {x.dtype}")
    empty = [d for d, n in zip("CHW", x.shape[1:], strict=True) if n == 0]
    if empty:
        raise ValueError(
            f"{module_name} expects C, H and W >= 1, got shape {tuple(x.shape)} "
            f"({', '.join(empty)} = 0)"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{module_name} expects input of shape (B, {channels}, H, W) "
            f"(in_channels={channels}), got {tuple(x.shape)}"
        )
    if (
        param_dtype is not None
        and x.dtype != param_dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        raise TypeError(
            f"{module_name} has {param_dtype} parameters but got a {x.dtype} input outside "
            f"autocast: convert the block (block.to({x.dtype})) or the input "
            f"(x.to({param_dtype})), or run under torch.autocast"
        )


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (NumPy's too); a string such as ``"false"`` is refused
    rather than taken as true."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
