"""insert_attention on a user's own ResNet-like backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_attn import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.blocks import find_attention_blocks
from lightning_attn.modules import AttentionAfter, infer_out_channels, insert_attention


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (stride, cin) != (1, cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.skip is None else self.skip(x)))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


X = torch.rand(2, 3, 16, 16)


def test_insert_dsa_after_layers() -> None:
    model = ResNetLike()
    out = insert_attention(model, after=["layer1", "layer2"], name="dsa", kernels=(3,))
    assert out is model
    assert isinstance(model.layer1, AttentionAfter)
    assert isinstance(model.layer2.attention, DynamicSpatialAttention)
    assert model.layer2.attention.kernel_sizes == (3,)
    assert list(find_attention_blocks(model)[0]) == ["layer1.attention", "layer2.attention"]
    assert model(X).shape == (2, 5)
    model(X).sum().backward()
    assert model.layer1.attention.branches[0].weight.grad is not None


def test_insert_coord_infers_channels_every_way() -> None:
    model = ResNetLike()
    # stem: own out_channels; layer2: last submodule with num_features (bn2 = 16);
    # "layer1.0": from a forward hook on example_input.
    assert infer_out_channels(model, ["stem", "layer2"]) == {"stem": 8, "layer2": 16}
    assert infer_out_channels(model, ["layer1.0"], X) == {"layer1.0": 8}
    insert_attention(model, after=["stem", "layer1.0", "layer2"], name="coord",
                     example_input=X, reduction=4)
    chans = {n: b.in_channels for n, b in find_attention_blocks(model)[0].items()}
    assert chans == {"stem.attention": 8, "layer1.0.attention": 8, "layer2.attention": 16}
    assert isinstance(model.layer2.attention, CoordinateAttention)
    assert model.training  # the dummy pass restored train mode
    assert model(X).shape == (2, 5)


def test_explicit_channels() -> None:
    model = insert_attention(ResNetLike(), after=["layer1"], name="coord", channels={"layer1": 8})
    assert model.layer1.attention.in_channels == 8
    model = insert_attention(ResNetLike(), after=["layer2"], name="coord", channels=16)
    assert model(X).shape == (2, 5)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"no submodule named 'layer3'.*'layer1'.*'layer2'"):
        insert_attention(ResNetLike(), after=["layer1", "layer3"])


@pytest.mark.parametrize(
    ("after", "kwargs", "error", "match"),
    [
        (["layer1"], {"name": "se"}, ValueError, "known names"),
        ("layer1", {}, TypeError, "list of submodule names"),
        ([], {}, TypeError, "list of submodule names"),
        (["layer1", "layer1"], {}, ValueError, "twice"),
        (["layer1", "layer1.0"], {}, ValueError, "its submodule"),
        (["layer1"], {"channels": {"layer9": 3}}, ValueError, "layer9"),
        (["head.1"], {"name": "coord"}, ValueError, "cannot infer"),
        (["layer1"], {"channels": 4.0}, TypeError, "channels must be"),
        (["layer1"], {"channels": True}, TypeError, "channels must be"),
    ],
)
def test_bad_arguments(after, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        insert_attention(ResNetLike(), after=after, **kwargs)
