"""He et al. (2016)'s CIFAR ResNets (ResNet-20, 32, 44, 56, 110: depth 6n + 2): a 3x3 stem
of 16 channels, three stages of n basic blocks at 16, 32 and 64 channels (stride 2 into the
second and third), global average pooling and a linear head. The shortcut is the paper's
option A: identity, subsampled and zero-padded where the width doubles (no parameters)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from ldfa_cli.sections import PositiveInt, Section

from .init import apply_init
from .registry import register_model


class ResNetCifarConfig(Section):
    """He et al. 2016's CIFAR ResNet, depth 6n + 2 (20, 32, 44, 56, 110): stages of 16, 32,
    64 channels, option-A shortcuts."""

    name: Literal["resnet_cifar"] = "resnet_cifar"
    depth: PositiveInt = 20
    init: Literal["torch_default", "xavier"] = "torch_default"

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, depth: int) -> int:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth is 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        return depth


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels on both sides."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = PadShortcut(width - inputs) if stride != 1 or inputs != width else (
            nn.Identity())  # fmt: skip

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, channels: int, classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inputs = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(inputs, width, stride if i == 0 else 1))
                inputs = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model(ResNetCifarConfig)
def build_resnet_cifar(config, shape) -> CifarResNet:
    return apply_init(CifarResNet(config.depth, shape.channels, shape.classes), config.init)
