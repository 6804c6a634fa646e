"""Errors become one line on stderr and an exit code; a traceback only with LDFA_DEBUG=1."""

from __future__ import annotations

import errno
import os
import sys

from ldfa_cli.errors import LDFAError, TrainingError

USAGE = 2  # usage and configuration errors (Typer uses 2 for a bad command line too)
FAILURE = 1  # a run that started and failed


class UsageError(Exception):
    """A user-facing problem with the command line, a recipe or a file: one line, exit 2."""


# an OSError with one of these is a path the user gave that cannot be read or written
PATH_ERRORS = {errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EACCES,
               errno.EPERM, errno.EROFS}  # fmt: skip


def describe_path_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return (f"{where}{error.strerror or error} (check the path: does its folder exist, is "
            "nothing on the way a file, may you write there?)")  # fmt: skip


def one_line(error: Exception) -> tuple[str, int]:
    """The line an error prints and the exit code it gives."""
    if isinstance(error, (UsageError, LDFAError)):
        return f"ldfa: error: {error}", USAGE
    if isinstance(error, OSError) and error.errno in PATH_ERRORS:
        return f"ldfa: error: {describe_path_error(error)}", USAGE
    if isinstance(error, TrainingError):
        return f"ldfa: stopped: {error}", FAILURE
    return f"ldfa: {type(error).__name__}: {error} (set LDFA_DEBUG=1 for the traceback)", FAILURE


def run_guarded(app) -> int:
    """Run the Typer app, mapping the command line's errors (an unknown option, a value out
    of range) and the project's to one-line messages and exit codes."""
    import typer

    try:
        code = app(prog_name="ldfa", standalone_mode=False)  # typer.Exit(code): its code
    except typer.Abort:  # a Ctrl-C before a command took charge of it
        return 130
    except typer.TyperException as error:  # the command line's own errors
        if os.environ.get("LDFA_DEBUG"):
            raise
        message = error.format_message()
        if message:  # (no arguments at all: the help is the answer, already printed)
            ctx = getattr(error, "ctx", None)
            where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
            print(f"ldfa: error: {message.rstrip('.')}{where}", file=sys.stderr)
        return getattr(error, "exit_code", USAGE)
    except Exception as error:
        if os.environ.get("LDFA_DEBUG"):
            raise
        line, code = one_line(error)
        print(line, file=sys.stderr)
        return code
    return code if isinstance(code, int) else 0
