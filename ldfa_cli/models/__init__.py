"""Models by name: ``build_model(config, shape)`` with the input's channels, size, classes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .lenet import build_lenet
from .mlp import build_mlp
from .resnet_cifar import build_resnet_cifar
from .retina import build_retina
from .timm_any import build_timm
from .vgg import build_vgg
from .vit import build_vit


@dataclass(frozen=True)
class InputShape:
    channels: int
    size: int  # square images
    classes: int


MODELS = {"mlp": build_mlp, "vgg": build_vgg, "vit": build_vit, "retina": build_retina,
          "timm": build_timm, "lenet": build_lenet, "resnet_cifar": build_resnet_cifar}  # fmt: skip


def build_model(config, shape: InputShape) -> nn.Module:
    """The model of a recipe's ``model`` section for inputs of ``shape``; an image the
    architecture cannot take (too small for its downsampling) is a one-line config error
    now rather than a crash in the first step."""
    model = MODELS[config.name](config, shape)
    check_forward(model, shape, f"model {config.name!r} at {shape.size}x{shape.size}")
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
            model(torch.zeros(2, shape.channels, shape.size, shape.size))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ConfigError(
            f"{where} cannot run: {first_line(error)}; pad or resize the "
            "images (data.pad_to, data.resize) or change the model"
        ) from None
    finally:
        model.train(was_training)


__all__ = ["MODELS", "InputShape", "build_model"]
