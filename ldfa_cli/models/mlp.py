"""The paper's MLP (App. C.1): Flatten -> [Linear(512) -> ReLU] x 3 -> Linear(classes)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def build_mlp(config, shape) -> nn.Sequential:
    """Layers are named ``fc1``, ``fc2``, ... and ``head``, for include/exclude patterns."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = shape.channels * shape.size * shape.size
    for i, hidden in enumerate(config.widths, start=1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        layers[f"act{i}"] = nn.ReLU()
        width = hidden
    layers["head"] = nn.Linear(width, shape.classes)
    model = nn.Sequential(layers)
    if config.init == "kaiming_uniform":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return model
