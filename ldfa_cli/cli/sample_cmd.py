"""``ldfa sample``: text from a trained language model's checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from ldfa_cli.errors import CheckpointError, ConfigError


def sample(
    run: Path = typer.Argument(..., help="A language model's run folder."),
    prompt: str = typer.Option("\n", "--prompt", help="The text the model continues."),
    tokens: int = typer.Option(200, "--tokens", min=1, help="Tokens to draw."),
    temperature: float = typer.Option(
        1.0, "--temperature", min=0.0, help="Softmax temperature; 0 takes the likeliest."
    ),
    top_k: int = typer.Option(None, "--top-k", min=1, help="Draw among the k likeliest."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draws."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or mps."),
) -> None:
    """Print text from a trained language model: the prompt, then drawn tokens."""
    import torch

    from ldfa_cli.analysis.generate import generate
    from ldfa_cli.data.text import Tokenizer
    from ldfa_cli.engine.build import load_trained, pick_device
    from ldfa_cli.shapes import InputShape

    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got '{checkpoint}'")
    vocabulary = run / "tokenizer.json"
    if not vocabulary.is_file():
        raise ConfigError(f"{run} is not a language model's run folder (no tokenizer.json): "
                          "ldfa sample reads runs of a recipe with data.dataset: text")  # fmt: skip
    try:
        tokenizer = Tokenizer.from_json(vocabulary.read_text(encoding="utf-8"))
    except ValueError as error:  # (undecodable bytes and bad JSON are ValueErrors too)
        raise CheckpointError(f"{vocabulary} is damaged ({str(error).splitlines()[0][:80]}): "
                              "it is the run's vocabulary, written when it started; restore "
                              "it from a copy of the run") from None  # fmt: skip
    target = pick_device(device)
    config_block = _block_size(run)
    shape = InputShape(1, config_block, tokenizer.size, tokens=True)
    _, _, recipe, model = load_trained(run, checkpoint, target, shape=shape)
    context = tokenizer.encode(prompt).to(target)
    if len(context) == 0:
        raise ConfigError("--prompt is empty: give at least one character")
    generator = torch.Generator(device=target).manual_seed(seed)
    text = generate(model, context, tokens, recipe.data.block_size, temperature, top_k,
                    generator)  # fmt: skip
    print(tokenizer.decode(text.tolist()))


def _block_size(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "config.yaml").read_text())["data"]["block_size"])
