"""``ldfa recipes`` and ``ldfa validate``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from ldfa_cli.config import load_recipe, shipped_recipes
from ldfa_cli.console import stderr_console
from ldfa_cli.errors import LDFAError
from ldfa_cli.feedback import FeedbackConfigError


def recipes(json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout.")) -> None:
    """List the shipped recipes, one line each."""
    rows = []
    for path in shipped_recipes():
        recipe, _ = load_recipe(str(path))
        fb = recipe.feedback
        rows.append({"name": path.stem, "model": recipe.model.name, "dataset": recipe.data.dataset,
                     "rule": fb.rule, "rank": fb.rank, "epochs": recipe.train.epochs,
                     "description": recipe.description.strip().splitlines()[0]
                     if recipe.description.strip() else ""})  # fmt: skip
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} shipped recipes", expand=False)
    for column in ("name", "model", "dataset", "rule", "rank", "epochs"):
        table.add_column(column, no_wrap=True)
    table.add_column("description", no_wrap=True, overflow="ellipsis", max_width=60)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("name", "model", "dataset", "rule", "rank",
                                              "epochs", "description")))  # fmt: skip
    stderr_console().print(table)


def validate(specs: list[str] = typer.Argument(..., help="Recipe files or names.")) -> None:
    """Check recipes against the schema; exit 2 if any is invalid."""
    console = stderr_console()
    failed = 0
    for spec in specs:
        try:
            load_recipe(spec)
            console.print(f"[green]ok[/green]     {spec}")
        except (LDFAError, FeedbackConfigError) as error:
            failed += 1
            console.print(f"[red]invalid[/red] {spec}: {error}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=2)
