"""The retina model of Lindsey et al. 2019 (Table C3): grayscale input, two retina convs
(the second one's width is the bottleneck), VVS convs, FC, dropout, classifier."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import nn

from ldfa_cli.sections import Fraction, PositiveInt, Section

from .registry import register_model


class RetinaConfig(Section):
    """Table C3 (Lindsey et al. 2019): two 9x9 retina convs (the second one's width is the
    bottleneck), VVS convs, FC, dropout, classifier; grayscale input."""

    name: Literal["retina"] = "retina"
    retina_channels: PositiveInt = 32
    bottleneck: PositiveInt = 32
    vvs_channels: PositiveInt = 32
    vvs_layers: PositiveInt = 3
    kernel_size: PositiveInt = 9
    fc_width: PositiveInt = 1024
    dropout: Fraction = 0.5


@register_model(RetinaConfig)
def build_retina(config, shape) -> nn.Sequential:
    """Layers ``retina1``, ``retina2`` (bottleneck), ``vvs1``..``vvsN``, ``fc``, ``head``."""
    k, pad = config.kernel_size, config.kernel_size // 2
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["retina1"] = nn.Conv2d(shape.channels, config.retina_channels, k, padding=pad)
    layers["retina1_relu"] = nn.ReLU()
    layers["retina2"] = nn.Conv2d(config.retina_channels, config.bottleneck, k, padding=pad)
    layers["retina2_relu"] = nn.ReLU()
    channels = config.bottleneck
    for i in range(1, config.vvs_layers + 1):
        layers[f"vvs{i}"] = nn.Conv2d(channels, config.vvs_channels, k, padding=pad)
        layers[f"vvs{i}_relu"] = nn.ReLU()
        channels = config.vvs_channels
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels * shape.size * shape.size, config.fc_width)
    layers["fc_relu"] = nn.ReLU()
    layers["dropout"] = nn.Dropout(config.dropout)
    layers["head"] = nn.Linear(config.fc_width, shape.classes)
    return nn.Sequential(layers)
