"""Build what a run needs from a recipe: device, data, model with its feedback layers."""

from __future__ import annotations

import os

import torch
from torch import nn

from ldfa_cli.data import TrainingData, dataset_shape
from ldfa_cli.errors import ConfigError
from ldfa_cli.feedback import RULES, convert, feedback_parameters, fit_to_state
from ldfa_cli.models import build_model
from ldfa_cli.shapes import InputShape


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` prefers CUDA, then MPS, then CPU; an unavailable device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available; use --device cpu")
    if name not in ("cpu", "mps"):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or mps")
    return torch.device(name)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_network(recipe, data: TrainingData, device: torch.device) -> nn.Module:
    """The recipe's model on ``device`` (seeded, so every rank builds the same one), with
    its layers converted to the recipe's feedback rule. ``bp`` leaves the model as it is."""
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, data.input_shape).to(device)
    return convert_as_recipe(model, recipe.feedback, data.example(2))


def shaped_network(recipe, device: torch.device, example: torch.Tensor | None = None,
                   shape: InputShape | None = None):  # fmt: skip
    """The recipe's model (seeded, converted) for its dataset's shape (or ``shape``), built
    without loading the data; ``example`` (default: a blank input) is the batch that probes
    the conversion."""
    shape = shape or dataset_shape(recipe.data)
    if example is None:
        example = shape.blank().to(device)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, shape).to(device)
    return convert_as_recipe(model, recipe.feedback, example[:2])


def synthetic_network(recipe, batch_size: int, device: torch.device):
    """The recipe's model (converted) and a random batch of its dataset's shape: for FLOP
    counts and timings, which need no real data."""
    generator = torch.Generator().manual_seed(recipe.train.seed)
    x, y = dataset_shape(recipe.data).random_batch(batch_size, generator)
    return shaped_network(recipe, device, x.to(device)), x.to(device), y.to(device)


def load_trained(target, which: str, device: torch.device, shape: InputShape | None = None):
    """(checkpoint path, its state, its recipe, the model with its weights) of a run folder
    (``checkpoints/<which>.pt``) or a checkpoint file; the dataset is not read (but for an
    image folder's classes or a text's vocabulary, unless ``shape`` says them)."""
    from ldfa_cli.config import validate
    from ldfa_cli.errors import CheckpointError

    from .checkpoint import find_checkpoint, load_checkpoint

    path = find_checkpoint(target, f"{which}.pt")
    state = load_checkpoint(path, map_location=device)
    recipe = validate(state.get("config") or {}, source=f"{path} (its config)")
    model = shaped_network(recipe, device, shape=shape)
    try:
        fit_to_state(model, state["model"])  # a rank cut in training
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as error:
        first = str(error).splitlines()[0][:160]
        raise CheckpointError(f"{path} does not fit its own recipe's model: {first}") from None
    return path, state, recipe, model


def convert_as_recipe(model: nn.Module, fb, example: torch.Tensor) -> nn.Module:
    """Convert ``model``'s layers as the recipe's ``feedback`` section says; a rule whose
    layers are plain autograd (``bp``) keeps the model as it is."""
    if not RULES[fb.rule].plain_autograd:
        convert(model, fb.rule, rank=fb.rank, include=fb.include, exclude=fb.exclude,
                ranks=fb.ranks, rank_scale=fb.rank_scale, force_grouped=fb.force_grouped,
                example_input=example, **fb.options)  # fmt: skip
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    feedback = {id(p) for p in feedback_parameters(model)}
    forward = sum(p.numel() for p in model.parameters() if id(p) not in feedback)
    learned = sum(p.numel() for p in model.parameters() if id(p) in feedback)
    fixed = sum(b.numel() for n, b in model.named_buffers() if "feedback_" in n)
    return {"forward": forward, "feedback_learned": learned, "feedback_fixed": fixed}
