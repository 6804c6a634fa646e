"""Ctrl-C and SIGTERM (what SLURM, Kubernetes and torchrun send) stop a run where its state
is whole.

A KeyboardInterrupt raised wherever the signal lands can split a step (weights updated,
step not counted) or an epoch's end (evaluation logged, epoch not counted), and the
checkpoint written then resumes into duplicated or skipped work. So the first signal only
asks the loop to stop; the loop stops at its next step boundary, writes ``last.pt`` and
raises ``StopRequested``, and the command exits with 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM). A second signal stops at once and writes nothing (the last
checkpoint on disk stays whole; a resume goes back to it).
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """Raised by the loop at a step boundary after a signal; the checkpoint is written."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StoppedAtOnce(KeyboardInterrupt):
    """A second signal: raised wherever it lands, nothing written."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(error: KeyboardInterrupt) -> int:
    """The shell's code for a process stopped by the signal: 128 + its number."""
    return 128 + getattr(error, "signum", signal.SIGINT)


class GracefulStop:
    """Context manager: inside it the first SIGINT or SIGTERM sets ``requested`` (and
    ``signum``), the second raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise StoppedAtOnce(signum)
        self.requested, self.signum = True, signum

    def __enter__(self) -> GracefulStop:
        for signum in SIGNALS:  # (outside the main thread they cannot be caught: left as is)
            with contextlib.suppress(ValueError):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
