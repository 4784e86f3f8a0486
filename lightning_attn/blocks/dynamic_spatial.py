"""DynamicSpatialAttention: multi-branch spatial attention with an input-dependent router."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.statistics import ParameterSpec
from ..core.tensor_checks import check_float32_temperature, check_input
from ..core.validation import (
    MAX_BRANCHES,
    MAX_CHANNELS,
    MAX_KERNEL_EXTENT,
    MAX_KERNEL_SIZE,
    MAX_ROUTER_HIDDEN,
    check_bool,
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_size,
)
from .aux_loss import RouterAuxMixin
from .factory import (
    ActLayer,
    BlockSettings,
    activation_name,
    check_reduction,
    constructor_arguments,
    gate_name,
    make_activation,
)
from .kernels import (
    Backend,
    backend_from_fused,
    check_triton_input,
    load_triton_ops,
    resolve_backend,
)
from .kernels.torch_fused import GradStash, apply_spatial_mask, spatial_summary
from .recording import RecordingMixin

__all__ = ["DynamicSpatialAttention"]

_GATES = ("sigmoid", "hardsigmoid")
Gate = Literal["sigmoid", "hardsigmoid"]
# The default of ``kernels``, one object: a call that passed kernels positionally first (the
# signature before ``channels``) is told apart from one that also passed ``kernels``.
_DEFAULT_KERNELS = (3, 7)


def _odd_kernel(name: str, k: object) -> int:
    # The seed raises an even size by one so that padding k // 2 keeps H and W.
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{name} must be an integer kernel size, got {k!r}")
    if not math.isfinite(k) or int(k) != k:
        raise ValueError(f"{name} must be a whole number, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    if k > MAX_KERNEL_SIZE:
        raise ValueError(
            f"{name}={k} is above the limit of {MAX_KERNEL_SIZE} (MAX_KERNEL_SIZE in "
            "lightning_attn.core.validation): a block this size would allocate absurd "
            "memory or compute"
        )
    return k + 1 if k % 2 == 0 else k


def _inverse_softplus(t: float, eps: float) -> float:
    """``t_raw`` with ``softplus(t_raw) + eps == t``, stable for large ``t``.

    The seed's ``log(exp(t) - 1 + eps)`` overflows to inf for ``t`` above ~88 in float32;
    ``t + log(-expm1(-t))`` is the same value and never overflows. ``eps`` is subtracted
    first so the learnable temperature starts at exactly ``temperature`` (the seed's
    formula adds it inside the log instead, a difference below 1e-6 for moderate ``t``).
    """
    target = t - eps
    return target + math.log(-math.expm1(-target))


def _channels_or_old_kernels(owner: str, channels: object, kernels: object):
    """``(channels, kernels)``, mapping a call of the signature before ``channels`` came
    first (``DynamicSpatialAttention((3, 5))``) onto ``kernels``, with a ``FutureWarning``."""
    if channels is None:
        return None, kernels
    if isinstance(channels, Sequence) and not isinstance(channels, (str, bytes)):
        if kernels is not _DEFAULT_KERNELS:
            raise TypeError(
                f"{owner}: the first argument is now channels (an int), and kernels "
                f"was given as well: got {channels!r} first and kernels={kernels!r}; pass the "
                "kernel sizes (and every argument after them) by keyword"
            )
        warnings.warn(
            f"{owner}({channels!r}): a sequence as the first argument is taken as kernels "
            "for one more release; the first argument is now channels (the timm / torch.nn "
            f"convention), and this will be an error in 0.3: write "
            f"{owner}(kernels={tuple(channels)!r})",
            FutureWarning,
            stacklevel=4,  # the constructor's caller (via the settings' check)
        )
        return None, channels
    return check_size("channels", channels, 1, MAX_CHANNELS, "MAX_CHANNELS"), kernels


@dataclass(frozen=True)
class DynamicSpatialSettings(BlockSettings):
    """What the arguments of a :class:`DynamicSpatialAttention` resolve to, checked:
    :meth:`check` is the one place that validates them, the constructor builds the layers
    from the result (aliases resolved: ``gate_layer`` -> ``gate``, ``act_layer`` ->
    ``router_act``; timm's ``rd_*`` checked and left out, see the class's docs)."""

    channels: int | None
    kernel_sizes: tuple[int, ...]  # the plain branches, odd
    use_dilated: bool
    dilated_kernel: int | None  # odd; None without use_dilated
    dilated_d: int | None
    gate: str
    router_act: str
    act_layer: object  # the class passed as act_layer (it is the one that runs), or None
    temperature: float
    learnable_temperature: bool
    eps: float
    router_hidden: int
    bias: bool
    return_router_weights: bool
    return_mask: bool

    ATTRIBUTES: ClassVar[tuple[str, ...]] = (
        "channels", "eps", "return_router_weights", "return_mask", "backend", "gate",
        "router_act", "kernel_sizes", "use_dilated", "learnable_temperature",
    )

    @classmethod
    def check(
        cls, owner: str, *, channels, kernels, use_dilated, dilated_kernel, dilated_d, gate,
        temperature, learnable_temperature, eps, router_hidden, bias, return_router_weights,
        return_mask, backend, fused, rd_ratio, rd_divisor, rd_channels, act_layer, gate_layer,
        device, dtype,
    ) -> DynamicSpatialSettings:
        """Every argument of the constructor by name (``fused`` is already mapped onto
        ``backend`` there); a ``TypeError`` / ``ValueError`` names the first bad one."""
        del fused
        channels, kernels = _channels_or_old_kernels(owner, channels, kernels)
        backend, dd = cls.check_backend_and_factory(owner, backend, device, dtype)
        temperature = check_float32_temperature(check_positive_float("temperature", temperature))
        gate = check_choice("gate", gate, _GATES)
        if gate_layer is not None:
            mapped = gate_name("gate_layer", gate_layer)
            if gate not in ("sigmoid", mapped):
                raise ValueError(
                    f"gate_layer gives {mapped!r} but gate={gate!r}: give one of them"
                )
            gate = mapped
        act = "relu" if act_layer is None else activation_name("act_layer", act_layer)
        check_reduction(rd_ratio, rd_divisor, rd_channels)  # accepted from timm, not used
        router_hidden = check_size(
            "router_hidden", router_hidden, 1, MAX_ROUTER_HIDDEN, "MAX_ROUTER_HIDDEN"
        )
        eps = check_nonnegative_float("eps", eps)
        use_dilated = check_bool("use_dilated", use_dilated)
        learnable_temperature = check_bool("learnable_temperature", learnable_temperature)
        bias = check_bool("bias", bias)
        return_router_weights = check_bool("return_router_weights", return_router_weights)
        return_mask = check_bool("return_mask", return_mask)
        if learnable_temperature and temperature <= eps:
            raise ValueError(
                f"temperature={temperature!r} must exceed eps={eps!r} when "
                "learnable_temperature=True: T = softplus(t_raw) + eps is always above eps"
            )
        ks = _branch_kernels(kernels, use_dilated)
        dk, dilated_d = (_dilated_branch(dilated_kernel, dilated_d) if use_dilated
                         else (None, None))
        if not return_mask and return_router_weights:
            raise ValueError(
                "return_mask=False (return y alone) contradicts return_router_weights=True"
            )
        return cls(
            channels=channels, kernel_sizes=ks, use_dilated=use_dilated, dilated_kernel=dk,
            dilated_d=dilated_d, gate=gate, router_act=act, act_layer=act_layer,
            temperature=temperature, learnable_temperature=learnable_temperature, eps=eps,
            router_hidden=router_hidden, bias=bias,
            return_router_weights=return_router_weights, return_mask=return_mask,
            backend=backend, factory_kwargs=dd,
        )


def _branch_kernels(kernels: object, use_dilated: bool) -> tuple[int, ...]:
    """The plain branches' kernel sizes, odd (an even size raised by one, as in the seed)."""
    if isinstance(kernels, (str, bytes)) or not isinstance(kernels, Sequence):
        raise TypeError(f"kernels must be a sequence of ints, got {kernels!r}")
    if len(kernels) + use_dilated > MAX_BRANCHES:
        raise ValueError(
            f"kernels has {len(kernels)} entries, above the limit of {MAX_BRANCHES} "
            "branches (MAX_BRANCHES in lightning_attn.core.validation)"
        )
    ks = tuple(_odd_kernel(f"kernels[{i}]", k) for i, k in enumerate(kernels))
    if not ks and not use_dilated:
        raise ValueError(
            "DynamicSpatialAttention needs at least one branch: kernels=() with "
            "use_dilated=False leaves none"
        )
    return ks


