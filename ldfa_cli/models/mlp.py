"""The paper's MLP (App. C.1): Flatten -> [Linear(512) -> ReLU] x 3 -> Linear(classes), with
the authors' BatchNorm1d as an option."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from pydantic import field_validator
from torch import nn

from ldfa_cli.sections import PositiveInt, Section

from .registry import register_model


class MLPConfig(Section):
    """Flatten -> [Linear(width) -> ReLU] per hidden width -> Linear(classes) (App. C.1).

    ``init``: ``torch_default`` is nn.Linear's own Kaiming uniform (a = sqrt(5), W ~
    U(+-1/sqrt(n)), bias U(+-1/sqrt(n))): the paper's "Kaiming uniform" as the authors' code
    applies it; ``kaiming_relu`` is Kaiming uniform with the ReLU gain (W ~ U(+-sqrt(6/n)),
    zero bias). ``batch_norm`` puts BatchNorm1d before each ReLU (the authors' MLP; the
    paper's App. C.1 has none)."""

    name: Literal["mlp"] = "mlp"
    widths: list[PositiveInt] = [512, 512, 512]
    init: Literal["torch_default", "kaiming_relu"] = "torch_default"
    batch_norm: bool = False

    @field_validator("init", mode="before")
    @classmethod
    def _old_init_name(cls, value):
        return "kaiming_relu" if value == "kaiming_uniform" else value  # its name until 0.1


@register_model(MLPConfig)
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
