"""The tested stack: ``requirements/lock.txt`` (exact versions of every dependency, used as
a pip constraints file) and how the running environment compares with it.

``pyproject.toml`` keeps compatible ranges for people who install ldfa as a library; the
lock is what CI and the README install, rewritten only by ``scripts/update-lock`` after the
suite passed against the newly resolved versions. Every run records
:func:`environment_report` in its ``env.json``, so a number can be traced to its stack.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

# scripts/update-lock points LDFA_LOCK_FILE at the lock it is about to write while the suite
# runs, so that the lock's own tests check the candidate (a new dependency included)
LOCK_FILE = Path(
    os.environ.get("LDFA_LOCK_FILE")
    or Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
)
# What env.json always names, locked or not.
RECORDED = ("torch", "torchvision", "timm", "fvcore", "numpy", "pydantic")


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` == ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK_FILE) -> tuple[dict[str, str], dict[str, str]]:
    """(``{normalised name: version}``, header fields such as ``python``) of a lock file.
    Lines are ``name==version``; ``# key: value`` comment lines are header fields."""
    pins: dict[str, str] = {}
    header: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and re.fullmatch(r"\s*[a-z_]+", key):
                header[key.strip()] = value.strip()
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip() or ";" in version:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[normalise(name.strip())] = version.strip()
    return pins, header


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """``{normalised name: version}`` of every distribution in this environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalise(name), dist.version)
    return found


def compare_with_lock(installed: dict[str, str], pins: dict[str, str]) -> dict:
    """Every locked distribution that is installed at another version. Locked ones that are
    absent are not differences: the lock also pins wheels only some platforms need (torch's
    CUDA libraries)."""
    return {
        name: {"installed": installed[name], "locked": locked}
        for name, locked in sorted(pins.items())
        if name in installed and installed[name] != locked
    }


def environment_report(lock_file: Path = LOCK_FILE) -> dict:
    """Exact versions of python and of ``RECORDED`` packages, and whether the environment
    matches the lock (``lock.matches``; ``lock.differs`` lists what does not)."""
    versions = {name: installed_version(name) or "not installed" for name in RECORDED}
    report = {"python": platform.python_version(), "versions": versions}
    if not lock_file.is_file():
        note = "no requirements/lock.txt beside the package (a wheel install)"
        report["lock"] = {"file": None, "matches": None, "note": note}
        return report
    try:
        pins, header = read_lock(lock_file)
    except (OSError, ValueError) as error:
        report["lock"] = {"file": str(lock_file), "matches": None, "note": str(error)}
        return report
    installed = installed_versions()
    differs = compare_with_lock(installed, pins)
    for name in RECORDED:  # a recorded package missing from the lock is a difference too
        if name not in pins:
            differs[name] = {"installed": versions[name], "locked": None}
    locked_python = header.get("python")
    python_matches = locked_python is None or (
        platform.python_version().startswith(locked_python + ".")
        or platform.python_version() == locked_python
    )
    if not python_matches:
        differs["python"] = {"installed": platform.python_version(), "locked": locked_python}
    report["lock"] = {
        "file": str(lock_file),
        "matches": not differs,
        "differs": differs,
        "locked": {name: pins.get(name) for name in RECORDED} | {"python": locked_python},
    }
    return report


def main() -> int:
    """``python -m ldfa_cli.lock``: print the report as JSON; exit 1 unless the environment
    matches the lock (CI runs it after installing from the lock)."""
    import json

    report = environment_report()
    print(json.dumps(report, indent=2))
    lock = report["lock"]
    if not lock.get("matches"):
        differs = ", ".join(
            f"{name} {d['installed']} (locked {d['locked']})"
            for name, d in lock.get("differs", {}).items()
        )
        print(f"ldfa: the environment does not match {lock['file']}: "
              f"{differs or lock.get('note', '')}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
