"""Argument and input checks of the whole package: every error names the argument and value.

Blocks, callbacks, modules and the CLI all check their arguments here (in the core, which
imports nothing else of the package, and no torch: the checks of tensors, devices and dtypes
are in :mod:`.tensor_checks`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

__all__ = [
    "MAX_BLOCK_PARAMETERS",
    "MAX_BRANCHES",
    "MAX_CHANNELS",
    "MAX_KERNEL_EXTENT",
    "MAX_KERNEL_SIZE",
    "MAX_ROUTER_HIDDEN",
    "check_bool",
    "check_choice",
    "check_parameter_budget",
    "check_size",
    "check_size_range",
    "check_fraction",
    "check_patterns",
    "check_int",
    "check_finite_float",
    "check_nonnegative_float",
    "check_positive_float",
    "check_unit_interval",
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


def check_size_range(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int ``n`` (meaning ``(n, n)``) or a pair ``(lo, hi)`` with ``minimum <= lo <= hi``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        lo = hi = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(
                    f"{name} must be an int or a pair of ints (min, max), got {value!r}"
                )
        lo, hi = int(value[0]), int(value[1])
    else:
        raise TypeError(
            f"{name} must be an int or a pair of ints (min, max), got {value!r} "
            f"({type(value).__name__})"
        )
    if lo < minimum:
        raise ValueError(f"{name} minimum must be >= {minimum}, got {name}={value!r}")
    if lo > hi:
        raise ValueError(f"{name} minimum {lo} is larger than its maximum {hi} ({name}={value!r})")
    return lo, hi


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Case-insensitive choice among ``choices``; returns the lower-cased value."""
    choices = tuple(choices)
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value.lower()
