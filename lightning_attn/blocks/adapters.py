"""Adapters: the attention already in users' models records, without a change to its code.

A module that does not call :meth:`~.recording.RecordingMixin.record` itself (timm's
``SEModule``, torchvision's ``SqueezeExcitation``, a user's gate) joins the diagnostics
through an adapter: a declaration of which submodule's output is a mask or the router
weights, passed where it applies or registered for the process::

    gate = attention_adapter(MyGate, masks={"mask": "sigmoid"})
    AttentionDiagnostics(adapters=[gate])                              # this callback
    register_attention_adapter(MyGate, masks={"mask": "sigmoid"})      # every discovery

When the diagnostics find such a module they attach an :class:`AdapterRecorder`: forward
hooks on the named submodules hand their outputs to it, and a hook on the module itself
records them as one forward, through the same accumulator as our own blocks (compile-safe:
the hooks read the same two flags, and do nothing else while recording is off). The module's
outputs and state dict are untouched; the hooks are removed when the diagnostics stop. They
record for the module they were attached to only: a copy of it (``copy.deepcopy``, an EMA, a
pickle) gets inert hooks, a forward rerun by activation checkpointing records nothing, and a
hooked submodule the model shares with other modules gives only the calls made inside its
module's forward.

The built-in adapters (timm's ``SEModule``, ``EffectiveSEModule``, ``SqueezeExciteCl``,
EfficientNet's ``SqueezeExcite``, ``EcaModule``, ``CecaModule``, ``CbamModule``,
``LightCbamModule``, ``GatherExcite``, ``CoordAttn``, ``SimpleCoordAttn``,
``EfficientLocalAttn``, ``StripAttn``, ``BatNonLocalAttn``, ``SelectiveKernel``,
``SplitAttn``, the legacy SENet's ``SEModule``, PP-HGNet's ``EseModule``, GhostNetV2/V3's DFC
gate, and torchvision's ``SqueezeExcitation``) match by class *name*: nothing is imported,
and a model without such modules never touches timm or torchvision. They are an immutable tuple
(:data:`BUILTIN_ADAPTERS`); a registration returns the handle that undoes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .recording import RecordingMixin, recomputing

__all__ = [
    "BUILTIN_ADAPTERS",
    "AdapterRecorder",
    "AttentionAdapter",
    "Registration",
    "adapter_matching",
    "adapters_in_force",
    "attention_adapter",
    "check_adapters",
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
            hit = is_instance_by_name(module, self.target)
        return hit and (self.applies is None or bool(self.applies(module)))


def is_instance_by_name(obj: object, target: str) -> bool:
    """``isinstance`` for a class named ``"package.module:QualName"``, without importing it."""
    return any(f"{c.__module__}:{c.__qualname__}" == target for c in type(obj).__mro__)


def attention_adapter(
    target: type | str,
    masks: Mapping[str, str] | None = None,
    router: str | None = None,
    num_branches: int | Callable[[nn.Module], int] | None = None,
    convert: Mapping[str, Convert] | None = None,
    applies: Callable[[nn.Module], bool] | None = None,
    branch_names: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] | None = None,
) -> AttentionAdapter:
    """A checked :class:`AttentionAdapter`: how ``target`` modules expose their masks and
    router weights. Pass it where it applies (``AttentionDiagnostics(adapters=[...])``,
    ``find_attention_blocks(..., adapters=[...])``) or register it for the whole process
    (:func:`register_attention_adapter`)."""
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
    return AttentionAdapter(target, masks, router, num_branches, dict(convert or {}),
                            applies, branch_names)


class Registration:
    """What :func:`register_attention_adapter` returns: :meth:`remove` undoes the
    registration (also as a context manager: ``with register_attention_adapter(...):``)."""

    def __init__(self, adapter: AttentionAdapter, registry: list[AttentionAdapter]) -> None:
        self.adapter = adapter
        self._registry = registry

    def remove(self) -> None:
        """Forget the adapter (a second call does nothing)."""
        if self.adapter in self._registry:
            self._registry.remove(self.adapter)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


#: The adapters registered for the whole process, latest first (each with its handle).
_registered: list[AttentionAdapter] = []


def register_attention_adapter(
    target: type | str | AttentionAdapter, **declaration: Any
) -> Registration:
    """Use an adapter in every discovery of this process, before the built-in ones (the
    latest registration for a class wins): an :class:`AttentionAdapter`, or
    :func:`attention_adapter`'s arguments. Returns the handle that undoes it.

    Example: a gate whose ``sigmoid`` submodule gives the mask::

        register_attention_adapter(MyGate, masks={"mask": "sigmoid"})
    """
    adapter = target if isinstance(target, AttentionAdapter) and not declaration else (
        attention_adapter(target, **declaration))
    _registered.insert(0, adapter)
    return Registration(adapter, _registered)


def check_adapters(adapters: Iterable[AttentionAdapter]) -> tuple[AttentionAdapter, ...]:
    """``adapters`` as a tuple, each an :class:`AttentionAdapter`, or a ``TypeError``."""
    adapters = tuple(adapters)
    for adapter in adapters:
        if not isinstance(adapter, AttentionAdapter):
            raise TypeError(
                "adapters must be AttentionAdapter declarations (attention_adapter(...)), got "
                f"{adapter!r}"
            )
    return adapters


def adapters_in_force(extra: Iterable[AttentionAdapter] = ()) -> tuple[AttentionAdapter, ...]:
    """The adapters a discovery tries, in order: ``extra`` (passed for one call or callback),
    the registered ones (latest first), then :data:`BUILTIN_ADAPTERS`."""
    return (*check_adapters(extra), *_registered, *BUILTIN_ADAPTERS)


def adapter_matching(
    module: nn.Module, adapters: Iterable[AttentionAdapter]
) -> AttentionAdapter | None:
    """The first of ``adapters`` that applies to ``module``, else ``None``."""
    return next((a for a in adapters if a.matches(module)), None)


class _AttachedHook:
    """A hook of an :class:`AdapterRecorder`, for the module it was attached to only: calls
    ``fn`` while the recorder records or captures.

    A copy of that module (``copy.deepcopy``: an EMA such as timm's ``ModelEmaV3``,
    ``torch.optim.swa_utils.AveragedModel``, a snapshot; or a pickle) gets a
    :class:`_CopiedHook` in its place: the copy's forwards never reach this recorder.
    """

    __slots__ = ("fn", "id", "recorder")

    def __init__(self, recorder: AdapterRecorder, fn: Callable[..., None]) -> None:
        self.recorder, self.fn = recorder, fn
        self.id: int | None = None  # the handle's id, set when attached

    def __call__(self, module: nn.Module, *args: Any) -> None:
        recorder = self.recorder
        if recorder._attn_recording or recorder._attn_capture:  # all a step not logging costs
            self.fn(module, *args)

    def __deepcopy__(self, memo: dict) -> _CopiedHook:
        return _CopiedHook(self.id)

    def __reduce__(self) -> tuple:
        return (_CopiedHook, (self.id,))


class _CopiedHook:
    """What a copy of a hooked module holds where the original holds an
    :class:`_AttachedHook`: nothing is recorded, and (eager) it removes itself from the copy
    the first time it runs."""

    def __init__(self, id: int | None) -> None:
        self.id = id

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if torch.compiler.is_compiling():
            return  # a no-op in the graph; the eager forwards remove it
        for hooks in (module._forward_hooks, module._forward_pre_hooks,
                      module._forward_hooks_always_called, module._forward_hooks_with_kwargs):
            if hooks.get(self.id) is self or isinstance(hooks.get(self.id), bool):
                del hooks[self.id]


def _attach(recorder: AdapterRecorder, target: nn.Module, fn: Callable[..., None],
            pre: bool = False, always: bool = False) -> RemovableHandle:
    hook = _AttachedHook(recorder, fn)
    handle = (target.register_forward_pre_hook(hook) if pre
              else target.register_forward_hook(hook, always_call=always))
    hook.id = handle.id
    return handle


def hooked_paths(adapter: AttentionAdapter) -> dict[str, list[str]]:
    """Submodule path -> the names its calls fill, in call order (``"<router>"``: the router
    weights); ``""`` is the adapted module itself."""
    paths: dict[str, list[str]] = {}
    for name, path in adapter.masks.items():
        paths.setdefault(path, []).append(name)
    if adapter.router is not None:
        paths.setdefault(adapter.router, []).append("<router>")
    return paths


class AdapterRecorder(RecordingMixin):
    """The recording of one adapted module: the protocol of our blocks, fed by hooks.

    Not a module: the adapted module's parameters, outputs and state dict stay its own.

    Args:
        module: the adapted module.
        adapter: its declaration.
        scoped: the hooked submodules also run outside ``module`` (a submodule shared with
            another module): take only the calls made inside ``module``'s forward (one more
            hook, a pre-hook on ``module``). :func:`~.discovery.find_attention_blocks` sets it
            where the model holds a hooked submodule under two names.

    A forward recorded is one call of ``module`` (``k`` calls in one step: ``k`` forwards);
    a forward run again for recomputation (activation checkpointing) records nothing; a
    copy of ``module`` records nothing (:class:`_AttachedHook`).
    """

    def __init__(self, module: nn.Module, adapter: AttentionAdapter, scoped: bool = False) -> None:
        self._module = weakref.ref(module)
        self.adapter = adapter
        self.mask_names = tuple(adapter.masks)
        k = adapter.num_branches
        self.num_branches = (k(module) if callable(k) else k) if adapter.router else None
        names = adapter.branch_names
        self.branch_names = names(module) if callable(names) else names
        self.training = module.training
        self.scoped = scoped
        self._parts: dict[str, Any] = {}
        self._inside = False  # scoped: a forward of the module is running
        paths = hooked_paths(adapter)
        if len(paths) == 1 and len(next(iter(paths.values()))) == 1 and not scoped:
            # One part (a squeeze-excite gate, a router): it is the whole forward's record, one
            # hook instead of two (hooks cost on every step, recording or not).
            (path, (name,)), = paths.items()
            self._handles = [_attach(self, module.get_submodule(path),
                                     self._direct_hook(path, name))]
            return
        self._handles = [
            _attach(self, module.get_submodule(path), self._part_hook(path, names))
            for path, names in paths.items()
        ]
        if scoped:
            self._handles.append(_attach(self, module, self._enter_hook, pre=True))
        # always_call: a forward that raises still ends the record (no part left behind)
        self._handles.append(_attach(self, module, self._flush_hook, always=True))

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
            if recomputing():
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
            if recomputing() or (self.scoped and not self._inside):
                return
            value = convert(submodule, inputs, output) if convert is not None else output
            calls = self._parts.setdefault("<calls>", {})
            i = calls.get(path, 0)
            calls[path] = i + 1
            self._parts[names[min(i, len(names) - 1)]] = value

        return hook

    def _enter_hook(self, module: nn.Module, inputs: tuple) -> None:
        self._inside = True

    def _flush_hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self._inside = False
        parts, self._parts = self._parts, {}
        if output is None or recomputing():
            return  # the forward raised (an always-called hook gets no output), or reruns
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


def _bilinear_gate(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # timm's BilinearAttnTransform applies .sigmoid() inline to conv_p / conv_q's output (then
    # normalises each row to sum 1): the gate is recomputed from that output (while recording).
    return output.sigmoid()


_TIMM = "timm.layers"
_SE_GATES = (f"{_TIMM}.squeeze_excite:SEModule", f"{_TIMM}.squeeze_excite:EffectiveSEModule",
             f"{_TIMM}.squeeze_excite:SqueezeExciteCl",
             "timm.models._efficientnet_blocks:SqueezeExcite",
             f"{_TIMM}.eca:EcaModule", f"{_TIMM}.eca:CecaModule",
             f"{_TIMM}.gather_excite:GatherExcite")

#: timm's and torchvision's attention, by class name (nothing is imported). Immutable: add
#: your own with ``adapters=[attention_adapter(...)]`` or :func:`register_attention_adapter`.
BUILTIN_ADAPTERS: tuple[AttentionAdapter, ...] = (
    *(attention_adapter(name, masks={"mask": "gate"}) for name in _SE_GATES),
    attention_adapter(f"{_TIMM}.cbam:CbamModule",
                      masks={"channel": "channel.gate", "spatial": "spatial.gate"}),
    attention_adapter(f"{_TIMM}.cbam:LightCbamModule",
                      masks={"channel": "channel", "spatial": "spatial.gate"},
                      convert={"channel": _light_channel_mask}),
    attention_adapter(f"{_TIMM}.coord_attn:CoordAttn", masks={"mask_h": "gate", "mask_w": "gate"}),
    attention_adapter(
        f"{_TIMM}.selective_kernel:SelectiveKernel", router="attn",
        num_branches=lambda m: m.num_paths, convert={"attn": _paths_router},
        branch_names=lambda m: tuple(
            f"{p.conv.kernel_size[0]}x{p.conv.kernel_size[0]} d{p.conv.dilation[0]}"
            if hasattr(p, "conv") else f"path {i}" for i, p in enumerate(m.paths)),
    ),
    attention_adapter(f"{_TIMM}.split_attn:SplitAttn", router="rsoftmax",
                      num_branches=lambda m: m.radix, convert={"rsoftmax": _radix_router},
                      applies=lambda m: m.radix > 1),
    attention_adapter(f"{_TIMM}.split_attn:SplitAttn", masks={"mask": "rsoftmax"},
                      applies=lambda m: m.radix == 1),
    attention_adapter("torchvision.ops.misc:SqueezeExcitation", masks={"mask": "scale_activation"}),
    # timm's strip-pooling gates (attn_layer "scoord", "ela", "strip")
    attention_adapter(f"{_TIMM}.coord_attn:SimpleCoordAttn", masks={"mask": "gate"}),
    attention_adapter(f"{_TIMM}.coord_attn:EfficientLocalAttn",
                      masks={"mask_h": "gate", "mask_w": "gate"}),
    attention_adapter(f"{_TIMM}.coord_attn:StripAttn", masks={"mask": "gate"}),
    # BAT ("bat"): the sigmoid gates of its row and column transforms, before normalisation
    attention_adapter(f"{_TIMM}.non_local_attn:BatNonLocalAttn",
                      masks={"mask_h": "ba.conv_p", "mask_w": "ba.conv_q"},
                      convert={"ba.conv_p": _bilinear_gate, "ba.conv_q": _bilinear_gate}),
    # the legacy SENet's own SEModule, PP-HGNet's ESE, GhostNetV2/V3's DFC attention
    attention_adapter("timm.models.senet:SEModule", masks={"mask": "sigmoid"}),
    attention_adapter("timm.models.hgnet:EseModule", masks={"mask": "sigmoid"}),
    attention_adapter("timm.models.ghostnet:GhostModuleV2", masks={"mask": "gate_fn"}),
    attention_adapter("timm.models.ghostnet:GhostModuleV3", masks={"mask": "gate_fn"},
                      applies=lambda m: m.mode == "shortcut"),
)
