"""Models by name: ``build_model(config, shape)`` with the input's channels, size, classes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .mlp import build_mlp
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
          "timm": build_timm}  # fmt: skip


def build_model(config, shape: InputShape) -> nn.Module:
    return MODELS[config.name](config, shape)


__all__ = ["MODELS", "InputShape", "build_model"]
