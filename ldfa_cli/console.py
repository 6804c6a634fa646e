"""Rich output goes to stderr; stdout is kept for --json."""

from __future__ import annotations

import sys

from rich.console import Console


def stderr_console() -> Console:
    """A stderr console; when stderr is not a terminal (logs, CI, pipes) it is 140 columns
    wide instead of rich's 80, so tables stay readable in log files."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 140)
