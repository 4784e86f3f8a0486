"""``insert_attention``: put attention blocks after named submodules of any ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_attn.blocks import attention_names, create_attention

from .wrappers import AttentionAfter

__all__ = ["infer_out_channels", "insert_attention"]

_CHANNEL_ATTRS = ("out_channels", "num_features")


def _own_channels(module: nn.Module) -> int | None:
    for attr in _CHANNEL_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _last_channels(module: nn.Module) -> int | None:
    """``out_channels``/``num_features`` of the last submodule (registration order) that has one."""
    found = None
    for sub in module.modules():
        found = _own_channels(sub) or found
    return found


def _hooked_channels(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor
) -> dict[str, int]:
    """Channel dim (dim 1) of each named submodule's output on one no-grad pass of the model."""
    seen: dict[str, int] = {}
    handles = []
    for name in names:

        def hook(_mod, _inp, out, name=name):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                seen[name] = int(t.shape[1])

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def infer_out_channels(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor | None = None
) -> dict[str, int]:
    """Output channels of each named submodule, in this order of evidence:

    1. the submodule's own ``out_channels`` (convolutions) or ``num_features`` (norms);
    2. with ``example_input``: dim 1 of its 4-D output on one ``eval``/no-grad forward of
       ``model`` (forward hooks, removed afterwards; train/eval mode restored);
    3. the ``out_channels``/``num_features`` of its last submodule (registration order) that
       has one: right for plain conv stacks and ResNet-style blocks whose last registered
       layer is the last norm, wrong for blocks that register a side branch last with a
       different width; pass ``example_input`` or ``channels`` for those.

    Raises ``ValueError`` for a submodule where none of these applies.
    """
    out: dict[str, int] = {}
    for name in names:
        c = _own_channels(model.get_submodule(name))
        if c is not None:
            out[name] = c
    missing = [n for n in names if n not in out]
    if missing and example_input is not None:
        out.update(_hooked_channels(model, missing, example_input))
    for name in [n for n in names if n not in out]:
        c = _last_channels(model.get_submodule(name))
        if c is None:
            raise ValueError(
                f"cannot infer the output channels of {name!r} "
                f"({type(model.get_submodule(name)).__name__}): pass example_input=<a batch> "
                f"or channels={{{name!r}: C}}"
            )
        out[name] = c
    return out


def _check_names(model: nn.Module, after: Sequence[str]) -> list[str]:
    if isinstance(after, str) or not isinstance(after, Sequence) or not after:
        raise TypeError(f"after must be a non-empty list of submodule names, got {after!r}")
    valid = {name for name, _ in model.named_modules() if name}
    for name in after:
        if name not in valid:
            some = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:20]
            raise ValueError(
                f"{type(model).__name__} has no submodule named {name!r}; "
                f"some valid names: {some}"
            )
    if len(set(after)) != len(after):
        raise ValueError(f"after names a submodule twice: {list(after)}")
    for a in after:
        for b in after:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"after names both {a!r} and its submodule {b!r}")
    return list(after)


def insert_attention(
    model: nn.Module,
    after: Sequence[str],
    name: str = "dsa",
    *,
    channels: int | Mapping[str, int] | None = None,
    example_input: torch.Tensor | None = None,
    **kwargs,
) -> nn.Module:
    """Insert an attention block after each submodule named in ``after`` (in place).

    Each named submodule ``m`` is replaced in its parent by :class:`AttentionAfter`
    ``(m, create_attention(name, C, **kwargs))``, so the model computes
    ``attention(m(x))`` there (only ``y`` travels on). Example::

        model = insert_attention(resnet_like, after=["layer1", "layer2"], name="dsa")

    Args:
        model: any ``nn.Module`` whose named submodules output ``(B, C, H, W)`` features.
        after: dotted submodule names as in ``model.named_modules()``.
        name: block name for :func:`~lightning_attn.create_attention` (``"dsa"``,
            ``"coord"``, ``"none"``).
        channels: ``C`` for every block (an int) or per name (a dict); otherwise inferred
            by :func:`infer_out_channels` (uses ``example_input`` when given).
        example_input: a batch for one no-grad pass that reads each output's channel count.
        **kwargs: the block's constructor arguments.

    Returns ``model`` itself (modified in place). State-dict keys of a wrapped submodule gain
    a ``module.`` segment (``layer1.0.conv1.weight`` -> ``layer1.module.0.conv1.weight``):
    load pretrained weights first. The blocks are ``<name>.attention``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or name not in attention_names():
        raise ValueError(f"unknown attention {name!r}; known names: {attention_names()}")
    names = _check_names(model, after)
    if channels is not None and (
        isinstance(channels, bool) or not isinstance(channels, (int, Mapping))
    ):
        raise TypeError(f"channels must be an int, a dict name -> int or None, got {channels!r}")
    if isinstance(channels, int) and not isinstance(channels, bool):
        chans = dict.fromkeys(names, channels)
    else:
        given = dict(channels or {})
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"channels names {unknown}, which are not in after={names}")
        todo = [n for n in names if n not in given]
        chans = {**given, **(infer_out_channels(model, todo, example_input) if todo else {})}
    for target in names:
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = create_attention(name, chans[target], **kwargs)
        parent.add_module(child, AttentionAfter(parent.get_submodule(child), block))
    return model
