"""Errors become one line on stderr and an exit code; a traceback only with LDFA_DEBUG=1."""

from __future__ import annotations

import os
import sys

from ldfa_cli.errors import LDFAError, TrainingError

USAGE = 2  # usage and configuration errors (Typer uses 2 for a bad command line too)
FAILURE = 1  # a run that started and failed


class UsageError(Exception):
    """A user-facing problem with the command line, a recipe or a file: one line, exit 2."""


def run_guarded(app) -> int:
    """Run the Typer app (which handles its own command-line errors and exits), mapping
    the project's errors to one-line messages and exit codes."""
    try:
        app()
    except (UsageError, LDFAError, FileNotFoundError) as error:
        if os.environ.get("LDFA_DEBUG"):
            raise
        print(f"ldfa: error: {error}", file=sys.stderr)
        return USAGE
    except TrainingError as error:
        if os.environ.get("LDFA_DEBUG"):
            raise
        print(f"ldfa: stopped: {error}", file=sys.stderr)
        return FAILURE
    except Exception as error:
        if os.environ.get("LDFA_DEBUG"):
            raise
        print(
            f"ldfa: {type(error).__name__}: {error} (set LDFA_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return FAILURE
    return 0
