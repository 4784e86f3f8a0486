"""A small configurable CNN with an attention block after every stage (pure ``torch.nn``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_attn.blocks import attention_names, create_attention
from lightning_attn.core.validation import check_choice, check_int

from .options import Activation, AttentionName, Downsample
from .wrappers import OutputOnly

__all__ = ["ACTIVATIONS", "DOWNSAMPLING", "AttentionCNN", "ConvBNAct"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
DOWNSAMPLING: tuple[str, ...] = ("maxpool", "avgpool", "stride")


def check_config(
    in_channels: int,
    num_classes: int,
    stage_widths: Sequence[int],
    depth: int,
    attention: str,
    attention_kwargs: Mapping[str, Any] | None,
    activation: str,
    downsample: str,
    dropout: float,
    stem_stride: int = 1,
    attention_factories: Mapping[str, Callable[..., nn.Module]] | None = None,
) -> None:
    """Raise a ``ValueError`` / ``TypeError`` naming the first bad argument and its value."""
    check_int("in_channels", in_channels, 1)
    check_int("num_classes", num_classes, 2)
    if isinstance(stage_widths, (str, bytes)) or not isinstance(stage_widths, Sequence):
        raise TypeError(f"stage_widths must be a sequence of ints, got {stage_widths!r}")
    if len(stage_widths) == 0:
        raise ValueError("stage_widths must name at least one stage, got []")
    for i, w in enumerate(stage_widths):
        check_int(f"stage_widths[{i}]", w, 1)
    check_int("depth", depth, 1)
    check_int("stem_stride", stem_stride, 1)
    known = attention_names(attention_factories)
    if not isinstance(attention, str) or attention not in known:
        raise ValueError(f"unknown attention {attention!r}; known names: {known}")
    if attention_kwargs is not None and not isinstance(attention_kwargs, Mapping):
        raise TypeError(f"attention_kwargs must be a dict or None, got {attention_kwargs!r}")
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("downsample", downsample, DOWNSAMPLING)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


class ConvBNAct(nn.Sequential):
    """``Conv3x3 (no bias) -> BatchNorm -> activation``: ``(B,Cin,H,W) -> (B,Cout,H/s,W/s)``."""

    def __init__(
        self, cin: int, cout: int, activation: Activation = "relu", stride: int = 1
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(cout),
                act=ACTIVATIONS[activation](),
            )
        )


def _make_block(
    name: str, channels: int, kwargs: Mapping[str, Any],
    factories: Mapping[str, Callable[..., nn.Module]] | None,
) -> nn.Module:
    try:
        return create_attention(name, channels, factories=factories, **dict(kwargs))
    except TypeError as err:  # an unknown keyword: say which block and which kwargs
        raise TypeError(f"attention_kwargs {dict(kwargs)!r} do not fit {name!r}: {err}") from err


class AttentionCNN(nn.Module):
    """``features`` (stages, each followed by an attention block) -> global avg pool -> linear.

    ``features`` is ``stage1, attn1, stage2, attn2, ...``: stage ``i`` is ``depth`` ConvBNAct
    layers of width ``stage_widths[i]``, preceded (for ``i > 0``) by a 2x downsampling
    (max-pool, avg-pool or a stride-2 first conv); ``attn{i}`` is
    ``OutputOnly(create_attention(attention, width, **attention_kwargs))`` (``attention`` may
    name one of ``attention_factories``, blocks of your own for this network: see
    :func:`~lightning_attn.blocks.create_attention`). The very first conv has stride
    ``stem_stride`` (2 quarters the cost of every stage on large images).

    Shapes: ``x (B,in_channels,H,W) -> logits (B,num_classes)``;
    ``H, W >= stem_stride * 2**(stages-1)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        stage_widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
        attention: AttentionName = "dsa",
        attention_kwargs: Mapping[str, Any] | None = None,
        activation: Activation = "relu",
        downsample: Downsample = "maxpool",
        dropout: float = 0.0,
        stem_stride: int = 1,
        attention_factories: Mapping[str, Callable[..., nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        check_config(
            in_channels, num_classes, stage_widths, depth, attention, attention_kwargs,
            activation, downsample, dropout, stem_stride, attention_factories,
        )
        self.in_channels = in_channels
        self.num_stages = len(stage_widths)
        self.min_side = stem_stride * 2 ** (self.num_stages - 1)
        kwargs = dict(attention_kwargs or {})
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, width in enumerate(stage_widths):
            stage: list[nn.Module] = []
            stride = stem_stride if i == 0 else (2 if downsample == "stride" else 1)
            if i > 0 and downsample == "maxpool":
                stage.append(nn.MaxPool2d(2))
            elif i > 0 and downsample == "avgpool":
                stage.append(nn.AvgPool2d(2))
            for j in range(depth):
                stage.append(ConvBNAct(cin, width, activation, stride=stride if j == 0 else 1))
                cin = width
            layers[f"stage{i + 1}"] = nn.Sequential(*stage)
            layers[f"attn{i + 1}"] = OutputOnly(
                _make_block(attention, width, kwargs, attention_factories))
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)

    def check_input(self, x: object) -> None:
        """Raise a clear error unless ``x`` is a float ``(B, in_channels, H, W)`` tensor."""
        expected = f"a float tensor of shape (B, {self.in_channels}, H, W)"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected images as {expected}, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images as {expected}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected images as {expected}, got dtype {x.dtype}")
        if min(x.shape[2], x.shape[3]) < self.min_side:
            raise ValueError(
                f"images must be at least {self.min_side}x{self.min_side} for "
                f"{self.num_stages} stages, got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        z = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(z))
