"""The ``ldfa`` root: it only wires the commands together."""

from __future__ import annotations

import sys

import typer

from . import rules_cmd
from .errors import run_guarded

app = typer.Typer(
    name="ldfa",
    help="Train neural networks with low-dimensional error feedback (LDFA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("rules")(rules_cmd.rules)


@app.callback()
def _root() -> None:
    """Train neural networks with low-dimensional error feedback (LDFA)."""


def main() -> None:
    sys.exit(run_guarded(app))
