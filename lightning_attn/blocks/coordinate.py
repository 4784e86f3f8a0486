"""CoordinateAttention (Hou et al., 2021) with the ten switchable add-ons of the seed."""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.statistics import ParameterSpec
from ..core.tensor_checks import check_input
from ..core.validation import (
    MAX_CHANNELS,
    MAX_KERNEL_EXTENT,
    MAX_KERNEL_SIZE,
    check_bool,
    check_choice,
    check_int,
    check_parameter_budget,
    check_size,
    check_unit_interval,
)
from .factory import (
    GATES,
    ActLayer,
    BlockSettings,
    HSwish,
    activation_name,
    constructor_arguments,
    gate_name,
    make_activation,
    reduced_width,
)
from .kernels import (
    Backend,
    backend_from_fused,
    check_triton_input,
    load_triton_ops,
    resolve_backend,
)
from .kernels.torch_fused import GradStash, axis_mean_pool, axis_scale
from .recording import RecordingMixin

__all__ = ["CoordinateAttention", "CoordinateAtt", "HSwish"]


#: How far inside (0, 1) a bounded blend starts when its value is 0 or 1 (sigmoid never
#: reaches them): logit(0.99) = 4.6, where the sigmoid's slope is still 1 % of its peak.
_BOUNDED_MARGIN = 0.01


def _bounded_raw(value: torch.Tensor) -> torch.Tensor:
    """``logit`` of ``value`` clipped to ``[0.01, 0.99]``: the raw parameter of a bounded
    blend, same shape, device and dtype."""
    v = value.detach().clamp(_BOUNDED_MARGIN, 1.0 - _BOUNDED_MARGIN)
    return torch.logit(v)


