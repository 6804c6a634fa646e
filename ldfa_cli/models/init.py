"""Weight initialisations a model config can ask for."""

from __future__ import annotations

from torch import nn


def apply_init(model: nn.Module, init: str) -> nn.Module:
    """``torch_default`` leaves each layer's own init; ``xavier`` draws every Linear and
    Conv weight Xavier-uniform with zero biases (BioTorch's benchmark init)."""
    if init == "xavier":
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model
