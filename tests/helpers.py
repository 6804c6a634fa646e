"""Run the ldfa command in-process (fast) with its real error mapping and exit codes."""

from __future__ import annotations

import sys

from ldfa_cli.cli.app import app
from ldfa_cli.cli.errors import run_guarded


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ldfa ARGS``."""
    argv = sys.argv
    sys.argv = ["ldfa", *map(str, args)]
    try:
        try:
            code = run_guarded(app)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err
