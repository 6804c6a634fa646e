"""Run folders named on a command line: run folders themselves, sweep folders (whose run
folders are taken, in order), and whatever else a glob brings along (a sweep's ``.log``
files, a plot written beside the runs), which is left out with a note."""

from __future__ import annotations

from pathlib import Path

from ldfa_cli.errors import ConfigError


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()


def collect_runs(targets, say=None) -> list[Path]:
    """The run folders among ``targets`` (a sweep folder stands for the run folders in it),
    each once, in the order given; ``say(line)`` is told what was left out and why."""
    runs, left_out = [], []
    for target in map(Path, targets):
        if is_run(target):
            runs.append(target)
        elif target.is_dir() and (inside := sorted(p for p in target.iterdir() if is_run(p))):
            runs.extend(inside)
        else:
            left_out.append(target)
    if left_out and say is not None:
        names = ", ".join(str(p) for p in left_out[:4]) + (" ..." if len(left_out) > 4 else "")
        say(f"left out {len(left_out)} path(s) that are not run folders: {names}")
    if not runs:
        raise ConfigError(
            f"no run folder among {', '.join(map(str, targets))} (a run folder holds "
            "config.yaml and metrics.jsonl; a sweep folder holds run folders)"
        )
    return list(dict.fromkeys(runs))
