"""Run folders: ``runs/<recipe>/<timestamp>/`` or ``--out``, with config.yaml and env.json."""

from __future__ import annotations

import json
import platform
import shutil
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

from ldfa_cli.config import to_yaml
from ldfa_cli.errors import CheckpointError, ConfigError
from ldfa_cli.lock import environment_report

from .checkpoint import atomic_write_text


def new_run_dir(base: str, recipe_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / recipe_name / stamp
    suffix = 1
    while path.exists():
        path = Path(base) / recipe_name / f"{stamp}-{suffix}"
        suffix += 1
    return path


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``; nothing on disk changes."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder; choose another --out")
    if blocked := file_on_the_way(path):
        raise ConfigError(f"--out {path}: {blocked} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(
            f"{path} is not empty: continue it with --resume {path}, replace it with "
            "--overwrite, or choose another --out"
        )


def file_on_the_way(path: Path) -> Path | None:
    """The first existing parent of ``path`` that is not a folder (nothing can be made
    under it), or None."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


class RunFolder:
    """A new run's folder, made only once everything the run needs has been checked (so a
    run that cannot start leaves nothing behind). With ``overwrite`` the run it replaces is
    moved aside, beside it as ``.NAME.replaced-TIME``, and deleted only once the new run
    has written a checkpoint; should the new run end before that, it is put back."""

    def __init__(self, path: Path, overwrite: bool = False):
        self.path, self.overwrite = Path(path), overwrite
        self.replaced: Path | None = None
        self.made = False

    def make(self) -> None:
        check_run_dir(self.path, self.overwrite)  # (the folder may have changed meanwhile)
        if self.overwrite and self.path.is_dir() and any(self.path.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.replaced = self.path.with_name(f".{self.path.name}.replaced-{stamp}")
            self.path.rename(self.replaced)
        self.path.mkdir(parents=True, exist_ok=True)
        self.made = True

    def keep(self) -> None:
        """The new run has a checkpoint: the run it replaced can go."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def undo(self, started: bool = True) -> str | None:
        """The new run ended before its first checkpoint: remove what it made and put back
        the run it replaced; a fresh folder stays once training ``started`` (its logs tell
        what happened). Says what it did."""
        if not self.made or (started and self.replaced is None):
            return None
        shutil.rmtree(self.path, ignore_errors=True)
        self.made = False
        if self.replaced is None:
            return None
        self.replaced.rename(self.path)
        self.replaced = None
        return f"{self.path} holds the run it was to replace again (nothing was overwritten)"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_run_files(
    path: Path, recipe, device: str, world_size: int, resumed: bool, recipe_name: str = ""
) -> None:
    """config.yaml (the resolved recipe) and env.json; a resume adds its own entry to
    env.json's ``resumes`` and rewrites config.yaml with any overrides it was given."""
    atomic_write_text(path / "config.yaml", to_yaml(recipe))
    stack = environment_report()  # exact versions, and whether they match the lock
    env = {
        "recipe": recipe_name,
        "argv": sys.argv,
        "python": stack["python"],
        "versions": {"ldfa-cli": _version("ldfa-cli"), **stack["versions"]},
        "lock": stack["lock"],
        "device": device,
        "world_size": world_size,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env_path = path / "env.json"
    if resumed and env_path.is_file():
        first = read_env(path)
        first.setdefault("resumes", []).append(env)
        env = first
    atomic_write_text(env_path, json.dumps(env, indent=2) + "\n")


def read_env(path: Path) -> dict:
    """A run folder's env.json, which a resume extends; one that cannot be read is a
    one-line error before any training (not after an epoch, at the first checkpoint)."""
    env_path = Path(path) / "env.json"
    try:
        env = json.loads(env_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        env = None
    if not isinstance(env, dict):
        raise CheckpointError(f"{env_path} is not a JSON object: repair it, or move it away "
                              "(the resume writes a new one), then resume")  # fmt: skip
    return env


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
