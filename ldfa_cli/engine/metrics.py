"""metrics.jsonl (one JSON object per event) and, optionally, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ldfa_cli.errors import ConfigError

from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends events to ``metrics.jsonl``; mirrors scalars to TensorBoard when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "output.tensorboard is true but the tensorboard package is missing: "
                    "pip install tensorboard (or set output.tensorboard=false)"
                ) from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop events logged after ``step`` (a resumed run logs them again)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]  # fmt: skip
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

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


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
