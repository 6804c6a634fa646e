"""The loop's bookkeeping between two train events: the steps' loss and hits (summed over
ranks when the window closes), the images, the time spent waiting for data; and the
progress bar on stderr."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ldfa_cli.errors import TrainingError

from . import distributed


@dataclass
class WindowSummary:
    loss: float  # mean task loss over the window's images, all ranks
    acc: float
    images_per_s: float
    data_stall: float  # the share of the window's time spent waiting for batches
    stop_requested: bool  # Ctrl-C pressed on some rank


class LogWindow:
    """The steps since the last train event."""

    def __init__(self, device: torch.device, world: distributed.World):
        self.world = world
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, hits, n, stop
        self._reset()

    def _reset(self) -> None:
        self.sums.zero_()
        self.start, self.images, self.waited = time.perf_counter(), 0, 0.0

    def timed(self, batches):
        """The batches, adding the seconds spent waiting for each to the window's data
        stall (loader workers, or the on-device draw and augmentation)."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            yield item

    def add(self, loss: torch.Tensor, correct: torch.Tensor, predictions: int,
            images: int) -> None:  # fmt: skip
        """A step's mean loss over its ``predictions`` (examples, or tokens), its correct
        ones, and its ``images`` (examples: images or sequences) on this rank."""
        self.sums[0] += loss.double() * predictions
        self.sums[1] += correct
        self.sums[2] += predictions
        self.images += images * self.world.size

    def close(self, stop_requested: bool) -> WindowSummary:
        """The window's summary (its sums agreed over ranks), and a new window."""
        self.sums[3] = float(stop_requested)
        totals = distributed.sum_across(self.world, self.sums.clone())
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        n = totals[2].clamp_min(1)
        summary = WindowSummary(float(totals[0] / n), float(totals[1] / n),
                                self.images / elapsed, self.waited / elapsed,
                                bool(totals[3] > 0))  # fmt: skip
        self._reset()
        return summary


def check_finite(loss: float, step: int, epoch: int, last_checkpoint) -> None:
    """A loss that is no longer finite stops the run, saying what is on disk."""
    if math.isfinite(loss):
        return
    kept = (f"{last_checkpoint} holds the last good state"
            if last_checkpoint is not None and last_checkpoint.is_file()
            else "no checkpoint had been written yet")  # fmt: skip
    raise TrainingError(
        f"the training loss became {loss} at step {step} (epoch {epoch + 1}); stopped "
        f"without saving ({kept}): lower optim.lr or feedback.optimizer.lr"
    )


class EpochBar:
    """A rich progress bar over an epoch's steps, with the last window's numbers."""

    def __init__(self, console: Console, enabled: bool, steps: int, epochs: int):
        self.epochs = epochs
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
        )  # fmt: skip
        self.task = self.bar.add_task("", total=steps, stats="")

    def __enter__(self) -> EpochBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start_epoch(self, epoch: int, done: int) -> None:
        self.bar.update(self.task, description=f"epoch {epoch + 1}/{self.epochs}", completed=done)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def show(self, s: WindowSummary) -> None:
        self.bar.update(self.task, stats=f"loss {s.loss:.4f} acc {s.acc:.3f} "
                        f"{s.images_per_s:,.0f} img/s, data stall {s.data_stall:.0%}")  # fmt: skip
