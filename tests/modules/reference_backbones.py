"""Backbones laid out like torchvision's ResNet-18 and a timm stage-based model, written here
so the tests need neither package (same module names, hence the same state-dict keys)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """torchvision ``resnet.BasicBlock``: conv1/bn1/relu/conv2/bn2 and an optional
    ``downsample`` (``nn.Sequential(conv1x1, bn)``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision ``resnet18`` layout (``width=64`` is the real one; tests use less)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = w[0]
        for i, cout in enumerate(w):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBlock(nn.Module):
    """timm ConvNeXt-style block: depthwise conv, norm, 1x1 MLP, layer scale ``gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.mlp(self.norm(self.conv_dw(x)))


class Stage(nn.Module):
    """timm ``ConvNeXtStage``-style: ``downsample`` then ``blocks`` (an ``nn.Sequential``)."""

    def __init__(self, cin: int, cout: int, depth: int = 1) -> None:
        super().__init__()
        if cin == cout:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 2, 2))
        self.blocks = nn.Sequential(*(ConvBlock(cout) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """timm ``ClassifierHead``-style: ``global_pool``, ``flatten``, ``fc``."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.global_pool(x)))


class StagedNet(nn.Module):
    """timm-style model: ``stem``, ``stages`` (an ``nn.Sequential`` of :class:`Stage`),
    ``head``, with ``forward_features`` / ``forward_head``."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, ...] = (8, 16, 24, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))
        cins = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(*(Stage(a, b) for a, b in zip(cins, dims, strict=True)))
        self.head = ClassifierHead(dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
