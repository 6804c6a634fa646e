"""Checkpoints: written atomically (temp file + rename), read with weights_only=True."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ldfa_cli.errors import CheckpointError

FORMAT = "ldfa-checkpoint-1"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's state; a missing, corrupt or foreign file gets a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        other = "best.pt" if path.name == "last.pt" else "last.pt"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({reason}): the file is "
            f"damaged; use the run's {other}, or train again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ldfa checkpoint (no '{FORMAT}' marker)")
    return state


def find_checkpoint(path: Path, name: str = "last.pt") -> Path:
    """A checkpoint file, or ``checkpoints/<name>`` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / name
        if not candidate.is_file():
            raise CheckpointError(f"{path} is not a run folder with checkpoints/{name}")
        return candidate
    return path


def rng_state(device: torch.device) -> dict:
    """The RNG state a checkpoint keeps (the CPU's, and the GPU's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
