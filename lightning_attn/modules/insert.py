"""``insert_attention``: put attention blocks after named submodules of any ``nn.Module``,
keeping every existing state-dict key."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


#: The two layouts of a 4-D feature map, in timm's names (``output_fmt``): channels at dim 1
#: (convolutional stages) or last (timm's and torchvision's Swin stages, token MLPs).
LAYOUTS = ("NCHW", "NHWC")


def _width(module: nn.Module) -> tuple[int, int] | None:
    """``(width, dim)`` a module's output carries its width in, when it says so: 1 for
    convolutions and the norms of ``(B, C, H, W)`` maps (``out_channels``, ``num_features``,
    ``num_channels``), 3 for linear layers and LayerNorm, which act on the last dim
    (``out_features``, ``normalized_shape``; a ``...2d`` norm such as timm's ``LayerNorm2d``
    normalises dim 1)."""
    for attr, dim in (("out_channels", 1), ("num_features", 1), ("num_channels", 1),
                      ("out_features", 3)):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, dim
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0], 1 if type(module).__name__.endswith("2d") else 3
    return None


class _FeatureMap:
    """What one example pass saw of a target: its output's shape (or type's name) and, for
    each of its submodules that ran and declares a width, ``(width, dim, output shape)``."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | str | None = None
        self.widths: list[tuple[int, int, tuple[int, ...]]] = []

    def layout(self, name: str) -> str:
        """``"NHWC"`` when the submodules whose output has the target's shape put their width
        in the last dim, ``"NCHW"`` when they put it in dim 1 or none says (the convention);
        a ``ValueError`` when they disagree."""
        dims = set()
        for width, prior, shape in self.widths:
            if shape == self.shape:
                found = {d for d in (1, 3) if shape[d] == width}
                dims |= {prior} if len(found) == 2 else found  # C == W: the module's own dim
        if dims == {1, 3}:
            raise ValueError(
                f"cannot tell the layout of the output of {name!r} (shape {self.shape}): its "
                "submodules give channels both in dim 1 (B, C, H, W) and in the last dim "
                "(B, H, W, C); pass output_fmt='NCHW' or 'NHWC'"
            )
        return "NHWC" if dims == {3} else "NCHW"


def _feature_maps(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor
) -> dict[str, _FeatureMap]:
    """What each named submodule outputs (its shape, or its type's name when it is not a
    tensor: the block would receive it as it is) on one ``eval``/no-grad pass of the model,
    with the widths its submodules declare; names never called keep ``shape=None``."""
    seen = {name: _FeatureMap() for name in names}
    handles = []
    for name in names:

        def output(_mod, _inp, out, name=name):
            seen[name].shape = (
                tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__)

        def width(mod, _inp, out, name=name):
            declared = _width(mod)
            if declared is not None and isinstance(out, torch.Tensor) and out.dim() == 4:
                seen[name].widths.append((*declared, tuple(out.shape)))

        target = model.get_submodule(name)
        handles.append(target.register_forward_hook(output))
        handles += [m.register_forward_hook(width) for m in target.modules()]
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


def _check_feature_map(name: str, shape: tuple[int, ...] | str | None) -> None:
    """A ``ValueError`` unless ``shape`` is that of a 4-D feature map."""
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


def _check_output_fmt(
    names: list[str], output_fmt: str | Mapping[str, str] | None
) -> dict[str, str]:
    if output_fmt is None:
        return {}
    if isinstance(output_fmt, str):
        output_fmt = dict.fromkeys(names, output_fmt)
    if not isinstance(output_fmt, Mapping):
        raise TypeError(
            f"output_fmt must be 'NCHW', 'NHWC', a dict name -> one of them, or None, got "
            f"{output_fmt!r}"
        )
    unknown = sorted(set(output_fmt) - set(names))
    if unknown:
        raise ValueError(f"output_fmt names {unknown}, which are not in after={names}")
    for fmt in output_fmt.values():
        if fmt not in LAYOUTS:
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {fmt!r}")
    return dict(output_fmt)


