"""Any timm architecture by name: ``timm.create_model(architecture, pretrained=False)``
with the dataset's classes and channels, and its image size where the model takes one."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import field_validator
from torch import nn

from ldfa_cli.sections import Section

from .registry import register_model


class TimmConfig(Section):
    """Any timm architecture (``timm.create_model(architecture, pretrained=False)``; the
    dataset sets ``num_classes``, ``in_chans`` and, where the model takes it, ``img_size``;
    ``kwargs`` go to the model, e.g. ``{drop_path_rate: 0.1}``). Every Linear and Conv the
    converter meets is converted or listed with the reason it was kept."""

    name: Literal["timm"] = "timm"
    architecture: str
    kwargs: dict = {}

    @field_validator("architecture")
    @classmethod
    def _known(cls, architecture: str) -> str:
        return known_architecture(architecture)


def known_architecture(name: str) -> str:
    """``name`` if timm knows it; otherwise a one-line error with the closest names."""
    import timm

    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else (
        "timm.list_models() lists them")  # fmt: skip
    raise ValueError(f"timm has no architecture {name!r}; {hint}")


@register_model(TimmConfig)
def build_timm(config, shape) -> nn.Module:
    """The model, randomly initialised (no download): ``num_classes`` and ``in_chans``
    from the dataset unless ``kwargs`` sets them, ``img_size`` too for models that take it
    (ViT, Swin, Mixer...; convolutional models are size-agnostic and refuse the keyword)."""
    import timm

    from ldfa_cli.errors import ConfigError

    kwargs = {"num_classes": shape.classes, "in_chans": shape.channels, **config.kwargs}
    sized = {"img_size": shape.size, **kwargs}
    where = f"timm's {config.architecture!r} with {kwargs} at {shape.size}x{shape.size}"
    try:
        try:
            model = timm.create_model(config.architecture, pretrained=False, **sized)
        except TypeError as error:
            if "img_size" not in str(error) or "img_size" in config.kwargs:
                raise
            model = timm.create_model(config.architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise ConfigError(f"{where} cannot be built: {first_line(error)}; change "
                          "model.kwargs or the image size (data.pad_to)") from None  # fmt: skip
    return model


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__