def _scalar(module: nn.Module, name: str, value: float, learnable: bool, dd: dict) -> None:
    tensor = torch.tensor(float(value), **dd)
    if learnable:
        setattr(module, name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


_SYMBOLS = {"alpha": "α", "alpha_h": "α_h", "alpha_w": "α_w", "beta": "β"}
_LEARNABLE_FLAG = {"alpha": "learnable_alpha", "alpha_h": "learnable_alpha",
                   "alpha_w": "learnable_alpha", "beta": "learnable_beta"}

#: The activations after the shared 1x1 convolution (``act=``; ``act_layer=`` takes timm's
#: names and classes for the same set, see :mod:`lightning_attn.blocks.factory`).
Activation = Literal[
    "hswish", "relu", "relu6", "silu", "mish", "gelu", "gelu_tanh", "quick_gelu",
    "hard_mish", "leaky_relu", "elu", "celu", "selu", "tanh", "sigmoid", "hardsigmoid",
    "identity",
]
ACT_NAMES: tuple[str, ...] = typing.get_args(Activation)


def _alias(
    name: str, value: object, choices: tuple[str, ...], default: str, alias: str, mapped: str
) -> str:
    """``mapped`` (from timm's ``alias``) unless ``name`` was set to something else too."""
    value = check_choice(name, value, choices)
    if value not in (default, mapped):
        raise ValueError(f"{alias} gives {mapped!r} but {name}={value!r}: give one of them")
    return mapped


def _parameter_count(
    c: int, mid: int, axis_kernel: int | None, layers: int, groups: int, spatial: bool,
    bias: bool,
) -> int:
    """The parameters of a block of this configuration, counted before allocating them."""
    count = c * mid + 2 * mid + (mid * mid + 2 * mid if layers == 2 else 0)
    count += 2 * (mid // groups * c + (c if bias else 0))
    count += 2 * c * axis_kernel if axis_kernel is not None else 0
    count += 9 * c + c * c + c if spatial else 0
    return count


def _axis_settings(axis_kernel: object, axis_dilation: object) -> tuple[int | None, int]:
    """``(axis_kernel, axis_dilation)`` checked: an odd kernel whose dilated span fits."""
    axis_dilation = check_size("axis_dilation", axis_dilation, 1, MAX_KERNEL_EXTENT,
                               "MAX_KERNEL_EXTENT")
    if axis_kernel is None:
        if axis_dilation != 1:
            raise ValueError(
                f"axis_dilation={axis_dilation} needs the axis convolutions: set axis_kernel "
                "(the seed uses 3)"
            )
        return None, axis_dilation
    axis_kernel = check_size("axis_kernel", axis_kernel, 1, MAX_KERNEL_SIZE, "MAX_KERNEL_SIZE")
    if axis_kernel % 2 == 0:
        raise ValueError(f"axis_kernel must be odd, got {axis_kernel}")
    check_size("axis_dilation * (axis_kernel - 1) + 1", axis_dilation * (axis_kernel - 1) + 1,
               1, MAX_KERNEL_EXTENT, "MAX_KERNEL_EXTENT")
    return axis_kernel, axis_dilation


def _channels_argument(owner: str, channels: object, in_channels: object) -> tuple[str, int]:
    """``(the argument's name, C)``: ``channels``, or the seed's spelling ``in_channels``."""
    if in_channels is not None:
        if channels is not None:
            raise TypeError(
                f"{owner} got both channels={channels!r} and in_channels={in_channels!r}: "
                "they are the same argument"
            )
        return "in_channels", check_size("in_channels", in_channels, 1, MAX_CHANNELS,
                                         "MAX_CHANNELS")
    if channels is None:
        raise TypeError(f"{owner} needs channels, the C of its (B, C, H, W) input")
    return "channels", check_size("channels", channels, 1, MAX_CHANNELS, "MAX_CHANNELS")


@dataclass(frozen=True)
class CoordinateSettings(BlockSettings):
    """What the arguments of a :class:`CoordinateAttention` resolve to, checked:
    :meth:`check` is the one place that validates them, the constructor builds the layers
    from the result. Aliases are resolved: ``channels`` or the seed's ``in_channels`` ->
    ``in_channels``, timm's ``rd_*`` -> ``mid_channels``, ``act_layer`` / ``gate_layer`` ->
    ``act_name`` / ``gate``."""

    in_channels: int
    mid_channels: int
    act_name: str
    act_layer: object  # the class passed as act_layer (it is the one that runs), or None
    gate: str
    alpha: float
    learnable_alpha: bool
    per_axis_alpha: bool
    beta: float | None
    learnable_beta: bool
    bounded: bool
    pool: str
    axis_kernel: int | None
    axis_dilation: int
    bottleneck_layers: int
    head_groups: int
    spatial_gate: bool
    bias: bool

    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "in_channels", "mid_channels", "act_name", "gate", "pool", "axis_kernel",
        "axis_dilation", "per_axis_alpha", "learnable_alpha", "learnable_beta", "bounded",
        "bottleneck_layers", "head_groups", "spatial_gate", "backend",
    )

    @classmethod
    def check(
        cls, owner: str, *, channels, reduction, min_mid_channels, act, alpha,
        learnable_alpha, pool, axis_kernel, axis_dilation, per_axis_alpha, gate, beta,
        learnable_beta, bottleneck_layers, head_groups, spatial_gate, backend, fused, bounded,
        rd_ratio, rd_divisor, rd_channels, act_layer, gate_layer, bias, in_channels, device,
        dtype,
    ) -> CoordinateSettings:
        """Every argument of the constructor by name (``fused`` is already mapped onto
        ``backend`` there); a ``TypeError`` / ``ValueError`` names the first bad one."""
        del fused
        backend, dd = cls.check_backend_and_factory(owner, backend, device, dtype)
        name, c = _channels_argument(owner, channels, in_channels)
        reduction = check_int("reduction", reduction, 1)
        min_mid = check_size("min_mid_channels", min_mid_channels, 1, MAX_CHANNELS,
                             "MAX_CHANNELS")
        act = check_choice("act", act, ACT_NAMES) if act_layer is None else _alias(
            "act", act, ACT_NAMES, "hswish", "act_layer", activation_name("act_layer", act_layer))
        gate = check_choice("gate", gate, GATES) if gate_layer is None else _alias(
            "gate", gate, GATES, "sigmoid", "gate_layer", gate_name("gate_layer", gate_layer))
        alpha = check_unit_interval("alpha", alpha)
        learnable_alpha = check_bool("learnable_alpha", learnable_alpha)
        per_axis_alpha = check_bool("per_axis_alpha", per_axis_alpha)
        learnable_beta = check_bool("learnable_beta", learnable_beta)
        spatial_gate = check_bool("spatial_gate", spatial_gate)
        bias = check_bool("bias", bias)
        pool = check_choice("pool", pool, ("mean", "mean_max"))
        axis_kernel, axis_dilation = _axis_settings(axis_kernel, axis_dilation)
        if bottleneck_layers not in (1, 2) or isinstance(bottleneck_layers, bool):
            raise ValueError(f"bottleneck_layers must be 1 or 2, got {bottleneck_layers!r}")
        head_groups = check_int("head_groups", head_groups, 1)
        if learnable_beta and beta is None:
            raise ValueError("learnable_beta=True needs a starting value: set beta")
        beta = None if beta is None else check_unit_interval("beta", beta)
        mid = reduced_width(c, reduction, min_mid, rd_ratio, rd_divisor, rd_channels)
        if c % head_groups or mid % head_groups:
            raise ValueError(
                f"head_groups={head_groups} must divide both {name}={c} and the middle width "
                f"mid={mid} (max(min_mid_channels, {name} // reduction))"
            )
        check_parameter_budget(owner, _parameter_count(
            c, mid, axis_kernel, bottleneck_layers, head_groups, spatial_gate, bias
        ), f"{name}={c}, mid={mid}, spatial_gate={spatial_gate}")
        bounded = check_bool("bounded", bounded)
        if bounded and not (learnable_alpha or learnable_beta):
            raise ValueError(
                "bounded=True reparametrises learnable alphas and betas, but neither "
                "learnable_alpha nor learnable_beta is set (fixed values are already checked "
                "to lie in [0, 1])"
            )
        return cls(
            in_channels=c, mid_channels=mid, act_name=act, act_layer=act_layer, gate=gate,
            alpha=alpha, learnable_alpha=learnable_alpha, per_axis_alpha=per_axis_alpha,
            beta=beta, learnable_beta=learnable_beta, bounded=bounded, pool=pool,
            axis_kernel=axis_kernel, axis_dilation=axis_dilation,
            bottleneck_layers=bottleneck_layers, head_groups=head_groups,
            spatial_gate=spatial_gate, bias=bias, backend=backend, factory_kwargs=dd,
        )


class CoordinateAttention(RecordingMixin, nn.Module):
    """Coordinate attention: a per-row mask times a per-column mask, blended with ``alpha``.

    Base formula (every add-on off): ``mid = max(min_mid_channels, C // reduction)``;
    ``x_h = mean_W(x) (B,C,H,1)``, ``x_w = mean_H(x) (B,C,W,1)``; a shared
    ``Conv1x1(C->mid) -> BN -> act`` on both; ``a_h = sigmoid(conv_h(.)) (B,C,H,1)``,
    ``a_w = sigmoid(conv_w(.)) (B,C,1,W)``; ``y = x * ((1 - alpha) + alpha * a_h * a_w)``.

    Add-ons (numbers as in docs/spec.md), each independent:
        1. ``pool="mean_max"``: axis pooling ``(mean + max) / 2``.
        2. ``axis_kernel=k``: depthwise ``(k,1)``/``(1,k)`` convs ``dw_h``/``dw_w`` on the
           pooled axes (the seed uses 3).
        3. ``axis_dilation=d``: dilation of those convs (needs ``axis_kernel``).
        4. ``per_axis_alpha=True``: ``scale = ((1-alpha_h) + alpha_h a_h) ((1-alpha_w) +
           alpha_w a_w)``; both start at ``alpha``, learnable with ``learnable_alpha``.
        5. ``gate="hardsigmoid"`` for ``a_h``, ``a_w``.
        6. ``beta=b``: attention residual ``att = 1 + beta (a_h a_w - 1)`` before the alpha
           blend; ``learnable_beta`` makes it a parameter. With add-on 4 the residual acts
           on the per-axis product: ``scale = 1 + beta (s_h s_w - 1)`` where
           ``s_h = (1-alpha_h) + alpha_h a_h``; ``beta=1`` gives add-on 4 exactly and
           ``alpha_h = alpha_w = 1`` gives add-on 6 with ``alpha = 1`` exactly.
        7. ``bottleneck_layers=2``: ``conv1a/bn1a/act/conv1b/bn1b/act`` instead of
           ``conv1/bn1/act``.
        8. ``head_groups=g``: ``conv_h``/``conv_w`` grouped; ``g`` divides ``C`` and ``mid``.
        9. ``spatial_gate=True``: ``y = out * sigmoid(spatial_pw(spatial_dw(out)))`` with
           ``out = x * scale``.
        10. :func:`~lightning_attn.blocks.quick_mask_check`: statistics (mean, std, min,
            max, saturation) of ``a_h`` and ``a_w`` from the blocks' own recording, and a
            :class:`~lightning_attn.blocks.MaskCollapseWarning` below a std threshold. Nothing
            is kept between forwards (the seed keeps ``a_h``/``a_w`` on the module).

    Args:
        channels: ``C`` of the input, first (as timm passes it; the seed's ``in_channels=``
            is accepted by keyword too).
        reduction: middle width ``max(min_mid_channels, C // reduction)`` (at most
            :data:`~lightning_attn.core.validation.MAX_CHANNELS`).
        min_mid_channels: the smallest middle width (see ``reduction``).
        act: the activation after the shared 1x1 convolution: ``"hswish"`` (the seed's),
            ``"relu"``, or any of :data:`Activation` (timm's activation set).
        alpha: blend in ``[0, 1]`` (0: identity, 1: full attention).
        learnable_alpha: makes ``alpha`` (or ``alpha_h``/``alpha_w``) a parameter.
        pool: axis pooling, ``"mean"`` or ``"mean_max"`` (add-on 1).
        axis_kernel: size ``k`` of the depthwise axis convs (add-on 2; at most
            :data:`~lightning_attn.core.validation.MAX_KERNEL_SIZE`); ``None``: none.
        axis_dilation: their dilation (add-on 3; the span
            ``axis_dilation * (axis_kernel - 1) + 1`` at most ``MAX_KERNEL_EXTENT``).
        per_axis_alpha: one blend per axis, ``alpha_h`` and ``alpha_w`` (add-on 4).
        gate: ``"sigmoid"`` or ``"hardsigmoid"`` for ``a_h`` and ``a_w`` (add-on 5).
        beta: the attention residual in ``[0, 1]`` (add-on 6); ``None``: none.
        learnable_beta: makes ``beta`` a parameter.
        bottleneck_layers: 1, or 2 for the two-layer bottleneck (add-on 7).
        head_groups: groups of ``conv_h`` / ``conv_w`` (add-on 8).
        spatial_gate: the spatial gate after the blend (add-on 9).
        backend: ``"auto"`` (default: the path measured fastest on the input's device),
            ``"plain"`` (the seed's ops; double backward), ``"torch"`` (``x * scale`` in one
            fused autograd function that never builds ``att`` or ``scale`` at full size) or
            ``"triton"`` (Triton kernels; CUDA). See
            :mod:`lightning_attn.blocks.kernels.backend`.
        fused: deprecated: ``True`` is ``backend="torch"``, ``False`` ``backend="plain"``.
        bounded: keep every learnable alpha / alpha_h / alpha_w / beta in ``[0, 1]`` as
            ``sigmoid`` of a raw parameter (``alpha_raw``, ``alpha_h_raw``, ... in the state
            dict instead of ``alpha``, ...), so it can never amplify or invert the mask.
            It starts at its value clipped to ``[0.01, 0.99]`` (a sigmoid never reaches 0
            or 1). Needs ``learnable_alpha`` or ``learnable_beta``; fixed values are already
            checked to lie in ``[0, 1]``.
        rd_ratio, rd_divisor, rd_channels: timm's names for the middle width:
            ``max(min_mid_channels, floor(C * rd_ratio))`` (``rd_ratio=1/32`` is
            ``reduction=32``), rounded to a multiple of ``rd_divisor`` when given;
            ``rd_channels`` sets it exactly.
        act_layer, gate_layer: timm's names for ``act`` / ``gate``: a timm activation name
            (``"hard_swish"``, ``"swish"``, ``"hard_sigmoid"``, ...) or class (``nn.SiLU``,
            ``nn.Hardswish``, timm's ``HardSwish``, ...); a class passed is the one that runs.
        bias: biases in ``conv_h`` / ``conv_w`` (the seed has them; timm's ``CoordAttn`` has
            none by default: ``bias=False`` is its layout, see :meth:`from_timm`).
        device, dtype: where and in which floating dtype the parameters and buffers are
            created (the ``torch.nn`` factory keywords, which timm passes).

    A block of more than :data:`~lightning_attn.core.validation.MAX_BLOCK_PARAMETERS`
    parameters is refused (its size grows with ``C**2`` with ``spatial_gate``).

    Shapes: ``x (B,C,H,W) -> y (B,C,H,W)``.
    """

    mask_names = ("mask_h", "mask_w")

    def __init__(
        self,
        channels: int | None = None,
        reduction: int = 32,
        min_mid_channels: int = 8,
        act: Activation = "hswish",
        alpha: float = 1.0,
        learnable_alpha: bool = False,
        pool: Literal["mean", "mean_max"] = "mean",
        axis_kernel: int | None = None,
        axis_dilation: int = 1,
        per_axis_alpha: bool = False,
        gate: Literal["sigmoid", "hardsigmoid"] = "sigmoid",
        beta: float | None = None,
        learnable_beta: bool = False,
        bottleneck_layers: int = 1,
        head_groups: int = 1,
        spatial_gate: bool = False,
        backend: Backend = "auto",
        fused: bool | None = None,
        bounded: bool = False,
        *,
        rd_ratio: float | None = None,
        rd_divisor: int | None = None,
        rd_channels: int | None = None,
        act_layer: ActLayer | None = None,
        gate_layer: ActLayer | None = None,
        bias: bool = True,
        in_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        backend = backend_from_fused(fused, backend, type(self).__name__)  # warns at the call
        settings = CoordinateSettings.check(type(self).__name__,
                                            **constructor_arguments(locals()))
        settings.set_attributes(self)
        self._build_layers(settings)
        self._build_blends(settings)
        self.gate_fn = torch.sigmoid if settings.gate == "sigmoid" else F.hardsigmoid

    def _build_layers(self, s: CoordinateSettings) -> None:
        """The convolutions, norms and activation, in the seed's order (its state-dict keys)."""
        c, mid, dd = s.in_channels, s.mid_channels, s.factory_kwargs
        if s.axis_kernel is not None:
            k, d = s.axis_kernel, s.axis_dilation
            pad = d * (k - 1) // 2
            self.dw_h = nn.Conv2d(c, c, (k, 1), padding=(pad, 0), dilation=(d, 1), groups=c,
                                  bias=False, **dd)
            self.dw_w = nn.Conv2d(c, c, (1, k), padding=(0, pad), dilation=(1, d), groups=c,
                                  bias=False, **dd)
        if s.bottleneck_layers == 1:
            self.conv1 = nn.Conv2d(c, mid, kernel_size=1, bias=False, **dd)
            self.bn1 = nn.BatchNorm2d(mid, **dd)
        else:
            self.conv1a = nn.Conv2d(c, mid, kernel_size=1, bias=False, **dd)
            self.bn1a = nn.BatchNorm2d(mid, **dd)
            self.conv1b = nn.Conv2d(mid, mid, kernel_size=1, bias=False, **dd)
            self.bn1b = nn.BatchNorm2d(mid, **dd)
        self.act = make_activation(s.act_name, s.act_layer)
        self.conv_h = nn.Conv2d(mid, c, kernel_size=1, groups=s.head_groups, bias=s.bias, **dd)
        self.conv_w = nn.Conv2d(mid, c, kernel_size=1, groups=s.head_groups, bias=s.bias, **dd)
        if s.spatial_gate:
            self.spatial_dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False, **dd)
            self.spatial_pw = nn.Conv2d(c, c, 1, bias=True, **dd)

    def _build_blends(self, s: CoordinateSettings) -> None:
        """``alpha`` (or ``alpha_h`` / ``alpha_w``) and ``beta``: parameters when learnable
        (as ``sigmoid`` of a ``*_raw`` parameter when bounded), else buffers; a fixed beta is
        a plain float as in the seed (outside the state dict, exact in float64)."""
        for name in ("alpha_h", "alpha_w") if s.per_axis_alpha else ("alpha",):
            _scalar(self, name, s.alpha, s.learnable_alpha, s.factory_kwargs)
        self.use_beta = s.beta is not None
        if s.learnable_beta:
            _scalar(self, "beta", s.beta, learnable=True, dd=s.factory_kwargs)
        elif self.use_beta:
            self.beta = s.beta
        if s.bounded:
            # Replace each learnable scalar by its raw parameter (same device and dtype).
            for name in self._scalar_names():
                value = getattr(self, name)
                if isinstance(value, nn.Parameter):
                    delattr(self, name)
                    self.register_parameter(name + "_raw", nn.Parameter(_bounded_raw(value)))

    @property
    def channels(self) -> int:
        """``C`` of the input (the same as ``in_channels``, the seed's name)."""
        return self.in_channels

    # -- parameters seen by diagnostics -------------------------------------------------
    def _scalar_names(self) -> tuple[str, ...]:
        names = ("alpha_h", "alpha_w") if self.per_axis_alpha else ("alpha",)
        return names + (("beta",) if self.use_beta else ())

    def _blend(self, name: str) -> torch.Tensor | float:
        """The value of ``alpha`` / ``alpha_h`` / ``alpha_w`` / ``beta``: ``sigmoid`` of its
        raw parameter when bounded, else the parameter, buffer or float itself."""
        raw = self._parameters.get(name + "_raw") if self.bounded else None
        return torch.sigmoid(raw) if raw is not None else getattr(self, name)

    def attention_parameters(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self._scalar_names():
            value = self._blend(name)
            out[name] = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        return out

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        out = {}
        for name in self._scalar_names():
            raw = self._parameters.get(name + "_raw") if self.bounded else None
            value = raw if raw is not None else getattr(self, name)
            if isinstance(value, nn.Parameter):
                out[name] = value
        return out

    def attention_parameter_specs(self) -> dict[str, ParameterSpec]:
        # Blends of attention and identity: 0 turns the attention off, 1 applies it fully;
        # outside [0, 1] the mask is amplified or inverted. The default alpha=1.0 sits on the
        # edge, hence the margin.
        return {
            name: ParameterSpec(
                0.0, 1.0, "unit_margin", _SYMBOLS[name],
                f"bounded=True keeps it in [0, 1]; or fix it ({_LEARNABLE_FLAG[name]}=False)",
            )
            for name in self._scalar_names()
        }

    # -- forward -------------------------------------------------------------------------
    def _axis_pool(
        self, x: torch.Tensor, backend: str, stash: GradStash | list | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,C,H,W) -> x_h (B,C,H,1), x_w (B,C,1,W)``; on the triton path ``stash`` is a
        list that receives the pool's link for :meth:`_apply_fused`."""
        if backend == "triton":
            x_h, x_w, link = load_triton_ops().coord_pool_linked(x, self.pool == "mean_max")
            stash.append(link)
        else:
            if stash is not None:
                x_h, x_w = axis_mean_pool(x, stash)
            else:
                x_h = x.mean(dim=3, keepdim=True)
                x_w = x.mean(dim=2, keepdim=True)
            if self.pool == "mean_max":
                x_h = 0.5 * (x_h + x.amax(dim=3, keepdim=True))
                x_w = 0.5 * (x_w + x.amax(dim=2, keepdim=True))
        if self.axis_kernel is not None:
            x_h = self.dw_h(x_h)
            x_w = self.dw_w(x_w)
        return x_h, x_w

    @staticmethod
    def _pointwise(conv: nn.Conv2d, y: torch.Tensor, fast: bool) -> torch.Tensor:
        """A 1x1 convolution on an axis map ``(B,Cin,L,1)``/``(B,Cin,1,L)``.

        On the fast path an ungrouped one runs as a matrix product: the same weights and
        values, without the convolution overhead that dominates on such thin maps.
        """
        if not fast or conv.groups != 1:
            return conv(y)
        b, _, *spatial = y.shape
        out = torch.matmul(conv.weight.flatten(1), y.flatten(2))  # (B,Cout,L)
        if conv.bias is not None:
            # In the product's dtype, as the convolution adds it: under autocast a float32
            # bias would promote the masks (and the output) to float32, unlike "plain".
            out = out + conv.bias[:, None].to(out.dtype)
        return out.view(b, -1, *spatial)

    def _bottleneck(self, y: torch.Tensor, fast: bool) -> torch.Tensor:
        if self.bottleneck_layers == 1:
            return self.act(self.bn1(self._pointwise(self.conv1, y, fast)))
        y = self.act(self.bn1a(self._pointwise(self.conv1a, y, fast)))
        return self.act(self.bn1b(self._pointwise(self.conv1b, y, fast)))

    def _masks(
        self, x: torch.Tensor, backend: str, stash: GradStash | list | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_h (B,C,H,1)`` and ``a_w (B,C,1,W)``; ``stash`` is given on the torch path."""
        _, _, h, w = x.shape
        # Thin 1x1 convolutions as matrix products are faster on a CPU ("torch"); on the
        # triton (GPU) path convolutions launch fewer kernels (no transposing copies).
        fast = backend == "torch"
        x_h, x_w = self._axis_pool(x, backend, stash)
        y = torch.cat([x_h, x_w.permute(0, 1, 3, 2)], dim=2)  # (B,C,H+W,1)
        y = self._bottleneck(y, fast)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.gate_fn(self._pointwise(self.conv_h, y_h, fast))
        a_w = self.gate_fn(self._pointwise(self.conv_w, y_w.permute(0, 1, 3, 2), fast))
        return a_h, a_w

    def _apply_plain(self, x, a_h, a_w):
        # The seed's ops, in the seed's order.
        beta = self._blend("beta") if self.use_beta else None
        if self.per_axis_alpha:
            alpha_h, alpha_w = self._blend("alpha_h"), self._blend("alpha_w")
            scale_h = (1.0 - alpha_h) + alpha_h * a_h
            scale_w = (1.0 - alpha_w) + alpha_w * a_w
            scale = scale_h * scale_w
            if self.use_beta:
                scale = 1.0 + beta * (scale - 1.0)
        else:
            alpha = self._blend("alpha")
            att = a_h * a_w
            if self.use_beta:
                att = 1.0 + beta * (att - 1.0)
            scale = (1.0 - alpha) + alpha * att
        return x * scale

    def _k_is_one(self) -> bool:
        """Whether ``k`` (below) is exactly 1 without reading a device tensor: then the
        ``c * x`` term is zero and the fused function skips a full-size pass each way."""
        if self.learnable_beta or (self.use_beta and self.beta != 1.0):
            return False
        if self.per_axis_alpha:
            return True
        # A fixed alpha on the host is read for free; on an accelerator that would sync, and
        # under torch.compile the read would break the graph (the general path is exact too).
        return (
            not self.learnable_alpha and self.alpha.device.type == "cpu"
            and not torch.compiler.is_compiling() and float(self.alpha) == 1.0
        )

    def _apply_fused(self, x, a_h, a_w, backend, stash):
        # Every variant is x * (c + k * u_h * u_w) with small u_h, u_w and scalar c = 1 - k.
        # k and c stay what they are, a tensor, a number (a fixed beta) or None (exactly 1
        # and 0): a tensor made from a number here would be a host-to-device copy in every
        # forward, which also breaks CUDA-graph capture.
        if self.per_axis_alpha:
            alpha_h, alpha_w = self._blend("alpha_h"), self._blend("alpha_w")
            u_h = (1.0 - alpha_h) + alpha_h * a_h
            u_w = (1.0 - alpha_w) + alpha_w * a_w
            k = self._blend("beta") if self.use_beta else None
        else:
            alpha = self._blend("alpha")
            u_h, u_w = a_h, a_w
            k = alpha * self._blend("beta") if self.use_beta else alpha
        c = None if self._k_is_one() else 1.0 - k
        if backend == "triton":
            return load_triton_ops().coord_scale(x, u_h, u_w, c, k, stash[0])
        return axis_scale(x, u_h, u_w, c, k, stash)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        weight = self.conv_h.weight
        check_input(x, owner, self.in_channels, weight.dtype, weight.device)
        backend = resolve_backend(self.backend, "coord", x)
        if x.shape[0] == 0:
            backend = "plain"  # an empty batch: nothing to fuse (the fused views need rows)
        if backend == "triton":
            check_triton_input(x, owner)
        # torch: the fused functions' gradient hand-over; triton: receives the pool's link
        stash = GradStash() if backend == "torch" else [] if backend == "triton" else None
        a_h, a_w = self._masks(x, backend, stash)
        if backend == "plain":
            out = self._apply_plain(x, a_h, a_w)
        else:
            out = self._apply_fused(x, a_h, a_w, backend, stash)
        if self.spatial_gate:
            out = out * torch.sigmoid(self.spatial_pw(self.spatial_dw(out)))
        self.record({"mask_h": a_h, "mask_w": a_w})
        return out

    # -- timm's CoordAttn -----------------------------------------------------------------
    _TIMM_KEYS = ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                  "bn1.running_var", "conv_h.weight", "conv_w.weight")

    def load_timm_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the state dict of a timm ``CoordAttn`` (``timm.layers.CoordAttn``) into this
        block (strictly: every timm key is used, every parameter of this block is set).

        The keys are the same (``conv1``, ``bn1``, ``conv_h``, ``conv_w``); the differences
        are resolved exactly:

        - timm's default ``bias=False`` leaves ``conv_h`` / ``conv_w`` without biases: this
          block's biases (``bias=True``) are set to zero; build it with ``bias=False`` (as
          :meth:`from_timm` does) for timm's parameter layout, so that training also matches;
        - timm's ``bias=True`` adds a ``conv1`` bias, which the BatchNorm right after it
          cancels in training mode; in eval mode it shifts the normalised value, so it is
          folded into ``bn1.running_mean`` (``running_mean - bias``), which then also tracks
          timm's running mean minus the bias in training: the same outputs in both modes.

        Needs the timm layout: ``bottleneck_layers=1``, ``head_groups=1``, no ``axis_kernel``
        and no ``spatial_gate`` (those add parameters timm's block does not have). Values
        this block has and timm's lacks (``alpha``, ``beta``) keep their own: with the
        defaults (``alpha=1``, no ``beta``) the block computes timm's ``x * a_w * a_h``.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        extra = [n for n in ("axis_kernel", "spatial_gate") if getattr(self, n)]
        if self.bottleneck_layers != 1 or self.head_groups != 1 or extra:
            raise ValueError(
                f"{owner} with bottleneck_layers={self.bottleneck_layers}, head_groups="
                f"{self.head_groups}{''.join(f', {n} set' for n in extra)} does not have timm "
                "CoordAttn's layout (bottleneck_layers=1, head_groups=1, no axis_kernel, "
                "no spatial_gate)"
            )
        given = dict(state_dict)
        missing = [k for k in self._TIMM_KEYS if k not in given]
        known = {*self._TIMM_KEYS, "bn1.num_batches_tracked", "conv1.bias", "conv_h.bias",
                 "conv_w.bias"}
        unexpected = sorted(set(given) - known)
        if missing or unexpected:
            raise ValueError(
                f"not a timm CoordAttn state dict: missing keys {missing}, unexpected keys "
                f"{unexpected}"
            )
        ours = self.state_dict()
        for key in self._TIMM_KEYS:
            if tuple(given[key].shape) != tuple(ours[key].shape):
                raise ValueError(
                    f"{key} has shape {tuple(given[key].shape)} in the timm state dict but "
                    f"{tuple(ours[key].shape)} in this {owner} (channels={self.in_channels}, "
                    f"mid={self.mid_channels}); build it with CoordinateAttention.from_timm"
                )
        new = {k: given[k] for k in self._TIMM_KEYS}
        if "bn1.num_batches_tracked" in given:
            new["bn1.num_batches_tracked"] = given["bn1.num_batches_tracked"]
        if "conv1.bias" in given:  # cancelled by BatchNorm in training; folded for eval
            new["bn1.running_mean"] = given["bn1.running_mean"] - given["conv1.bias"]
        for axis in ("h", "w"):
            key = f"conv_{axis}.bias"
            if key in given and key not in ours:
                raise ValueError(
                    f"the timm state dict has {key} but this {owner} was built with "
                    "bias=False; build it with bias=True"
                )
            if key in ours:
                new[key] = given[key] if key in given else torch.zeros_like(ours[key])
        self.load_state_dict({**ours, **new}, strict=True)

    @classmethod
    def from_timm(cls, module: nn.Module, **kwargs) -> CoordinateAttention:
        """A block that computes what timm's ``CoordAttn`` ``module`` computes, with its
        weights, on its device and in its dtype.

        Built with timm's channels, middle width (``rd_channels``), conv biases, activation
        (a copy of ``module.act``), gate and BatchNorm settings, then
        :meth:`load_timm_state_dict`. ``kwargs`` go to the constructor (``backend=``, ...;
        an add-on makes it compute something else). The outputs agree with timm's to
        floating-point rounding, not bitwise: timm multiplies ``(x * a_w) * a_h``, this block
        ``x * (a_h * a_w)`` (and its ``"torch"`` backend fuses the product differently).

        Refused, with a ``ValueError``: ``has_skip=True`` (``x * a + x`` is outside the
        ``alpha`` blend) and a norm layer other than ``nn.BatchNorm2d`` (or none).
        """
        names = ("conv1", "bn1", "act", "conv_h", "conv_w", "gate")
        if not isinstance(module, nn.Module) or not all(hasattr(module, n) for n in names):
            raise TypeError(
                f"module must be a timm CoordAttn (with {', '.join(names)}), got "
                f"{type(module).__name__}"
            )
        if getattr(module, "has_skip", False):
            raise ValueError(
                "timm CoordAttn(has_skip=True) computes x * a_h * a_w + x, which "
                f"{cls.__name__}'s alpha blend in [0, 1] cannot express"
            )
        bn = module.bn1
        if type(bn) is not nn.BatchNorm2d or not (bn.affine and bn.track_running_stats):
            raise ValueError(
                f"timm CoordAttn's norm layer is {type(bn).__name__}; {cls.__name__} needs "
                "an affine nn.BatchNorm2d with running statistics"
            )
        act_name = activation_name("module.act", type(module.act))
        if any(True for _ in module.act.parameters()):
            raise ValueError(f"module.act ({type(module.act).__name__}) has parameters")
        weight = module.conv_h.weight
        block = cls(
            module.conv1.in_channels,
            rd_channels=module.conv1.out_channels,
            act_layer=act_name,
            gate_layer=type(module.gate),
            bias=module.conv_h.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        block.act = copy.deepcopy(module.act)  # the very activation timm runs
        block.bn1.eps, block.bn1.momentum = bn.eps, bn.momentum
        block.load_timm_state_dict(module.state_dict())
        return block.train(module.training)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, mid={self.mid_channels}, act={self.act_name!r}, "
            f"pool={self.pool!r}, axis_kernel={self.axis_kernel}, "
            f"axis_dilation={self.axis_dilation}, per_axis_alpha={self.per_axis_alpha}, "
            f"gate={self.gate!r}, beta={self.use_beta}, bottleneck_layers="
            f"{self.bottleneck_layers}, head_groups={self.head_groups}, "
            f"spatial_gate={self.spatial_gate}, backend={self.backend!r}"
            + (", bounded=True" if self.bounded else "")
        )


#: The seed's class name.
CoordinateAtt = CoordinateAttention
