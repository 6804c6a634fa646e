"""GPT-2's ``Conv1D`` (Hugging Face transformers): a Linear layer whose weight is stored
transposed (in x out). :func:`convert` first replaces each by the equivalent ``nn.Linear``
(the same values transposed, in a new Parameter), so that every rule sees a Linear layer;
the conversion report's rows say which layers were Conv1D."""

from __future__ import annotations

import sys

import torch
from torch import nn


def _conv1d_class() -> type | None:
    """transformers' Conv1D, where transformers is imported (a model holding one imported
    it); None otherwise, so that converting needs no transformers."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def as_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear that computes what ``conv`` (x W + b, W of shape in x out) does."""
    weight = conv.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                       device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    linear.train(conv.training)
    linear.ldfa_was = "Conv1D"
    return linear


def linearise_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D of ``model`` by its nn.Linear; their names."""
    kind = _conv1d_class()
    if kind is None:
        return []
    names = [name for name, module in model.named_modules() if isinstance(module, kind)]
    for name in names:
        model.set_submodule(name, as_linear(model.get_submodule(name)))
    return names
