"""Ctrl-C that stops a run where its state is whole.

A KeyboardInterrupt raised wherever the signal lands can split a step (weights updated,
step not counted) or an epoch's end (evaluation logged, epoch not counted), and the
checkpoint written then resumes into duplicated or skipped work. So the first Ctrl-C only
asks the loop to stop; the loop stops at its next step boundary, writes ``last.pt`` and
raises ``StopRequested``. A second Ctrl-C stops at once and writes nothing (the last
checkpoint on disk stays whole; a resume goes back to it).
"""

from __future__ import annotations

import signal


class StopRequested(KeyboardInterrupt):
    """Raised by the loop at a step boundary after a Ctrl-C; the checkpoint is written."""


class GracefulStop:
    """Context manager: inside it the first SIGINT sets ``requested``, the second raises."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> GracefulStop:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught, Ctrl-C stays as is
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
