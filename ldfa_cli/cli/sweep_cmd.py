"""``ldfa sweep``: a grid of runs of one recipe (e.g. ranks x seeds) in one folder."""

from __future__ import annotations

import itertools
import shlex
import time
from pathlib import Path

import typer

from ldfa_cli.console import stderr_console
from ldfa_cli.engine.interrupt import exit_code
from ldfa_cli.errors import ConfigError


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ['a', 'b', '[1,2]']: commas inside brackets stay."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v for v in values if v != ""]


def grid(axes: list[str]) -> list[list[str]]:
    """Every combination of ``key=v1,v2`` axes, as lists of ``key=value`` overrides."""
    parsed = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"sweep axis '{axis}' is not key=v1,v2,... (e.g. feedback.rank=8,16)")
        parsed.append([f"{key}={v}" for v in split_values(values)])
    return [list(point) for point in itertools.product(*parsed)]


def point_name(point: list[str]) -> str:
    """``["feedback.rank=8", "optimizer.lr=0.1"]`` -> ``rank=8_lr=0.1``: the key's last
    part and the whole value (a dotted value such as 0.1 or 7.5 keeps its dots)."""
    name = "_".join(_short(item) for item in point) or "base"
    return "".join(c if c.isalnum() or c in "=_-." else "-" for c in name)


def _short(item: str) -> str:
    key, _, value = item.partition("=")
    return f"{key.split('.')[-1]}={value}"


DEVICES = ("auto", "cpu", "cuda", "mps")


def _point_plan(run_dir: Path, config) -> str:
    """What the sweep does with a point's folder: ``start`` (absent or empty), ``restart``
    (this point's own start that never reached a checkpoint: its config.yaml is this
    point's recipe), ``resume`` or ``skip`` (finished). Anything else there is not the
    sweep's to replace: a one-line error, and nothing is touched."""
    import torch

    from ldfa_cli.config import to_yaml

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file where the sweep puts a point's run folder; "
                          "move it away or give another --out")  # fmt: skip
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "start"
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        progress = torch.load(last, weights_only=True, map_location="cpu")["progress"]
        return "skip" if progress["epoch"] >= config.train.epochs else "resume"
    recorded = run_dir / "config.yaml"
    if recorded.is_file() and recorded.read_text(errors="replace") == to_yaml(config):
        return "restart"
    raise ConfigError(f"{run_dir} holds files that are not this point's run; move them away "
                      "or give another --out (the sweep replaces only its own unfinished "
                      "starts)")  # fmt: skip


def _check_sweep_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        raise ConfigError(f"--out {out} is a run folder; a sweep puts its points' runs in a "
                          "folder of their own: give another --out")  # fmt: skip


