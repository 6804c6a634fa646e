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
from ldfa_cli.errors import ConfigError
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


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create ``path``; a non-empty folder is refused unless ``overwrite`` (which empties it)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{path} is not empty: continue it with --resume {path}, replace it with "
                "--overwrite, or choose another --out"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        first = json.loads(env_path.read_text())
        first.setdefault("resumes", []).append(env)
        env = first
    atomic_write_text(env_path, json.dumps(env, indent=2) + "\n")


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