def _dilated_branch(dilated_kernel: object, dilated_d: object) -> tuple[int, int]:
    """``(kernel, dilation)`` of the dilated branch: an odd kernel whose span fits."""
    dk = _odd_kernel("dilated_kernel", dilated_kernel)
    dilated_d = check_size("dilated_d", dilated_d, 1, MAX_KERNEL_EXTENT, "MAX_KERNEL_EXTENT")
    check_size("dilated_d * (dilated_kernel - 1) + 1", dilated_d * (dk - 1) + 1, 1,
               MAX_KERNEL_EXTENT, "MAX_KERNEL_EXTENT")
    return dk, dilated_d


class DynamicSpatialAttention(RecordingMixin, RouterAuxMixin, nn.Module):
    """Spatial attention whose mask mixes K convolution branches with per-sample weights.

    From ``x (B,C,H,W)``: ``s = [mean_c(x), max_c(x)]`` ``(B,2,H,W)``; a router
    ``softmax(Conv1x1(ReLU(Conv1x1(avgpool(s)))))`` gives ``rw (B,K)``; each branch is a
    ``Conv2d(2->1, k)`` on ``s``; ``mask = gate(sum_k rw[:,k] * branch_k(s) / T)``
    ``(B,1,H,W)``; ``y = x * mask``.

    Args:
        channels: ``C`` of the input, first (as timm passes it). The weights do not depend on
            it (the block acts on the channel mean and max), so it may be left out; when
            given, the forward checks the input's ``C`` against it. A sequence in this place
            is taken as ``kernels`` (the first argument of 0.1) with a ``FutureWarning``.
        kernels: kernel sizes of the plain branches. An even size is raised by one, as in
            the seed (``4`` becomes ``5``), so that padding ``k // 2`` keeps ``H, W``.
        use_dilated: add one dilated branch.
        dilated_kernel: its kernel size (even sizes raised by one).
        dilated_d: its dilation (``>= 1``).
        gate: ``"sigmoid"`` or ``"hardsigmoid"``.
        temperature: ``T > 0``; the mask is ``gate(wlogit / T)``.
        learnable_temperature: learn ``T = softplus(t_raw) + eps`` (parameter ``t_raw``);
            otherwise ``T`` is a buffer.
        eps: lower bound of a learnable ``T``.
        router_hidden: hidden width of the router.
        bias: biases in the router's convolutions.
        return_router_weights: return ``(y, mask, rw)`` instead of ``(y, mask)``.
        return_mask: ``False`` returns ``y`` alone, a tensor, like timm's attention layers
            (the masks still reach the diagnostics); needs ``return_router_weights=False``.
        backend: ``"auto"`` (default: the path measured fastest on the input's device),
            ``"plain"`` (the seed's operations one for one; double backward), ``"torch"``
            (fused autograd functions, first derivatives only) or ``"triton"`` (Triton
            kernels; CUDA). All give the same values and gradients up to rounding; see
            :mod:`lightning_attn.blocks.kernels.backend`.
        fused: deprecated: ``True`` is ``backend="torch"``, ``False`` ``backend="plain"``.
        act_layer: timm's name for the router's hidden activation (default ReLU): a timm
            activation name or class, as timm's EfficientNet passes its block's activation
            to ``se_layer``.
        gate_layer: timm's name for ``gate`` (``"sigmoid"``, ``"hard_sigmoid"`` or the class).
        rd_ratio, rd_divisor, rd_channels: timm's channel reduction of an SE layer, which
            timm's model configs pass to ``attn_layer`` / ``se_layer`` (NF-RegNet, RegNetZ,
            EfficientNet, CSPNet ...). Checked as timm means them (``rd_ratio`` in ``(0, 1]``,
            ``rd_divisor`` with ``rd_ratio``, ints ``>= 1``) and then not used: DSA has no
            channel reduction (its router starts from the 2-channel mean/max summary, its only
            width is ``router_hidden``), so they cannot change what it computes.
        device, dtype: where and in which floating dtype the parameters and buffers are
            created (the ``torch.nn`` factory keywords, which timm passes).

    Size limits (:mod:`lightning_attn.core.validation`): kernel sizes up to
    ``MAX_KERNEL_SIZE`` (255), ``dilated_d`` and the dilated span ``dilated_d *
    (dilated_kernel - 1) + 1`` up to ``MAX_KERNEL_EXTENT`` (1023), ``MAX_BRANCHES`` (64)
    branches, ``router_hidden`` up to ``MAX_ROUTER_HIDDEN`` (4096).

    Shapes: ``x (B,C,H,W) -> y (B,C,H,W), mask (B,1,H,W)[, rw (B,K)]``.

    Remedies built in: :meth:`set_temperature` writes ``T`` in place (what
    :class:`~lightning_attn.callbacks.TemperatureSchedule` calls; ``eps`` is the floor of a
    learnable ``T``), and each forward keeps its router logits ``(B,K)``
    (:attr:`router_logits`) for the auxiliary router losses
    (:func:`~lightning_attn.blocks.attention_aux_loss`).
    """

    def __init__(
        self,
        channels: int | None = None,
        kernels: Sequence[int] = _DEFAULT_KERNELS,
        use_dilated: bool = True,
        dilated_kernel: int = 7,
        dilated_d: int = 2,
        gate: Gate = "sigmoid",
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        eps: float = 1e-6,
        router_hidden: int = 8,
        bias: bool = True,
        return_router_weights: bool = False,
        return_mask: bool = True,
        backend: Backend = "auto",
        fused: bool | None = None,
        *,
        act_layer: ActLayer | None = None,
        gate_layer: ActLayer | None = None,
        rd_ratio: float | None = None,
        rd_divisor: int | None = None,
        rd_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        backend = backend_from_fused(fused, backend, type(self).__name__)  # warns at the call
        settings = DynamicSpatialSettings.check(type(self).__name__,
                                                **constructor_arguments(locals()))
        settings.set_attributes(self)
        self._build_branches(settings)
        self.gate_fn = torch.sigmoid if settings.gate == "sigmoid" else F.hardsigmoid
        dd = settings.factory_kwargs
        if settings.learnable_temperature:
            t_raw = _inverse_softplus(settings.temperature, settings.eps)
            self.t_raw = nn.Parameter(torch.tensor(t_raw, **dd))
        else:
            self.register_buffer("T", torch.tensor(settings.temperature, **dd))
        self.router = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2, settings.router_hidden, 1, bias=settings.bias, **dd),
            make_activation(settings.router_act, settings.act_layer),
            nn.Conv2d(settings.router_hidden, self.num_branches, 1, bias=settings.bias, **dd),
        )

    def _build_branches(self, s: DynamicSpatialSettings) -> None:
        """One ``Conv2d(2 -> 1, k)`` per plain kernel, then the dilated one (``branches``),
        with their count and labels (``num_branches``, ``branch_names``)."""
        dd = s.factory_kwargs
        self.branches = nn.ModuleList(
            nn.Conv2d(2, 1, kernel_size=k, padding=k // 2, bias=False, **dd)
            for k in s.kernel_sizes
        )
        names = [f"{k}x{k}" for k in s.kernel_sizes]
        if s.use_dilated:
            k, d = s.dilated_kernel, s.dilated_d
            self.branches.append(nn.Conv2d(2, 1, kernel_size=k, padding=d * (k - 1) // 2,
                                           dilation=d, bias=False, **dd))
            names.append(f"{k}x{k} d{d}")
        self.num_branches = len(self.branches)
        self.branch_names = tuple(names)

    def _get_T(self) -> torch.Tensor:
        if self.learnable_temperature:
            return F.softplus(self.t_raw) + self.eps
        return self.T

    @property
    def temperature(self) -> torch.Tensor:
        """Current temperature ``T`` (0-d tensor, differentiable when learnable)."""
        return self._get_T()

    def attention_parameters(self) -> dict[str, torch.Tensor]:
        return {"temperature": self._get_T().detach()}

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        return {"temperature": self.t_raw} if self.learnable_temperature else {}

    def attention_parameter_specs(self) -> dict[str, ParameterSpec]:
        # Too low a temperature saturates the gate (no gradient), too high a one flattens the
        # mask to 0.5; the range's ends are thresholds of the diagnostics.
        return {"temperature": ParameterSpec(
            "temperature_min", "temperature_max", 0.0, "T",
            "learnable_temperature=False, or a larger eps to keep it away from 0",
        )}

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        """Set ``T`` to ``value`` in place: the buffer ``T``, or ``t_raw`` of a learnable
        temperature (so that ``softplus(t_raw) + eps == value``, up to float32 rounding).

        The tensor stays the same object, so a compiled forward keeps its graph (no
        recompilation) and DDP replicas stay in step when every process writes the same
        value. A learnable ``T`` keeps learning from the new value unless something (like
        :class:`~lightning_attn.callbacks.TemperatureSchedule`) holds it.
        """
        value = check_float32_temperature(check_positive_float("temperature", value))
        if self.learnable_temperature:
            if value <= self.eps:
                raise ValueError(
                    f"temperature={value!r} must exceed eps={self.eps!r}: a learnable "
                    "T = softplus(t_raw) + eps is always above eps"
                )
            self.t_raw.fill_(_inverse_softplus(value, self.eps))
        else:
            self.T.fill_(value)

    def _merged_plain_weight(self) -> torch.Tensor:
        # All plain branches as one conv: zero-pad each kernel to the largest size.
        n_plain = len(self.kernel_sizes)
        kmax = max(self.kernel_sizes)
        weights = []
        for branch in list(self.branches)[:n_plain]:
            pad = (kmax - branch.kernel_size[0]) // 2
            weights.append(F.pad(branch.weight, (pad, pad, pad, pad)) if pad else branch.weight)
        return weights[0] if n_plain == 1 else torch.cat(weights, dim=0)

    def _mix_fused(self, s: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        n_plain = len(self.kernel_sizes)
        wlogit = None
        if n_plain:
            kmax = max(self.kernel_sizes)
            z = F.conv2d(s, self._merged_plain_weight(), padding=kmax // 2)  # (B,Kp,H,W)
            wlogit = torch.einsum("bk,bkhw->bhw", rw[:, :n_plain], z).unsqueeze(1)
        if self.use_dilated:
            zd = self.branches[-1](s)  # (B,1,H,W)
            term = rw[:, n_plain:, None, None] * zd
            wlogit = term if wlogit is None else wlogit + term
        return wlogit

    def forward(self, x: torch.Tensor):
        owner = type(self).__name__
        weight = self.branches[0].weight
        check_input(x, owner, self.channels, weight.dtype, weight.device, "channels")
        backend = resolve_backend(self.backend, "dsa", x)
        stash = link = None
        if backend == "torch":
            stash = GradStash()
            s = spatial_summary(x, stash)
        elif backend == "triton":
            check_triton_input(x, owner)
            # link: the apply's backward hands grad_y to the summary's, which writes grad_x
            s, link = load_triton_ops().dsa_summary_linked(x)
        else:
            avg_map = torch.mean(x, dim=1, keepdim=True)
            max_map, _ = torch.max(x, dim=1, keepdim=True)
            s = torch.cat([avg_map, max_map], dim=1)  # (B,2,H,W)

        # The small maps: the seed's operations on "plain" and "triton" (on a GPU they launch
        # fewer kernels than the CPU-oriented forms below, which "torch" uses).
        small_plain = backend in ("plain", "triton")
        if small_plain:
            logits = self.router(s).flatten(1)  # (B,K)
        else:
            # The router's 1x1 convolutions on a (B,2,1,1) map are linear layers; as such
            # they skip the convolution overhead, and their weight gradients keep the
            # parameters' layout (DDP's gradient buckets would copy channels_last ones).
            _, conv1, act, conv2 = self.router
            hidden = act(F.linear(s.mean(dim=(2, 3)), conv1.weight.flatten(1), conv1.bias))
            logits = F.linear(hidden, conv2.weight.flatten(1), conv2.bias)  # (B,K)
        rw = torch.softmax(logits, dim=1)
        self.keep_router_logits(logits)  # a reference for the auxiliary losses: no op

        if small_plain:
            z = torch.stack([br(s) for br in self.branches], dim=1)  # (B,K,1,H,W)
            wlogit = (rw[:, :, None, None, None] * z).sum(dim=1)  # (B,1,H,W)
        else:
            wlogit = self._mix_fused(s, rw)

        mask = self.gate_fn(wlogit / self._get_T())  # (B,1,H,W)
        if backend == "torch":
            y = apply_spatial_mask(x, mask, stash)
        elif backend == "triton":
            y = load_triton_ops().dsa_apply(x, mask, link)
        else:
            y = x * mask

        self.record({"mask": mask}, rw)
        if not self.return_mask:
            return y
        if self.return_router_weights:
            return y, mask, rw
        return y, mask

    def __getstate__(self) -> dict:
        # The kept router logits belong to the live forward (and a non-leaf tensor cannot be
        # deep-copied): copies and pickles start without them.
        state = super().__getstate__()
        state.pop("_router_logits", None)
        return state

    def extra_repr(self) -> str:
        act = f"router_act={self.router_act!r}, " if self.router_act != "relu" else ""
        return (
            ("" if self.channels is None else f"channels={self.channels}, ")
            + act
            + f"kernels={self.kernel_sizes}, use_dilated={self.use_dilated}, "
            f"num_branches={self.num_branches}, gate={self.gate!r}, "
            f"learnable_temperature={self.learnable_temperature}, backend={self.backend!r}"
        )