def sweep(
    recipe: str = typer.Argument(..., help="A recipe file or a shipped recipe's name."),
    axes: list[str] = typer.Argument(None, help="key=v1,v2,... axes; fixed key=value too."),
    out: Path = typer.Option(None, "--out", help="Folder (default runs/sweeps/<recipe>/<time>)."),
    print_only: bool = typer.Option(
        False,
        "--print",
        help="Print one 'ldfa train' command per point (for a cluster scheduler) and exit.",
    ),  # fmt: skip
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    jobs: int = typer.Option(
        1,
        "--jobs",
        min=1,
        help="Points run at once, each in its own process with "
        "cores/jobs threads (its log in FOLDER/<point>.log).",
    ),  # fmt: skip
) -> None:
    """Run a grid of one recipe (e.g. ranks x seeds) into one folder.

    Finished points are skipped, interrupted ones resumed; one point at a time or --jobs at
    once, or --print the commands. 'ldfa flops FOLDER' and 'ldfa plot FOLDER' read it."""
    from ldfa_cli.config import find_recipe, load_recipe

    path = find_recipe(recipe)
    points = grid(list(axes or []))
    out = out or Path("runs") / "sweeps" / path.stem / time.strftime("%Y%m%d-%H%M%S")
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError("two sweep points map to one folder name; give distinct values")
    if not points:  # an axis such as key=,,
        raise ConfigError("a sweep axis has no values: give key=v1,v2,...")
    if device.split(":")[0] not in DEVICES:
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or mps")
    configs = [load_recipe(str(path), point)[0] for point in points]  # every point first
    if print_only:
        for point, name in zip(points, names, strict=True):
            words = ["ldfa", "train", str(path), *point, "--out", str(out / name)]
            words += ["--device", device] if device != "auto" else []
            print(" ".join(shlex.quote(w) for w in words))
        return
    from ldfa_cli.engine.loop import train as run

    _check_sweep_folder(out)
    plans = [_point_plan(out / name, config) for name, config in zip(names, configs, strict=True)]
    console = stderr_console()
    if jobs > 1:
        _run_parallel(path, points, names, plans, out, device, jobs, console)
        console.print(f"sweep done: ldfa flops {out} --plot {out}/compute.png")
        return
    for i, (name, config, plan) in enumerate(zip(names, configs, plans, strict=True), start=1):
        run_dir = out / name
        if plan == "skip":
            console.print(f"[{i}/{len(points)}] {name}: finished, skipped")
            continue
        resume = plan == "resume"
        console.print(f"[{i}/{len(points)}] {name}: {'resuming' if resume else 'training'}"
                      f" into {run_dir}")  # fmt: skip
        try:
            run(
                config,
                run_dir,
                device,
                resume=resume,
                console=console,
                recipe_name=path.stem,
                overwrite=plan == "restart",
            )  # its own start that never reached a checkpoint starts over
        except KeyboardInterrupt as stop:
            console.print(f"sweep interrupted at {name}: the same command resumes it")
            raise typer.Exit(code=exit_code(stop)) from None
    console.print(f"sweep done: ldfa flops {out} --plot {out}/compute.png")


def _run_parallel(path: Path, points, names, plans, out: Path, device: str, jobs: int,
                  console) -> None:  # fmt: skip
    """Each unfinished point as ``ldfa train`` in its own process, ``jobs`` at a time, every
    process with cores/jobs intra-op threads. A Ctrl-C reaches every child (its process
    group's), a SIGTERM is passed on to them; each stops at its next step boundary with a
    checkpoint, so the same command resumes the lot."""
    import os
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    # the cores this process may run on (taskset, a cluster's cgroup), not the machine's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for point, name, plan in zip(points, names, plans, strict=True):
        run_dir = out / name
        if plan == "skip":
            console.print(f"{name}: finished, skipped")
            continue
        if plan == "resume":
            command = ["--resume", str(run_dir), *point]
        else:
            command = [str(path), *point, "--out", str(run_dir)]
            command += ["--overwrite"] if plan == "restart" else []
        todo.append((name, [sys.executable, "-m", "ldfa_cli", "train", *command,
                            "--device", device]))  # fmt: skip

    children: list[subprocess.Popen] = []
    stopped: list[int] = []  # the signal that stops the sweep

    def launch(job) -> tuple[str, int]:
        name, command = job
        if stopped:  # a point not started before the signal stays to resume
            return name, 128 + stopped[0]
        console.print(f"{name}: {'resuming' if '--resume' in command else 'training'} "
                      f"({threads} threads, log {out / name}.log)")  # fmt: skip
        with open(out / f"{name}.log", "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            children.append(child)
            return name, child.wait()

    def forward(signum, frame) -> None:
        """A SIGTERM (a scheduler's, sent to this process alone) reaches every child, which
        stops at its next step boundary with a checkpoint."""
        stopped.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(launch, todo))
    except KeyboardInterrupt:
        console.print("sweep interrupted: the same command resumes every unfinished point")
        raise typer.Exit(code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        console.print("sweep stopped by SIGTERM: the same command resumes every unfinished "
                      "point")  # fmt: skip
        raise typer.Exit(code=128 + stopped[0])
    failed = [f"{name} (exit {code}, see {out / name}.log)" for name, code in results if code]
    if failed:
        from ldfa_cli.errors import TrainingError

        raise TrainingError(f"{len(failed)} sweep point(s) failed: {', '.join(failed)}")
