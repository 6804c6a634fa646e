"""metrics.jsonl (one JSON object per event) and, optionally, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ldfa_cli.console import stderr_console
from ldfa_cli.errors import CheckpointError, ConfigError

from .checkpoint import atomic_write_text


def tensorboard_writer():
    """TensorBoard's ``SummaryWriter`` class; a one-line error where the package is missing
    (checked before a run makes its folder)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "output.tensorboard is true but the tensorboard package is missing: "
            "pip install tensorboard (or set output.tensorboard=false)"
        ) from None
    return SummaryWriter


class MetricsLog:
    """Appends events to ``metrics.jsonl``; mirrors scalars to TensorBoard when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            self.writer = tensorboard_writer()(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop events logged after ``step`` (a resumed run logs them again), and a last
        line cut short by a kill."""
        if not self.path.is_file():
            return
        kept = [event for event in read_metrics(self.path, warn=False)
                if event.get("step", 0) <= step]  # fmt: skip
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))

    def log(self, event: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        if self.writer is not None:
            prefix = f"{event['event']}/{event.get('split', '')}".rstrip("/")
            for key, value in _scalars(event):
                self.writer.add_scalar(f"{prefix}/{key}", value, event["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(event: dict, prefix: str = ""):
    """(name, number) of every numeric entry, nested ones as ``layer/measure``."""
    for key, value in event.items():
        if key in ("step", "epoch") and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def read_metrics(path: Path, warn: bool = True) -> list[dict]:
    """The events of a ``metrics.jsonl``. A last line cut short (a process killed while
    writing it) is skipped, with a warning; a bad line before it is a one-line error."""
    lines = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)  # (bytes that are not UTF-8: a ValueError too)
            if not isinstance(event, dict):
                raise ValueError("not an event")
            events.append(event)
        except ValueError:
            if number < len(lines):
                raise CheckpointError(f"{path}: line {number} is not JSON; the file is damaged "
                                      "(remove the line to use the rest)") from None  # fmt: skip
            if warn:
                stderr_console().print(f"[yellow]warning[/yellow]: {path}: its last line is "
                                       "cut short (a run killed while writing it); "
                                       "skipped")  # fmt: skip
    return events
