"""Models by name: each file registers its config class and builder (``registry.py``);
``build_model(config, shape)`` builds the one a recipe's ``model`` section names."""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from .registry import MODELS, InputShape, register_model

# Every module of this folder is imported, so that a model registers itself by having its
# file here: adding a model is one file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_model(config, shape: InputShape) -> nn.Module:
    """The model of a recipe's ``model`` section for inputs of ``shape``; an image the
    architecture cannot take (too small for its downsampling) is a one-line config error
    now rather than a crash in the first step."""
    model = MODELS[config.name].build(config, shape)
    size = f"{shape.size} tokens" if shape.tokens else f"{shape.size}x{shape.size}"
    check_forward(model, shape, f"model {config.name!r} at {size}")
    return model


def check_forward(model: nn.Module, shape: InputShape, where: str) -> None:
    """One forward of a blank batch in eval mode (no RNG, no BatchNorm statistics moved)."""
    import torch

    from ldfa_cli.errors import ConfigError

    from .timm_any import first_line

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(shape.blank())
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(
            f"{where} cannot run: {first_line(error)}; pad or resize the "
            "images (data.pad_to, data.resize) or change the model"
        ) from None
    finally:
        model.train(was_training)


__all__ = ["MODELS", "InputShape", "build_model", "register_model"]
