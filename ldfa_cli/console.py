"""Where output goes: tables and listings to stdout (they pipe), progress, notes and
warnings to stderr, ``--json`` to stdout."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def stderr_console() -> Console:
    """A stderr console; when stderr is not a terminal (logs, CI, pipes) it is 140 columns
    wide instead of rich's 80, so tables stay readable in log files."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def results_console(json_out: bool = False) -> Console:
    """Where a command's result tables go: stdout, 140 columns wide when piped; stderr under
    ``--json``, whose document alone is stdout then."""
    if json_out:
        return stderr_console()
    return Console(width=None if sys.stdout.isatty() else 140)


def print_listing(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A listing on stdout: a rich table whose cells fold to the terminal's width on a
    terminal, and plain tab-separated lines (a header first) when piped, for grep and cut."""
    if not sys.stdout.isatty():
        print("\t".join(columns))
        for row in rows:
            print("\t".join(" ".join(str(cell).split()) for cell in row))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(str, row))
    Console().print(table)
