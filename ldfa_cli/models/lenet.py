"""LeNet as BioTorch benchmarks it: ``mnist`` (32x32 grayscale: conv 6, 16, 120 of 5x5 with
ReLU and 2x2 max-pooling, then 84, classes) and ``cifar`` (conv 32, 64, 128 of 3x3, ReLU,
max-pooling, global average pooling, then 256, classes)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import nn

from ldfa_cli.sections import Section

from .init import apply_init
from .registry import register_model


class LeNetConfig(Section):
    """LeNet as BioTorch benchmarks it: ``mnist`` (32x32 grayscale, conv 6-16-120 of 5x5) or
    ``cifar`` (conv 32-64-128 of 3x3); ``init: xavier`` as BioTorch's configs."""

    name: Literal["lenet"] = "lenet"
    variant: Literal["mnist", "cifar"] = "mnist"
    init: Literal["torch_default", "xavier"] = "torch_default"


@register_model(LeNetConfig)
def build_lenet(config, shape) -> nn.Sequential:
    """Layers ``conv1``..``conv3``, ``fc``, ``head``."""
    c = shape.channels
    if config.variant == "mnist":
        if shape.size != 32:
            from ldfa_cli.errors import ConfigError

            raise ConfigError(f"LeNet (mnist) takes 32x32 images, got {shape.size}x{shape.size}:"
                              " set data.resize=32 or data.pad_to=32")  # fmt: skip
        layers = OrderedDict(
            conv1=nn.Conv2d(c, 6, 5), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(16, 120, 5), relu3=nn.ReLU(), flatten=nn.Flatten(),
            fc=nn.Linear(120, 84), relu4=nn.ReLU(), head=nn.Linear(84, shape.classes),
        )  # fmt: skip
    else:
        layers = OrderedDict(
            conv1=nn.Conv2d(c, 32, 3), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, 3), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
            conv3=nn.Conv2d(64, 128, 3), relu3=nn.ReLU(), pool3=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(), fc=nn.Linear(128, 256), relu4=nn.ReLU(),
            head=nn.Linear(256, shape.classes),
        )  # fmt: skip
    return apply_init(nn.Sequential(layers), config.init)
