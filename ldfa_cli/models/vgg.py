"""The paper's VGG-style CNN (Table C1), with a width multiplier for small machines."""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Literal

from pydantic import Field
from torch import nn

from ldfa_cli.sections import Fraction, Section

from .registry import register_model


class VGGConfig(Section):
    """Table C1: four blocks of 2x (conv3x3 + BN + ReLU), widths 64-128-256-512 times
    ``width_multiplier``, then Linear+ReLU, dropout, Linear."""

    name: Literal["vgg"] = "vgg"
    width_multiplier: Annotated[float, Field(gt=0.0)] = 1.0
    dropout: Fraction = 0.4


BLOCK_WIDTHS = (64, 128, 256, 512)


def _width(base: int, multiplier: float) -> int:
    return max(1, round(base * multiplier))


@register_model(VGGConfig)
def build_vgg(config, shape) -> nn.Sequential:
    """Four blocks of 2 x (conv3x3 + BN + ReLU), max-pool after blocks 1-3, global average
    pool after block 4; then Linear + ReLU, Dropout, Linear. Convs are named
    ``features.block{b}.conv{i}``, the classifier ``classifier.fc`` and ``classifier.head``."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    channels = shape.channels
    for b, base in enumerate(BLOCK_WIDTHS, start=1):
        width = _width(base, config.width_multiplier)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in (1, 2):
            layers[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
            layers[f"relu{i}"] = nn.ReLU()
            channels = width
        layers["pool"] = nn.MaxPool2d(2) if b < len(BLOCK_WIDTHS) else nn.AdaptiveAvgPool2d(1)
        blocks[f"block{b}"] = nn.Sequential(layers)
    hidden = _width(256, config.width_multiplier)
    classifier = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc=nn.Linear(channels, hidden),
            relu=nn.ReLU(),
            dropout=nn.Dropout(config.dropout),
            head=nn.Linear(hidden, shape.classes),
        )
    )
    return nn.Sequential(OrderedDict(features=nn.Sequential(blocks), classifier=classifier))
