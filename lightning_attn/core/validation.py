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
    "MAX_BLOCK_PARAMETERS",
    "MAX_BRANCHES",
    "MAX_CHANNELS",
    "MAX_KERNEL_EXTENT",
    "MAX_KERNEL_SIZE",
    "MAX_ROUTER_HIDDEN",
    "check_bool",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_parameter_budget",
    "check_size",
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


# Size limits of the blocks' arguments. Each is far beyond any network in use (the widest
# convnet stages have a few thousand channels; large-kernel convnets use kernels up to 51) and
# far below sizes that would ask the allocator for gigabytes or take minutes per forward, so
# a typo such as kernels=(10**9,) is a clear error instead of an out-of-memory crash.
MAX_CHANNELS = 65_536
"""Largest ``channels`` (and middle width) of a block."""
MAX_KERNEL_SIZE = 255
"""Largest kernel size of a block's convolutions (DSA's branches, Coord's axis kernels)."""
MAX_KERNEL_EXTENT = 1023
"""Largest span ``dilation * (kernel - 1) + 1`` of a dilated convolution (and dilation)."""
MAX_BRANCHES = 64
"""Most branches of DynamicSpatialAttention's router."""
MAX_ROUTER_HIDDEN = 4096
"""Widest hidden layer of DynamicSpatialAttention's router (its input is 2 numbers)."""
MAX_BLOCK_PARAMETERS = 2**28
"""Most parameters of one block: 1 GiB in float32 (CoordinateAttention's size grows with
``channels**2`` with ``spatial_gate`` or a small ``reduction``)."""


def check_bool(name: str, value: object) -> bool:
    """``value`` itself if it is a ``bool``; anything else (``"false"``, ``0``, ``None``) is a
    ``TypeError``: a string such as ``"false"`` would otherwise count as true."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_size(name: str, value: object, minimum: int, limit: int, limit_name: str) -> int:
    """An int in ``[minimum, limit]``; above ``limit`` the error names the limit constant."""
    value = check_int(name, value, minimum)
    if value > limit:
        raise ValueError(
            f"{name}={value} is above the limit of {limit} ({limit_name} in "
            "lightning_attn.core.validation): a block this size would allocate absurd "
            "memory or compute"
        )
    return value


def check_parameter_budget(owner: str, count: int, what: str) -> None:
    """Refuse a block whose parameter count (computed before anything is allocated) is above
    :data:`MAX_BLOCK_PARAMETERS`."""
    if count > MAX_BLOCK_PARAMETERS:
        raise ValueError(
            f"{owner}({what}) would have {count:,} parameters ({4 * count / 2**30:.1f} GiB "
            f"in float32), above the limit of {MAX_BLOCK_PARAMETERS:,} "
            "(MAX_BLOCK_PARAMETERS in lightning_attn.core.validation)"
        )


def check_device(name: str, value: object) -> torch.device | None:
    """``None`` or anything ``torch.device`` takes (``"cuda:0"``, ``0``, a device)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device, a string or an int, got {value!r}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name}={value!r} is not a torch device: {err}") from None


def check_dtype(name: str, value: object) -> torch.dtype | None:
    """``None`` or a floating-point ``torch.dtype`` (a block's parameters are floats)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.dtype or None, got {value!r}")
    return value


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
    param_device: torch.device | None = None,
    channels_name: str = "in_channels",
) -> None:
    """Raise a clear error unless ``x`` is a floating-point ``(B, C, H, W)`` tensor that the
    block's parameters can meet.

    ``C``, ``H`` and ``W`` must be at least 1 (``B = 0`` is a valid empty batch); with
    ``channels``, ``C`` must equal it (``channels_name`` names the argument in the message).

    With ``param_device``, ``x`` must be on that device: a convolution would fail deep inside
    with a message naming neither tensor, and a ``meta`` input into a CPU block would
    otherwise run without a word. This compares two ``torch.device`` objects (no host sync;
    under ``torch.compile`` a guard, not a graph break).

    With ``param_dtype``, ``x`` must have the parameters' dtype unless autocast is on for its
    device, which casts both to its own dtype: a bf16 input to a float32 block would otherwise
    fail deep inside a convolution. Autocast never casts float64, so a float64 input (or
    float64 parameters) must match even under autocast.
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
            f"({channels_name}={channels}), got {tuple(x.shape)}"
        )
    if param_device is not None and x.device != param_device:
        raise RuntimeError(
            f"{module_name} has its parameters on {param_device} but got an input on "
            f"{x.device}: move the block (block.to({str(x.device)!r})) or the input "
            f"(x.to({str(param_device)!r}))"
        )
    if param_dtype is not None and x.dtype != param_dtype:
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast or torch.float64 in (x.dtype, param_dtype):
            where = "under autocast (which never casts float64)" if autocast else (
                "outside autocast"
            )
            raise TypeError(
                f"{module_name} has {param_dtype} parameters but got a {x.dtype} input "
                f"{where}: convert the block (block.to({x.dtype})) or the input "
                f"(x.to({param_dtype})), or run under torch.autocast"
            )
