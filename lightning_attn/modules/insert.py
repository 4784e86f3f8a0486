"""``insert_attention``: put attention blocks after named submodules of any ``nn.Module``,
keeping every existing state-dict key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lightning_attn.blocks import attention_names, create_attention

from .wrappers import first_tensor

__all__ = ["infer_out_channels", "insert_attention", "inserted_attention", "remove_attention"]

_CHANNEL_ATTRS = ("out_channels", "num_features")
# Modules whose children are run (or iterated by their parent) in registration order: a block
# registered in one of them would run as one more layer, so it never hosts a block.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SUFFIX = "_attn"
_SELF_HOSTED = "output_attn"


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


def _output_shapes(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor
) -> dict[str, tuple[int, ...] | str]:
    """Shape of each named submodule's output (the type's name when it is not a tensor: the
    block would receive it as it is) on one ``eval``/no-grad pass of the model; names never
    called are absent."""
    seen: dict[str, tuple[int, ...] | str] = {}
    handles = []
    for name in names:

        def hook(_mod, _inp, out, name=name):
            seen[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(example_input)
            except Exception as err:  # the model's own error, said to be about example_input
                shape = (
                    tuple(example_input.shape) if isinstance(example_input, torch.Tensor)
                    else type(example_input).__name__
                )
                raise ValueError(
                    f"example_input ({shape}) failed in a forward pass of "
                    f"{type(model).__name__}: {type(err).__name__}: {err}"
                ) from err
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def _feature_map_channels(name: str, shape: tuple[int, ...] | str | None) -> int:
    """``C`` of a ``(B, C, H, W)`` output shape, or a ``ValueError`` saying what was seen."""
    if shape is None:
        raise ValueError(
            f"{name!r} was not called during the forward pass of example_input, so no "
            "attention block after it would ever run"
        )
    if isinstance(shape, str) or len(shape) != 4:
        seen = f"an output of type {shape}" if isinstance(shape, str) else f"shape {shape}"
        raise ValueError(
            f"the output of {name!r} is not a 4-D (B, C, H, W) feature map: got {seen} on "
            "example_input; attention blocks go after convolutional stages"
        )
    return shape[1]


def infer_out_channels(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor | None = None
) -> dict[str, int]:
    """Output channels of each named submodule.

    With ``example_input``: dim 1 of each output on one ``eval``/no-grad forward of ``model``
    (forward hooks, removed afterwards; train/eval mode restored); an output that is not a
    4-D ``(B, C, H, W)`` map, or a submodule the pass never calls, is a ``ValueError``.

    Without it, in this order of evidence:

    1. the submodule's own ``out_channels`` (convolutions) or ``num_features`` (norms);
    2. the ``out_channels``/``num_features`` of its last submodule (registration order) that
       has one: right for plain conv stacks and ResNet-style blocks whose last registered
       layer is the last norm, wrong for blocks that register a side branch last with a
       different width; pass ``example_input`` or ``channels`` for those.

    Raises ``ValueError`` for a submodule where none of these applies.
    """
    if example_input is not None:
        shapes = _output_shapes(model, names, example_input)
        return {name: _feature_map_channels(name, shapes.get(name)) for name in names}
    out: dict[str, int] = {}
    for name in names:
        module = model.get_submodule(name)
        c = _own_channels(module) or _last_channels(module)
        if c is None:
            raise ValueError(
                f"cannot infer the output channels of {name!r} ({type(module).__name__}): "
                f"pass example_input=<a batch> or channels={{{name!r}: C}}"
            )
        out[name] = c
    return out


class _ApplyAttention:
    """The forward hook :func:`insert_attention` puts on a target: ``output -> y`` of the
    block registered as ``host.<attr>``.

    The block is looked up on every call (not held), so the hook always runs the block the
    model's state dict holds and says so clearly when it was deleted. A plain class (not a
    closure) so that models pickle and deep-copy with their hooks (``deepcopy`` maps
    ``host`` to the copy's own module).
    """

    def __init__(self, host: nn.Module, attr: str, target: str) -> None:
        self.host = host
        self.attr = attr
        self.target = target

    def block(self) -> nn.Module | None:
        return self.host._modules.get(self.attr)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        block = self.block()
        if block is None:
            raise RuntimeError(
                f"the attention block {self.attr!r} inserted after {self.target!r} was removed "
                f"from {type(self.host).__name__}; take the insertion out with "
                f"remove_attention(model, [{self.target!r}])"
            )
        return first_tensor(block(output))


def _like(block: nn.Module, model: nn.Module, target: str, kwargs: Mapping) -> nn.Module:
    """``block`` in the model's train/eval mode, on the target's device and in its floating
    dtype (unless ``device`` / ``dtype`` were given): a new module is in training mode on the
    CPU in float32, which in a CUDA, bf16 or eval-mode model would fail at the first forward
    or normalise with batch statistics."""
    block.train(model.training)
    module = model.get_submodule(target)
    tensors = [*module.parameters(), *module.buffers()] or [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    if tensors and "device" not in kwargs:
        block.to(device=tensors[0].device)
    if floats and "dtype" not in kwargs:
        block.to(dtype=floats[0].dtype)
    return block


def _hooks_of(module: nn.Module) -> dict[int, _ApplyAttention]:
    return {k: h for k, h in module._forward_hooks.items() if isinstance(h, _ApplyAttention)}


def _host(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    """Where the block after ``target`` is registered, and its attribute name there.

    The nearest ancestor of ``target`` that is not an ``nn.Sequential`` / ``ModuleList`` /
    ``ModuleDict`` holds it as ``<target path below it, dots as underscores>_attn``
    (``layer1`` -> ``layer1_attn`` on the model, ``layer1.0.conv1`` -> ``layer1.0.conv1_attn``
    in the residual block); with only containers above (an ``nn.Sequential`` model), the
    target itself holds it as ``output_attn``; when the target is a container too (a stage
    of a timm ``features_only`` model), the first plain module down its last children holds
    it as ``<target path, dots as underscores>_attn`` (``layer1`` -> ``layer1.1.layer1_attn``).
    """
    parts = target.split(".")
    for i in range(len(parts) - 1, -1, -1):
        host = model.get_submodule(".".join(parts[:i]))
        if not isinstance(host, _CONTAINERS):
            return host, "_".join(parts[i:]) + _SUFFIX
    module = model.get_submodule(target)
    if not isinstance(module, _CONTAINERS):
        return module, _SELF_HOSTED
    # A container inside containers only (a stage of timm's features_only FeatureListNet or
    # torchvision's IntermediateLayerGetter, both ModuleDicts that run every child): the
    # first plain module down its chain of last children holds the block, named after the
    # target. Only where the block is stored changes; the hook still runs it after target.
    inner = module
    while isinstance(inner, _CONTAINERS) and len(inner._modules):
        inner = list(inner._modules.values())[-1]
    if not isinstance(inner, _CONTAINERS):
        return inner, target.replace(".", "_") + _SUFFIX
    raise ValueError(
        f"cannot insert attention after {target!r}: it and every module above it are "
        "nn.Sequential / ModuleList / ModuleDict containers, which would run a block "
        "registered in them as one more layer, and it holds no plain module that could; "
        "hold the model in a plain nn.Module"
    )


def _check_names(model: nn.Module, after: Sequence[str], argument: str = "after") -> list[str]:
    if isinstance(after, str) or not isinstance(after, Sequence) or not after:
        raise TypeError(f"{argument} must be a non-empty list of submodule names, got {after!r}")
    valid = {name for name, _ in model.named_modules() if name}
    for name in after:
        if name not in valid:
            some = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:20]
            raise ValueError(
                f"{type(model).__name__} has no submodule named {name!r}; "
                f"some valid names: {some}"
            )
    if len(set(after)) != len(after):
        raise ValueError(f"{argument} names a submodule twice: {list(after)}")
    return list(after)


def _check_channels(
    names: list[str], channels: int | Mapping[str, int] | None
) -> dict[str, int]:
    if channels is None:
        return {}
    if isinstance(channels, bool) or not isinstance(channels, (int, Mapping)):
        raise TypeError(f"channels must be an int, a dict name -> int or None, got {channels!r}")
    if isinstance(channels, int):
        return dict.fromkeys(names, channels)
    unknown = sorted(set(channels) - set(names))
    if unknown:
        raise ValueError(f"channels names {unknown}, which are not in after={names}")
    return dict(channels)


def insert_attention(
    model: nn.Module,
    after: Sequence[str],
    name: str = "dsa",
    *,
    channels: int | Mapping[str, int] | None = None,
    example_input: torch.Tensor | None = None,
    **kwargs,
) -> nn.Module:
    """Insert an attention block after each submodule named in ``after`` (in place), keeping
    every existing parameter and buffer name.

    After the call ``model`` computes ``y = block(m(x))`` wherever a named submodule ``m`` was
    called (only ``y`` travels on; DSA's mask is dropped). Example, with a pretrained
    torchvision ResNet::

        model = resnet18(weights=ResNet18_Weights.DEFAULT)
        insert_attention(model, after=["layer1", "layer2", "layer3"], name="dsa")
        # model.layer1_attn, model.layer2_attn, model.layer3_attn are the new blocks

    How: ``m`` gets a forward hook that passes its output through the block; the block is
    registered beside ``m`` in the nearest enclosing module that is not an ``nn.Sequential``
    / ``ModuleList`` / ``ModuleDict`` (those would run it as one more layer), as
    ``<path of m below it, dots as underscores>_attn``: ``layer1`` -> ``layer1_attn``,
    ``stages.2`` -> ``stages_2_attn``, ``layer1.0.conv1`` -> ``layer1.0.conv1_attn``; in a
    model that is an ``nn.Sequential`` down to ``m``, ``m`` itself holds it as
    ``output_attn``; in a model made of containers only (timm's ``features_only=True``
    ``FeatureListNet``, a ``ModuleDict``), the block after a stage ``layer1`` lives in that
    stage's last plain module as ``layer1.1.layer1_attn``. So a state dict saved before the
    insertion loads after it with
    ``strict=False`` (only the blocks' keys missing, none unexpected), one saved after it
    loads into a fresh model after the same insertion with ``strict=True``, the blocks show
    in ``named_modules()`` (the diagnostics find them), and ``torch.compile``, ``deepcopy``,
    pickling and DDP see an ordinary module. ``nn.DataParallel`` replicas and
    ``torch.fx`` tracing do not run the hooks; :func:`remove_attention` undoes an insertion.

    Args:
        model: any ``nn.Module`` whose named submodules output ``(B, C, H, W)`` features.
        after: dotted submodule names as in ``model.named_modules()``.
        name: block name for :func:`~lightning_attn.create_attention` (``"dsa"``,
            ``"coord"``, ``"none"``).
        channels: ``C`` for every block (an int) or per name (a dict); otherwise inferred
            by :func:`infer_out_channels`.
        example_input: a batch for one ``eval``/no-grad pass that reads (and checks) each
            output's shape; a non-4-D output is a ``ValueError`` naming its shape, and so is
            an error of the model on it.
        **kwargs: the block's constructor arguments.

    Each block is made like its target: on its device, in its floating dtype (unless
    ``device=`` / ``dtype=`` are given) and in the model's train/eval mode.

    Returns ``model`` itself (modified in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or name not in attention_names():
        raise ValueError(f"unknown attention {name!r}; known names: {attention_names()}")
    names = _check_names(model, after)
    given = _check_channels(names, channels)
    hosts = {}
    for target in names:
        existing = _hooks_of(model.get_submodule(target))
        if existing:
            (hook,) = existing.values()
            raise ValueError(
                f"{target!r} already has attention inserted after it ({hook.attr!r} in "
                f"{type(hook.host).__name__}); call remove_attention(model, [{target!r}]) "
                "first to replace it"
            )
        host, attr = _host(model, target)
        if hasattr(host, attr):
            raise ValueError(
                f"cannot insert attention after {target!r}: {type(host).__name__} already "
                f"has an attribute {attr!r}"
            )
        hosts[target] = (host, attr)
    if example_input is not None:
        seen = infer_out_channels(model, names, example_input)
        for target, c in given.items():
            if c != seen[target]:
                raise ValueError(
                    f"channels[{target!r}]={c} but the output of {target!r} on example_input "
                    f"has {seen[target]} channels"
                )
        chans = {**seen, **given}
    else:
        todo = [n for n in names if n not in given]
        chans = {**given, **(infer_out_channels(model, todo) if todo else {})}
    # Build every block before changing the model, so a bad keyword leaves it untouched. A
    # block takes the model's train/eval mode: a new module is in training mode, which in a
    # model set to eval would normalise with batch statistics (and update running ones).
    blocks = {
        target: _like(create_attention(name, chans[target], **kwargs), model, target, kwargs)
        for target in names
    }
    for target, (host, attr) in hosts.items():
        host.add_module(attr, blocks[target])
        model.get_submodule(target).register_forward_hook(_ApplyAttention(host, attr, target))
    return model


def inserted_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Target name -> block, for every block :func:`insert_attention` put into ``model``."""
    out = {}
    for target, module in model.named_modules():
        for hook in _hooks_of(module).values():
            block = hook.block()
            if block is not None:
                out[target] = block
    return out


def remove_attention(model: nn.Module, after: Sequence[str] | None = None) -> nn.Module:
    """Undo :func:`insert_attention` after the named submodules (all of them when ``None``):
    the hooks and the blocks go, the model computes what it did before. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if after is None:
        after = [n for n, m in model.named_modules() if _hooks_of(m)]
        if not after:
            return model
    for target in _check_names(model, after):
        if not _hooks_of(model.get_submodule(target)):
            raise ValueError(
                f"no attention was inserted after {target!r}; inserted after: "
                f"{[n for n, m in model.named_modules() if _hooks_of(m)]}"
            )
    for target in after:
        module = model.get_submodule(target)
        for key, hook in _hooks_of(module).items():
            del module._forward_hooks[key]
            if hook.attr in hook.host._modules:
                delattr(hook.host, hook.attr)
    return model
