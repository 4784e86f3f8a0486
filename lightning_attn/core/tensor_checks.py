"""Checks of tensors, devices and dtypes: every error names the argument and value.

The torch half of :mod:`.validation` (which stays importable without torch).
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_device", "check_dtype", "check_float32_temperature", "check_input"]


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
