"""The ``ldfa`` root: it only wires the commands together."""

from __future__ import annotations

import sys

import typer

from . import (
    bench_cmd,
    eval_cmd,
    flops_cmd,
    plot_cmd,
    recipes_cmd,
    rf_cmd,
    rules_cmd,
    sample_cmd,
    sweep_cmd,
    theory_cmd,
    train_cmd,
)
from .errors import run_guarded

app = typer.Typer(
    name="ldfa",
    help="Train neural networks with low-dimensional error feedback (LDFA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("validate")(recipes_cmd.validate)
app.command("recipes")(recipes_cmd.recipes)
app.command("rules")(rules_cmd.rules)
app.command("theory")(theory_cmd.theory)
app.command("flops")(flops_cmd.flops)
app.command("sweep")(sweep_cmd.sweep)
app.command("bench")(bench_cmd.bench)
app.command("plot")(plot_cmd.plot)
app.command("rf")(rf_cmd.rf)
app.command("sample")(sample_cmd.sample)


def _version(shown: bool) -> None:
    if shown:
        from importlib import metadata

        print(f"ldfa {metadata.version('ldfa-cli')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train neural networks with low-dimensional error feedback (LDFA)."""


def main() -> None:
    sys.exit(run_guarded(app))
