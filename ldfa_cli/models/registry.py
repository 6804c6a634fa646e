"""The model registry: a model is its config class (the recipe's ``model`` section, a
:class:`~ldfa_cli.sections.Section` with a ``name`` literal) and its builder, registered
together by decorator in the model's own file, so adding a model is one file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ldfa_cli.sections import Section
from ldfa_cli.shapes import InputShape


@dataclass(frozen=True)
class ModelEntry:
    config: type[Section]
    build: Callable[[Section, InputShape], nn.Module]


MODELS: dict[str, ModelEntry] = {}


def register_model(config: type[Section]):
    """Decorator on a builder ``build(config, shape) -> nn.Module``: registers it with its
    config class under the config's ``name``."""

    def register(build):
        name = config.model_fields["name"].default
        known = MODELS.get(name)
        if known is not None and known.build is not build:
            raise ValueError(f"model {name!r} is already registered (by {known.build.__module__})")
        MODELS[name] = ModelEntry(config, build)
        return build

    return register
