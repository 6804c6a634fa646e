"""The paper's MLP (App. C.1): Flatten -> [Linear(512) -> ReLU] x 3 -> Linear(classes), with
the authors' BatchNorm1d as an option."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def build_mlp(config, shape) -> nn.Sequential:
    """Layers are named ``fc1``, ``fc2``, ... and ``head`` (``bn1``... with batch_norm), for
    include/exclude patterns."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = shape.channels * shape.size * shape.size
    for i, hidden in enumerate(config.widths, start=1):
        layers[f"fc{i}"] = nn.Linear(width, hidden)
        if config.batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm1d(hidden)
        layers[f"act{i}"] = nn.ReLU()
        width = hidden
    layers["head"] = nn.Linear(width, shape.classes)
    model = nn.Sequential(layers)
    if config.init == "kaiming_relu":  # torch_default: nn.Linear's init as it stands
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return model
