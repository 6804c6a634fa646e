"""``ldfa rf``: receptive fields of a trained run's layer, drawn and measured (Sec. 6)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.console import stderr_console
from ldfa_cli.errors import ConfigError

KEYS = ("rotational_symmetry", "orientation_selectivity", "centre_surround_index")


def default_layer(model) -> str:
    """The retina's output (the bottleneck conv) if there is one, else the first conv."""
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if "retina2" in names:
        return "retina2"
    if not names:
        raise ConfigError("the model has no Conv2d layer to draw receptive fields of")
    return names[0]


def rf(
    runs: list[Path] = typer.Argument(..., help="Run folders (several: side by side)."),
    layer: str = typer.Option(None, "--layer", help="Layer name (default: the retina output)."),
    method: str = typer.Option("gradient", "--method", help="gradient or maximize."),
    out: Path = typer.Option(None, "--out", help="One run: a folder; several: the PNG file."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="last or best."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print the measures as JSON."),
) -> None:
    """Receptive fields of every channel of a layer: a PNG grid (diverging colours centred at
    zero) and per-channel rotational symmetry, orientation selectivity, centre-surround."""
    from ldfa_cli.analysis.rf import plot_fields, receptive_fields, summary
    from ldfa_cli.data import dataset_shape
    from ldfa_cli.engine.build import load_trained, pick_device
    from ldfa_cli.engine.checkpoint import atomic_write_text

    if method not in ("gradient", "maximize"):
        raise ConfigError(f"--method must be gradient or maximize, got '{method}'")
    results, rows = [], []
    on = pick_device(device)
    for run in runs:
        _, _, recipe, model = load_trained(run, checkpoint, on)
        shape = dataset_shape(recipe.data)
        channels, size = shape.channels, shape.size
        shape = (channels, size, size)
        name = layer or default_layer(model)
        if name not in dict(model.named_modules()):
            raise ConfigError(f"--layer '{name}' is not a layer of {run}'s model")
        fields = receptive_fields(model, name, shape, method=method)
        fb = recipe.feedback
        rank = f" r={fb.rank}" if fb.rule != "bp" and fb.rank is not None else ""
        stats = summary(fields)
        results.append({"run": str(run), "layer": name, "rule": fb.rule, "rank": fb.rank,
                        "method": method, **stats})  # fmt: skip
        means = stats["mean"]
        rows.append((f"{run.name}\n{fb.rule}{rank}\nsym {means[KEYS[0]]:.2f} "
                     f"csi {means[KEYS[2]]:.2f}", fields))  # fmt: skip
    console = stderr_console()
    if len(runs) == 1:
        folder = out or runs[0] / "rf"
        folder.mkdir(parents=True, exist_ok=True)
        png, data = folder / "fields.png", folder / "rf.json"
        plot_fields(rows, png)
        atomic_write_text(data, json.dumps(results[0], indent=2) + "\n")
        console.print(f"wrote {png} and {data}")
    else:
        png = out or Path("rf_comparison.png")
        plot_fields(rows, png)
        console.print(f"wrote {png}")
    table = Table(title=f"receptive fields ({method}), mean over channels")
    for col in ("run", "rule", "r", "layer", "symmetry", "orientation", "centre-surround"):
        table.add_column(
            col,
            justify="right" if col in ("symmetry", "orientation", "centre-surround") else "left",
        )
    for r in results:
        table.add_row(Path(r["run"]).name, r["rule"], str(r["rank"] or "-"), r["layer"],
                      *(f"{r['mean'][k]:.3f}" for k in KEYS))  # fmt: skip
    console.print(table)
    if json_out:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
