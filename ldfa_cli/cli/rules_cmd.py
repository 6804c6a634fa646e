"""``ldfa rules``: the credit-assignment rules, their equations and options."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ldfa_cli.console import print_listing


def rules(
    plugins: list[Path] = typer.Option(
        None, "--plugin", help="A Python file registering rules of your own (repeatable)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """List the feedback rules with the paper's equations and each rule's options."""
    from ldfa_cli.feedback import RULES, load_plugins
    from ldfa_cli.feedback.rule import RANK_NOTE

    load_plugins(plugins or [])
    rows = [
        {
            "rule": name,
            "summary": cls.summary,
            "equations": cls.equations,
            "uses_rank": cls.uses_rank,
            "options": cls().options(),
        }
        for name, cls in sorted(RULES.items())
    ]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    print_listing("feedback rules",
                  ["rule", "what it sends upstream / learns", "paper", "options (defaults)"],
                  [[row["rule"], row["summary"], row["equations"],
                    ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"]
                   for row in rows])  # fmt: skip
    print(RANK_NOTE)
