"""Adapters: the attention already in users' models records, without a change to its code.

A module that does not call :meth:`~.recording.RecordingMixin.record` itself (timm's
``SEModule``, torchvision's ``SqueezeExcitation``, a user's gate) joins the diagnostics
through an adapter: a declaration of which submodule's output is a mask or the router
weights::

    register_attention_adapter(MyGate, masks={"mask": "sigmoid"})   # one line

When the diagnostics find such a module they attach an :class:`AdapterRecorder`: forward
hooks on the named submodules hand their outputs to it, and a hook on the module itself
records them as one forward, through the same accumulator as our own blocks (compile-safe:
the hooks read the same two flags, and do nothing else while recording is off). The module's
outputs and state dict are untouched; the hooks are removed when the diagnostics stop.

The built-in adapters (timm's ``SEModule``, ``EffectiveSEModule``, ``SqueezeExciteCl``,
EfficientNet's ``SqueezeExcite``, ``EcaModule``, ``CecaModule``, ``CbamModule``,
``LightCbamModule``, ``GatherExcite``, ``CoordAttn``, ``SelectiveKernel``, ``SplitAttn``, and
torchvision's ``SqueezeExcitation``) are registered by class *name*: nothing is imported, and a
model without such modules never touches timm or torchvision.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .recording import RecordingMixin

__all__ = [
    "AdapterRecorder",
    "AttentionAdapter",
    "adapter_declared",
    "adapter_for",
    "register_attention_adapter",
]

#: ``convert(submodule, inputs, output) -> tensor``: what a hooked submodule's call gives.
Convert = Callable[[nn.Module, tuple, Any], torch.Tensor]


@dataclass(frozen=True)
class AttentionAdapter:
    """What one kind of module exposes to the diagnostics.

    Attributes:
        target: the module class, or ``"package.module:QualName"`` (matched by name, so the
            package is never imported).
        masks: mask name -> path of the submodule whose output is that mask (``""``: the
            module itself). Names mapped to one path take its calls in order (timm's
            ``CoordAttn`` gates its H and then its W map with one ``gate``).
        router: path of the submodule whose output is the router weights, or ``None``.
        num_branches: ``K`` of the router: a number or a function of the module.
        convert: path -> ``convert(submodule, inputs, output)`` giving the mask, or the
            router weights as ``(rows, K)``, from a call of that submodule (default: its
            output).
        applies: a predicate on the module (default: every instance).
        branch_names: labels of the branches: a tuple or a function of the module.
    """

    target: type | str
    masks: Mapping[str, str] = field(default_factory=dict)
    router: str | None = None
    num_branches: int | Callable[[nn.Module], int] | None = None
    convert: Mapping[str, Convert] = field(default_factory=dict)
    applies: Callable[[nn.Module], bool] | None = None
    branch_names: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] | None = None

    def matches(self, module: nn.Module) -> bool:
        if isinstance(self.target, type):
            hit = isinstance(module, self.target)
        else:
            hit = any(f"{c.__module__}:{c.__qualname__}" == self.target
                      for c in type(module).__mro__)
        return hit and (self.applies is None or bool(self.applies(module)))


_ADAPTERS: list[AttentionAdapter] = []


def register_attention_adapter(
    target: type | str,
    masks: Mapping[str, str] | None = None,
    router: str | None = None,
    num_branches: int | Callable[[nn.Module], int] | None = None,
    convert: Mapping[str, Convert] | None = None,
    applies: Callable[[nn.Module], bool] | None = None,
    branch_names: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] | None = None,
) -> AttentionAdapter:
    """Declare how ``target`` modules expose their masks and router weights (see
    :class:`AttentionAdapter`); the latest registration for a class wins.

    Example: a gate whose ``sigmoid`` submodule gives the mask::

        register_attention_adapter(MyGate, masks={"mask": "sigmoid"})
    """
    if not isinstance(target, (type, str)) or (isinstance(target, str) and ":" not in target):
        raise TypeError(
            f"target must be a module class or 'package.module:QualName', got {target!r}"
        )
    masks = dict(masks or {})
    if not masks and router is None:
        raise ValueError("an adapter needs masks={name: submodule path} or router=path")
    for name, path in masks.items():
        if not isinstance(name, str) or not name or not isinstance(path, str):
            raise TypeError(f"masks must map mask names to submodule paths, got {masks!r}")
    if router is not None and num_branches is None:
        raise ValueError("router=... needs num_branches (K of its weights)")
    adapter = AttentionAdapter(target, masks, router, num_branches, dict(convert or {}),
                               applies, branch_names)
    _ADAPTERS.insert(0, adapter)
    return adapter


class AdapterRecorder(RecordingMixin):
    """The recording of one adapted module: the protocol of our blocks, fed by hooks.

    Not a module: the adapted module's parameters, outputs and state dict stay its own.
    """

    def __init__(self, module: nn.Module, adapter: AttentionAdapter) -> None:
        self._module = weakref.ref(module)
        self.adapter = adapter
        self.mask_names = tuple(adapter.masks)
        k = adapter.num_branches
        self.num_branches = (k(module) if callable(k) else k) if adapter.router else None
        names = adapter.branch_names
        self.branch_names = names(module) if callable(names) else names
        self.training = module.training
        self._parts: dict[str, Any] = {}
        # path -> the names its calls fill, in call order; "<router>" for the router
        paths: dict[str, list[str]] = {}
        for name, path in adapter.masks.items():
            paths.setdefault(path, []).append(name)
        if adapter.router is not None:
            paths.setdefault(adapter.router, []).append("<router>")
        if len(paths) == 1 and len(next(iter(paths.values()))) == 1:
            # One part (a squeeze-excite gate, a router): it is the whole forward's record, one
            # hook instead of two (hooks cost on every step, recording or not).
            (path, (name,)), = paths.items()
            self._handles = [module.get_submodule(path).register_forward_hook(
                self._direct_hook(path, name))]
            return
        self._handles = [
            module.get_submodule(path).register_forward_hook(self._part_hook(path, names))
            for path, names in paths.items()
        ]
        self._handles.append(module.register_forward_hook(self._flush_hook))

    @property
    def module(self) -> nn.Module | None:
        return self._module()

    def __repr__(self) -> str:
        return f"AdapterRecorder({type(self.module).__name__})"

    def parameters(self, recurse: bool = True):
        module = self.module
        return iter(()) if module is None else module.parameters(recurse)

    def _direct_hook(self, path: str, name: str):
        convert = self.adapter.convert.get(path)

        def hook(submodule: nn.Module, inputs: tuple, output: Any) -> None:
            if not (self._attn_recording or self._attn_capture):
                return
            value = convert(submodule, inputs, output) if convert is not None else output
            if name == "<router>":
                self.record({}, value)
            else:
                self.record({name: value})

        return hook

    def _part_hook(self, path: str, names: list[str]):
        convert = self.adapter.convert.get(path)

        def hook(submodule: nn.Module, inputs: tuple, output: Any) -> None:
            if not (self._attn_recording or self._attn_capture):
                return
            value = convert(submodule, inputs, output) if convert is not None else output
            calls = self._parts.setdefault("<calls>", {})
            i = calls.get(path, 0)
            calls[path] = i + 1
            self._parts[names[min(i, len(names) - 1)]] = value

        return hook

    def _flush_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not (self._attn_recording or self._attn_capture):
            return
        parts, self._parts = self._parts, {}
        parts.pop("<calls>", None)
        router = parts.pop("<router>", None)
        self.record(parts, router)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear_recording(self) -> None:
        super().clear_recording()
        self.remove_hooks()
        module = self.module
        if module is not None and _RECORDERS.get(module) is self:
            del _RECORDERS[module]


_RECORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_declared(module: nn.Module) -> bool:
    """Whether an adapter is registered for ``module`` (nothing is attached)."""
    return module in _RECORDERS or any(a.matches(module) for a in _ADAPTERS)


def adapter_for(module: nn.Module) -> AdapterRecorder | None:
    """The recorder of ``module`` if an adapter is registered for it (made, and its hooks
    attached, on the first call; the same one until the diagnostics stop)."""
    recorder = _RECORDERS.get(module)
    if recorder is not None:
        return recorder
    for adapter in _ADAPTERS:
        if adapter.matches(module):
            recorder = AdapterRecorder(module, adapter)
            _RECORDERS[module] = recorder
            return recorder
    return None


# -- built-in adapters: timm and torchvision, by class name -------------------------------------


def _light_channel_mask(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    # timm's LightChannelAttn applies F.sigmoid inline: its mask is recomputed from its input
    # (only while recording).
    x = inputs[0]
    pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
    return torch.sigmoid(module.fc2(module.act(module.fc1(pooled))))


def _paths_router(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # SelectiveKernelAttn: (B, K, C, 1, 1) softmax over K -> one row per sample and channel
    k = output.shape[1]
    return output.flatten(2).transpose(1, 2).reshape(-1, k)


def _radix_router(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # RadixSoftmax: (B, radix * rest) laid out radix-major -> one row per sample and channel
    radix = module.radix
    return output.reshape(output.shape[0], radix, -1).transpose(1, 2).reshape(-1, radix)


_TIMM = "timm.layers"
for _name in (f"{_TIMM}.squeeze_excite:SEModule", f"{_TIMM}.squeeze_excite:EffectiveSEModule",
              f"{_TIMM}.squeeze_excite:SqueezeExciteCl",
              "timm.models._efficientnet_blocks:SqueezeExcite",
              f"{_TIMM}.eca:EcaModule", f"{_TIMM}.eca:CecaModule",
              f"{_TIMM}.gather_excite:GatherExcite"):
    register_attention_adapter(_name, masks={"mask": "gate"})
register_attention_adapter(f"{_TIMM}.cbam:CbamModule",
                           masks={"channel": "channel.gate", "spatial": "spatial.gate"})
register_attention_adapter(f"{_TIMM}.cbam:LightCbamModule",
                           masks={"channel": "channel", "spatial": "spatial.gate"},
                           convert={"channel": _light_channel_mask})
register_attention_adapter(f"{_TIMM}.coord_attn:CoordAttn",
                           masks={"mask_h": "gate", "mask_w": "gate"})
register_attention_adapter(
    f"{_TIMM}.selective_kernel:SelectiveKernel", router="attn",
    num_branches=lambda m: m.num_paths, convert={"attn": _paths_router},
    branch_names=lambda m: tuple(
        f"{p.conv.kernel_size[0]}x{p.conv.kernel_size[0]} d{p.conv.dilation[0]}"
        if hasattr(p, "conv") else f"path {i}" for i, p in enumerate(m.paths)),
)
register_attention_adapter(f"{_TIMM}.split_attn:SplitAttn", router="rsoftmax",
                           num_branches=lambda m: m.radix, convert={"rsoftmax": _radix_router},
                           applies=lambda m: m.radix > 1)
register_attention_adapter(f"{_TIMM}.split_attn:SplitAttn", masks={"mask": "rsoftmax"},
                           applies=lambda m: m.radix == 1)
register_attention_adapter("torchvision.ops.misc:SqueezeExcitation",
                           masks={"mask": "scale_activation"})
del _name
