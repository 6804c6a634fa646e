"""``ldfa train``: train a recipe, write a run folder, resume one."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import typer

from ldfa_cli.console import results_console, stderr_console
from ldfa_cli.engine.interrupt import exit_code
from ldfa_cli.errors import ConfigError


def _resume_config(run_dir: Path, overrides: list[str]):
    from ldfa_cli.config import apply_overrides, read_yaml, validate

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a run folder?")
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise ConfigError(f"--resume {run_dir}: no checkpoints/last.pt to continue from")
    config = apply_overrides(read_yaml(config_file), overrides)
    return validate(config, source=str(config_file))


def train(
    recipe: str = typer.Argument(None, help="A recipe file or a shipped recipe's name."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides; ~key deletes."),
    out: Path = typer.Option(None, "--out", help="Run folder (default runs/<recipe>/<time>)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved recipe as YAML and exit."
    ),  # fmt: skip
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Build, show the layer table, run one step; write nothing."
    ),  # fmt: skip
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    stop_after: int = typer.Option(
        None,
        "--stop-after",
        min=1,
        help="Stop (with a checkpoint) after this many epochs; --resume later.",
    ),  # fmt: skip
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """Train a model from a YAML recipe (one process, or every rank under torchrun)."""
    from ldfa_cli.config import load_recipe, to_yaml
    from ldfa_cli.engine.loop import train as run
    from ldfa_cli.engine.run_dir import check_run_dir, new_run_dir

    for first, second, on in (
        ("--resume", "--overwrite", resume and overwrite),
        ("--print-config", "--dry-run", print_config and dry_run),
        ("--resume", "--print-config", resume and print_config),
        ("--resume", "--out", resume and out),  # a resume writes into its own folder
    ):
        if on:
            raise ConfigError(f"{first} and {second} do not go together: give one of them")
    overrides = list(overrides or [])
    console = stderr_console()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if resume is not None:
        if recipe is not None and "=" not in recipe:
            raise ConfigError(
                "--resume reads the recipe from RUN_DIR/config.yaml: give only key=value overrides"
            )
        overrides = ([recipe] if recipe else []) + overrides
        config = _resume_config(resume, overrides)
        run_dir = resume
        recipe_name = ""
    else:
        if recipe is None:
            raise ConfigError("give a RECIPE (a file or a name from 'ldfa recipes') or --resume")
        config, path = load_recipe(recipe, overrides)
        recipe_name = path.stem
        if print_config:
            print(to_yaml(config), end="")
            return
        if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("under torchrun give --out DIR, so that every rank uses one folder")
        run_dir = out or new_run_dir(config.output.dir, path.stem)
        if not dry_run and main_rank:
            check_run_dir(run_dir, overwrite)  # (the folder is made once the run can start)
    try:
        result = run(config, run_dir, device, resume=resume is not None, stop_after=stop_after,
                     dry_run=dry_run, console=console, recipe_name=recipe_name,
                     overwrite=overwrite, report=results_console(json_out))  # fmt: skip
    except KeyboardInterrupt as stop:
        raise typer.Exit(code=exit_code(stop)) from None
    if json_out and main_rank:
        print(json.dumps(asdict(result), indent=2))
