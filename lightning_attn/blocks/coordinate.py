"""CoordinateAttention (Hou et al., 2021) with the ten switchable add-ons of the seed."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (
    BACKENDS,
    Backend,
    backend_from_fused,
    check_triton_input,
    load_triton_ops,
    resolve_backend,
)
from .kernels.torch_fused import GradStash, axis_mean_pool, axis_scale
from .recording import RecordingMixin
from .validation import (
    check_choice,
    check_finite_float,
    check_input,
    check_int,
    check_unit_interval,
)

__all__ = ["CoordinateAttention", "CoordinateAtt", "HSwish"]


class HSwish(nn.Module):
    """``x * relu6(x + 3) / 6``, written as the seed writes it (same rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


#: How far inside (0, 1) a bounded blend starts when its value is 0 or 1 (sigmoid never
#: reaches them): logit(0.99) = 4.6, where the sigmoid's slope is still 1 % of its peak.
_BOUNDED_MARGIN = 0.01


def _bounded_raw(value: torch.Tensor) -> torch.Tensor:
    """``logit`` of ``value`` clipped to ``[0.01, 0.99]``: the raw parameter of a bounded
    blend, same shape, device and dtype."""
    v = value.detach().clamp(_BOUNDED_MARGIN, 1.0 - _BOUNDED_MARGIN)
    return torch.logit(v)


def _scalar(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    tensor = torch.tensor(float(value))
    if learnable:
        setattr(module, name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


_TIMM_ACTS = {"hard_swish": "hswish", "hardswish": "hswish", "relu": "relu"}
_TIMM_GATES = {"sigmoid": "sigmoid", "hard_sigmoid": "hardsigmoid", "hardsigmoid": "hardsigmoid"}


def _layer_name(name: str, value: object, table: dict[str, str], classes: dict) -> str:
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    if isinstance(value, type) and value in classes:
        return classes[value]
    raise ValueError(
        f"{name} must be one of {sorted(table)} or {[c.__name__ for c in classes]}, got {value!r}"
    )


def _timm_aliases(reduction, act, gate, rd_ratio, act_layer, gate_layer):
    """Map timm's ``rd_ratio``/``act_layer``/``gate_layer`` onto ``reduction``/``act``/``gate``."""
    if rd_ratio is not None:
        r = check_finite_float("rd_ratio", rd_ratio)
        if not 0 < r <= 1 or not math.isclose(1 / r, round(1 / r), rel_tol=1e-6):
            raise ValueError(f"rd_ratio must be 1/n for an integer n >= 1, got {rd_ratio!r}")
        if reduction not in (32, round(1 / r)):
            raise ValueError(f"rd_ratio={rd_ratio!r} contradicts reduction={reduction!r}")
        reduction = round(1 / r)
    if act_layer is not None:
        act = _layer_name(
            "act_layer", act_layer, _TIMM_ACTS,
            {nn.Hardswish: "hswish", HSwish: "hswish", nn.ReLU: "relu"},
        )
    if gate_layer is not None:
        gate = _layer_name(
            "gate_layer", gate_layer, _TIMM_GATES,
            {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"},
        )
    return reduction, act, gate


class CoordinateAttention(RecordingMixin, nn.Module):
    """Coordinate attention: a per-row mask times a per-column mask, blended with ``alpha``.

    Base formula (every add-on off): ``mid = max(min_mid_channels, C // reduction)``;
    ``x_h = mean_W(x) (B,C,H,1)``, ``x_w = mean_H(x) (B,C,W,1)``; a shared
    ``Conv1x1(C->mid) -> BN -> act`` on both; ``a_h = sigmoid(conv_h(.)) (B,C,H,1)``,
    ``a_w = sigmoid(conv_w(.)) (B,C,1,W)``; ``y = x * ((1 - alpha) + alpha * a_h * a_w)``.

    Add-ons (numbers as in SPEC.md), each independent:
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
        in_channels: ``C`` of the input.
        reduction, min_mid_channels: middle width ``max(min_mid_channels, C // reduction)``.
        act: ``"hswish"`` or ``"relu"`` after the shared 1x1 convolution.
        alpha: blend in ``[0, 1]`` (0: identity, 1: full attention); ``learnable_alpha``
            makes it (or ``alpha_h``/``alpha_w``) a parameter.
        pool, axis_kernel, axis_dilation, per_axis_alpha, gate, beta, learnable_beta,
        bottleneck_layers, head_groups, spatial_gate: the add-ons above (``beta`` in
            ``[0, 1]``).
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
        rd_ratio, act_layer, gate_layer: timm's names, accepted as aliases:
            ``rd_ratio=1/32`` is ``reduction=32``; ``act_layer`` ``"hard_swish"``/``"relu"``
            or ``nn.Hardswish``/``nn.ReLU``; ``gate_layer`` ``"sigmoid"``/``"hard_sigmoid"``
            or ``nn.Sigmoid``/``nn.Hardsigmoid``.

    Shapes: ``x (B,C,H,W) -> y (B,C,H,W)``.
    """

    mask_names = ("mask_h", "mask_w")

    def __init__(
        self,
        in_channels: int,
        reduction: int = 32,
        min_mid_channels: int = 8,
        act: Literal["hswish", "relu"] = "hswish",
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
        act_layer: str | type[nn.Module] | None = None,
        gate_layer: str | type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        backend = check_choice("backend", backend_from_fused(fused, backend, owner), BACKENDS)
        if backend == "triton":
            load_triton_ops(f"{owner}(backend='triton')")
        reduction, act, gate = _timm_aliases(
            reduction, act, gate, rd_ratio, act_layer, gate_layer
        )
        in_channels = check_int("in_channels", in_channels, 1)
        reduction = check_int("reduction", reduction, 1)
        min_mid_channels = check_int("min_mid_channels", min_mid_channels, 1)
        act = check_choice("act", act, ("hswish", "relu"))
        alpha = check_unit_interval("alpha", alpha)
        self.pool = check_choice("pool", pool, ("mean", "mean_max"))
        self.gate = check_choice("gate", gate, ("sigmoid", "hardsigmoid"))
        axis_dilation = check_int("axis_dilation", axis_dilation, 1)
        if axis_kernel is not None:
            axis_kernel = check_int("axis_kernel", axis_kernel, 1)
            if axis_kernel % 2 == 0:
                raise ValueError(f"axis_kernel must be odd, got {axis_kernel}")
        elif axis_dilation != 1:
            raise ValueError(
                f"axis_dilation={axis_dilation} needs the axis convolutions: set axis_kernel "
                "(the seed uses 3)"
            )
        if bottleneck_layers not in (1, 2) or isinstance(bottleneck_layers, bool):
            raise ValueError(f"bottleneck_layers must be 1 or 2, got {bottleneck_layers!r}")
        head_groups = check_int("head_groups", head_groups, 1)
        if learnable_beta and beta is None:
            raise ValueError("learnable_beta=True needs a starting value: set beta")
        if beta is not None:
            beta = check_unit_interval("beta", beta)

        mid = max(min_mid_channels, in_channels // reduction)
        if in_channels % head_groups or mid % head_groups:
            raise ValueError(
                f"head_groups={head_groups} must divide both in_channels={in_channels} and "
                f"the middle width mid={mid} (max(min_mid_channels, in_channels // reduction))"
            )

        self.in_channels = in_channels
        self.mid_channels = mid
        self.axis_kernel = axis_kernel
        self.axis_dilation = axis_dilation
        self.per_axis_alpha = bool(per_axis_alpha)
        self.learnable_alpha = bool(learnable_alpha)
        self.learnable_beta = bool(learnable_beta)
        self.bottleneck_layers = bottleneck_layers
        self.head_groups = head_groups
        self.spatial_gate = bool(spatial_gate)
        self.backend = backend
        self.act_name = act

        if axis_kernel is not None:
            k, d = axis_kernel, axis_dilation
            pad = d * (k - 1) // 2
            self.dw_h = nn.Conv2d(
                in_channels, in_channels, (k, 1), padding=(pad, 0), dilation=(d, 1),
                groups=in_channels, bias=False,
            )
            self.dw_w = nn.Conv2d(
                in_channels, in_channels, (1, k), padding=(0, pad), dilation=(1, d),
                groups=in_channels, bias=False,
            )

        if bottleneck_layers == 1:
            self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
        else:
            self.conv1a = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
            self.bn1a = nn.BatchNorm2d(mid)
            self.conv1b = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
            self.bn1b = nn.BatchNorm2d(mid)
        self.act = HSwish() if act == "hswish" else nn.ReLU(inplace=True)

        self.conv_h = nn.Conv2d(mid, in_channels, kernel_size=1, groups=head_groups, bias=True)
        self.conv_w = nn.Conv2d(mid, in_channels, kernel_size=1, groups=head_groups, bias=True)

        if self.per_axis_alpha:
            _scalar(self, "alpha_h", alpha, self.learnable_alpha)
            _scalar(self, "alpha_w", alpha, self.learnable_alpha)
        else:
            _scalar(self, "alpha", alpha, self.learnable_alpha)
        self.use_beta = beta is not None
        if self.learnable_beta:
            _scalar(self, "beta", beta, learnable=True)
        elif self.use_beta:
            # As in the seed: a plain float, outside the state dict, exact in float64.
            self.beta = beta

        if self.spatial_gate:
            self.spatial_dw = nn.Conv2d(
                in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
            )
            self.spatial_pw = nn.Conv2d(in_channels, in_channels, 1, bias=True)

        self.gate_fn = torch.sigmoid if self.gate == "sigmoid" else F.hardsigmoid

        if not isinstance(bounded, bool):
            raise TypeError(f"bounded must be a bool, got {bounded!r} ({type(bounded).__name__})")
        if bounded and not (self.learnable_alpha or self.learnable_beta):
            raise ValueError(
                "bounded=True reparametrises learnable alphas and betas, but neither "
                "learnable_alpha nor learnable_beta is set (fixed values are already checked "
                "to lie in [0, 1])"
            )
        self.bounded = bounded
        if bounded:
            # Replace each learnable scalar by its raw parameter (same device and dtype).
            for name in self._scalar_names():
                value = getattr(self, name)
                if isinstance(value, nn.Parameter):
                    delattr(self, name)
                    self.register_parameter(name + "_raw", nn.Parameter(_bounded_raw(value)))

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

    # -- forward -------------------------------------------------------------------------
    def _axis_pool(
        self, x: torch.Tensor, backend: str, stash: GradStash | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,C,H,W) -> x_h (B,C,H,1), x_w (B,C,1,W)``."""
        if backend == "triton":
            x_h, x_w = load_triton_ops().coord_pool(x, self.pool == "mean_max")
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
            out = out + conv.bias[:, None]
        return out.view(b, -1, *spatial)

    def _bottleneck(self, y: torch.Tensor, fast: bool) -> torch.Tensor:
        if self.bottleneck_layers == 1:
            return self.act(self.bn1(self._pointwise(self.conv1, y, fast)))
        y = self.act(self.bn1a(self._pointwise(self.conv1a, y, fast)))
        return self.act(self.bn1b(self._pointwise(self.conv1b, y, fast)))

    def _masks(
        self, x: torch.Tensor, backend: str, stash: GradStash | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_h (B,C,H,1)`` and ``a_w (B,C,1,W)``; ``stash`` is given on the torch path."""
        _, _, h, w = x.shape
        fast = backend != "plain"
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
        # A fixed alpha on the host is read for free; on an accelerator that would sync.
        return (
            not self.learnable_alpha and self.alpha.device.type == "cpu"
            and float(self.alpha) == 1.0
        )

    def _apply_fused(self, x, a_h, a_w, backend, stash):
        # Every variant is x * (c + k * u_h * u_w) with small u_h, u_w and scalar c = 1 - k.
        beta = self._blend("beta") if self.use_beta else None
        if self.per_axis_alpha:
            alpha_h, alpha_w = self._blend("alpha_h"), self._blend("alpha_w")
            u_h = (1.0 - alpha_h) + alpha_h * a_h
            u_w = (1.0 - alpha_w) + alpha_w * a_w
            k = beta if self.use_beta else 1.0
        else:
            alpha = self._blend("alpha")
            u_h, u_w = a_h, a_w
            k = alpha * beta if self.use_beta else alpha
        k = torch.as_tensor(k, dtype=x.dtype, device=x.device) if not torch.is_tensor(k) else k
        c = None if self._k_is_one() else 1.0 - k
        if backend == "triton":
            return load_triton_ops().coord_scale(x, u_h, u_w, c, k)
        return axis_scale(x, u_h, u_w, c, k, stash)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        check_input(x, owner, self.in_channels, param_dtype=self.conv_h.weight.dtype)
        backend = resolve_backend(self.backend, "coord", x)
        if x.shape[0] == 0:
            backend = "plain"  # an empty batch: nothing to fuse (the fused views need rows)
        if backend == "triton":
            check_triton_input(x, owner)
        stash = GradStash() if backend == "torch" else None
        a_h, a_w = self._masks(x, backend, stash)
        if backend == "plain":
            out = self._apply_plain(x, a_h, a_w)
        else:
            out = self._apply_fused(x, a_h, a_w, backend, stash)
        if self.spatial_gate:
            out = out * torch.sigmoid(self.spatial_pw(self.spatial_dw(out)))
        self.record({"mask_h": a_h, "mask_w": a_w})
        return out

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