def _layouts(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor,
    given: Mapping[str, str],
) -> dict[str, tuple[int, str]]:
    """``(C, layout)`` of each named submodule's output on ``example_input``: the layout in
    ``given``, else read from its submodules (:meth:`_FeatureMap.layout`)."""
    out = {}
    for name, seen in _feature_maps(model, names, example_input).items():
        _check_feature_map(name, seen.shape)
        layout = given.get(name) or seen.layout(name)
        out[name] = (seen.shape[3] if layout == "NHWC" else seen.shape[1], layout)
    return out


def infer_out_channels(
    model: nn.Module, names: Sequence[str], example_input: torch.Tensor | None = None
) -> dict[str, int]:
    """Output channels of each named submodule.

    With ``example_input``: ``C`` of each output on one ``eval``/no-grad forward of ``model``
    (forward hooks, removed afterwards; train/eval mode restored): dim 1, or the last dim of
    a channels-last ``(B, H, W, C)`` output (a Swin stage; see :func:`insert_attention`). An
    output that is not 4-D, or a submodule the pass never calls, is a ``ValueError``.

    Without it, in this order of evidence:

    1. the submodule's own ``out_channels`` (convolutions) or ``num_features`` (norms);
    2. the ``out_channels``/``num_features`` of its last submodule (registration order) that
       has one: right for plain conv stacks and ResNet-style blocks whose last registered
       layer is the last norm, wrong for blocks that register a side branch last with a
       different width; pass ``example_input`` or ``channels`` for those.

    Raises ``ValueError`` for a submodule where none of these applies.
    """
    if example_input is not None:
        return {n: c for n, (c, _) in _layouts(model, names, example_input, {}).items()}
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
    block registered as ``host.<attr>``, permuted around the block when the target's output
    is channels-last (``layout="NHWC"``: the block sees ``(B, C, H, W)``).

    The block is looked up on every call (not held), so the hook always runs the block the
    model's state dict holds and says so clearly when it was deleted. A plain class (not a
    closure) so that models pickle and deep-copy with their hooks (``deepcopy`` maps
    ``host`` to the copy's own module).
    """

    # Class-level defaults: a hook pickled before these existed reads channels-first.
    channels: int | None = None
    layout: str = "NCHW"

    def __init__(
        self, host: nn.Module, attr: str, target: str, channels: int | None = None,
        layout: str = "NCHW",
    ) -> None:
        self.host = host
        self.attr = attr
        self.target = target
        self.channels = channels
        self.layout = layout

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
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            return first_tensor(block(output))  # the block says what it expected
        self._check_layout(output)
        if self.layout == "NHWC":
            y = first_tensor(block(output.permute(0, 3, 1, 2)))
            return y.permute(0, 2, 3, 1).contiguous()
        return first_tensor(block(output))

    def _check_layout(self, output: torch.Tensor) -> None:
        """A ``ValueError`` naming the layout when ``output`` does not carry the block's
        channels where its layout says (a wrong channel count in the right place is the
        block's to report, as for a block built by hand)."""
        c, shape = self.channels, tuple(output.shape)
        if c is None:
            return
        if self.layout == "NCHW" and shape[1] != c and shape[3] == c:
            seen, fix = "channels-last, (B, H, W, C)", "NHWC"
        elif self.layout == "NHWC" and shape[3] != c:
            seen = "channels-first, (B, C, H, W)" if shape[1] == c else f"to hold no C={c}"
            fix = "NCHW"
        else:
            return
        raise ValueError(
            f"the output of {self.target!r} has shape {shape}: it looks {seen}, but the block "
            f"{self.attr!r} after it was inserted for an {self.layout} map with C={c}; insert "
            f"it again with example_input (which reads the layout) or output_fmt={fix!r}"
        )


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
    output_fmt: str | Mapping[str, str] | None = None,
    factories: Mapping[str, Callable[..., nn.Module]] | None = None,
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
        name: block name for :func:`~lightning_attn.blocks.create_attention` (``"dsa"``,
            ``"coord"``, ``"none"``, a registered name or one of ``factories``).
        channels: ``C`` for every block (an int) or per name (a dict); otherwise inferred
            by :func:`infer_out_channels`.
        example_input: a batch for one ``eval``/no-grad pass that reads (and checks) each
            output's shape and layout; a non-4-D output is a ``ValueError`` naming its shape,
            and so is an error of the model on it.
        output_fmt: the layout of the outputs (one for all, or per name): ``"NCHW"``
            (``(B, C, H, W)``) or ``"NHWC"`` (channels-last ``(B, H, W, C)``, as timm's and
            torchvision's Swin stages give). By default read on ``example_input``, else
            ``"NCHW"``. After an ``"NHWC"`` output the hook permutes around the block, which
            sees ``(B, C, H, W)``, and hands on ``(B, H, W, C)``.
        factories: name -> ``factory(channels, **kwargs)`` for this call, beside the
            built-in and registered names (:func:`~lightning_attn.blocks.create_attention`).
        **kwargs: the block's constructor arguments.

    The layout is read from the submodules that ran inside each target: those that declare
    a width (``out_channels`` / ``num_features`` of convolutions and norms in dim 1,
    ``out_features`` / ``normalized_shape`` of linear layers and LayerNorm in the last dim)
    and whose output has the target's shape. If they disagree (a square map whose ``C``
    equals its ``W``, with both kinds inside), it is a ``ValueError`` asking for
    ``output_fmt``. Whatever the layout, each forward checks the block's ``C`` is where the
    layout puts it, and names the layout when it is the other one.

    Each block is made like its target: on its device, in its floating dtype (unless
    ``device=`` / ``dtype=`` are given) and in the model's train/eval mode.

    Returns ``model`` itself (modified in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    known = attention_names(factories)
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"unknown attention {name!r}; known names: {known}")
    names = _check_names(model, after)
    given = _check_channels(names, channels)
    formats = _check_output_fmt(names, output_fmt)
    hosts = {target: _free_host(model, target) for target in names}
    maps = _target_maps(model, names, example_input, given, formats)
    # Build every block before changing the model, so a bad keyword leaves it untouched. A
    # block takes the model's train/eval mode: a new module is in training mode, which in a
    # model set to eval would normalise with batch statistics (and update running ones).
    blocks = {
        target: _like(create_attention(name, c, factories=factories, **kwargs), model, target,
                      kwargs)
        for target, (c, _) in maps.items()
    }
    for target, (host, attr) in hosts.items():
        host.add_module(attr, blocks[target])
        hook = _ApplyAttention(host, attr, target, *maps[target])
        model.get_submodule(target).register_forward_hook(hook)
    return model


def _free_host(model: nn.Module, target: str) -> tuple[nn.Module, str]:
    """:func:`_host` of ``target``, or a ``ValueError`` when a block is already inserted
    after it or the attribute name is taken."""
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
    return host, attr


def _target_maps(
    model: nn.Module, names: list[str], example_input: torch.Tensor | None,
    given: Mapping[str, int], formats: Mapping[str, str],
) -> dict[str, tuple[int, str]]:
    """``(C, layout)`` of each target's output: read on ``example_input`` (``given`` channels
    must agree), else ``given`` or inferred from the modules (layout: ``formats``, else
    channels-first)."""
    if example_input is None:
        todo = [n for n in names if n not in given]
        chans = {**given, **(infer_out_channels(model, todo) if todo else {})}
        return {n: (chans[n], formats.get(n, "NCHW")) for n in names}
    seen = _layouts(model, names, example_input, formats)
    for target, c in given.items():
        if c != seen[target][0]:
            layout = seen[target][1]
            raise ValueError(
                f"channels[{target!r}]={c} but the output of {target!r} on example_input "
                f"has {seen[target][0]} channels"
                + (" (channels-last: its last dim)" if layout == "NHWC" else "")
            )
    return seen


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
