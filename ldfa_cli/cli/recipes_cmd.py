"""``ldfa recipes`` and ``ldfa validate``."""

from __future__ import annotations

import json

import typer

from ldfa_cli.console import print_listing
from ldfa_cli.errors import LDFAError


def recipes(json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout.")) -> None:
    """List the shipped recipes, one line each."""
    from ldfa_cli.config import load_recipe, shipped_recipes

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
    columns = ["name", "model", "dataset", "rule", "rank", "epochs", "description"]
    print_listing(f"{len(rows)} shipped recipes", columns,
                  [[row[c] for c in columns] for row in rows])  # fmt: skip


def validate(specs: list[str] = typer.Argument(..., help="Recipe files or names.")) -> None:
    """Check recipes against the schema.

    A line each on stdout ("ok" or "invalid" and the reason); exit 2 if any is invalid."""
    from ldfa_cli.config import load_recipe

    failed = 0
    for spec in specs:
        try:
            load_recipe(spec)
            print(f"ok       {spec}")
        except LDFAError as error:
            failed += 1
            print(f"invalid  {spec}: {error}")
    if failed:
        raise typer.Exit(code=2)
