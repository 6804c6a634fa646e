"""One forward pass that tells the converter about a model's layers before it swaps them:
each layer's call order, whether its input needs a gradient, its input and output shapes."""

from __future__ import annotations

import torch
from torch import nn


def probe(model: nn.Module, example_input, names) -> dict[str, dict]:
    """For each named module reached by a forward pass on ``example_input``: its call
    order, whether its input needs a gradient, and its input and output shapes (of a
    tuple's first element: a Hugging Face block returns its hidden states in a tuple)."""
    found: dict[str, dict] = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, args, out):
            if isinstance(out, tuple) and out:
                out = out[0]
            if name not in found and args and isinstance(out, torch.Tensor):
                found[name] = {
                    "order": len(found),
                    "needs_grad": args[0].requires_grad,
                    "input": tuple(args[0].shape),
                    "output": tuple(out.shape),
                }

        return hook

    hooks = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    try:  # eval mode: the probe must not move BatchNorm statistics
        model.eval()
        with torch.enable_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def inputs_without_grad(model: nn.Module, example_input, names) -> set[str]:
    """Names of layers whose input needs no gradient in a forward pass on ``example_input``."""
    return {n for n, info in probe(model, example_input, names).items() if not info["needs_grad"]}


class capture_inputs(dict):
    """name -> the first input tensor the named module received, while the hooks stay."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            if name not in self and args:
                self[name] = args[0]

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
