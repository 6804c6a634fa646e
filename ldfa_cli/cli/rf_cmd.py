"""``ldfa rf``: receptive fields of a trained run's layer, drawn and measured (Sec. 6)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.console import stderr_console
from ldfa_cli.errors import CheckpointError, ConfigError

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


def _title(record) -> str:
    """A run's rule and rank, its bottleneck where the model has one, and its seed."""
    bottleneck = record.config.get("model", {}).get("bottleneck")
    parts = [record.rule_and_rank] + ([f"bottleneck {bottleneck}"] if bottleneck else [])
    return ", ".join(parts + [f"seed {record.seed}"])


def recorded_fields(run: Path, layer: str | None, method: str) -> dict | None:
    """The fields ``ldfa rf`` recorded in ``RUN/rf/rf.json`` for this layer and method, for
    a run folder without checkpoints (an archived record); None where there are none."""
    record = run / "rf" / "rf.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    if "fields" not in data or data["method"] != method or layer not in (None, data["layer"]):
        return None
    return data


def computed_fields(run: Path, layer: str | None, method: str, checkpoint: str, on) -> dict:
    """Fields of ``layer`` (default: the retina output) from the run's checkpoint, their
    measures, and what the figure and the JSON say of them; the fields cropped to their
    support and rounded to 5 significant digits, so that the record draws them again."""
    import numpy as np

    from ldfa_cli.analysis.rf import crop_to_support, receptive_fields, summary
    from ldfa_cli.data import dataset_shape
    from ldfa_cli.engine.build import load_trained

    _, _, recipe, model = load_trained(run, checkpoint, on)
    shape = dataset_shape(recipe.data)
    name = layer or default_layer(model)
    if name not in dict(model.named_modules()):
        raise ConfigError(f"--layer '{name}' is not a layer of {run}'s model")
    fields = receptive_fields(model, name, (shape.channels, shape.size, shape.size),
                              method=method)  # fmt: skip
    cropped = [np.round(crop_to_support(f), 5 - int(np.log10(max(np.abs(f).max(), 1e-30))))
               for f in fields]  # fmt: skip
    fb = recipe.feedback
    return {"run": str(run), "layer": name, "rule": fb.rule, "rank": fb.rank, "method": method,
            **summary(fields), "fields": [f.tolist() for f in cropped]}  # fmt: skip


def rf(
    runs: list[Path] = typer.Argument(..., help="Run folders (several: side by side)."),
    layer: str = typer.Option(None, "--layer", help="Layer name (default: the retina output)."),
    method: str = typer.Option("gradient", "--method", help="gradient or maximize."),
    out: Path = typer.Option(
        None, "--out", help="One run: a folder; several: the figure (.png, .pdf, .svg)."
    ),
    fmt: str = typer.Option(None, "--format", help="png, pdf or svg (default: --out's suffix)."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="last or best."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print the measures as JSON."),
) -> None:
    """Receptive fields of every channel of a layer, runs side by side (diverging colours
    centred at zero), and per-channel rotational symmetry, orientation selectivity and
    centre-surround index; several runs add each measure's mean ± sd per condition. Each
    run's fields and measures are recorded in RUN/rf/rf.json, from which a run folder
    without checkpoints (an archived record) is drawn again."""
    import numpy as np

    from ldfa_cli.analysis.figures import figure_path, save_figure
    from ldfa_cli.analysis.rf import FieldPanel, draw_fields
    from ldfa_cli.analysis.runs import group_by_setting, read_run
    from ldfa_cli.engine.build import pick_device
    from ldfa_cli.engine.checkpoint import atomic_write_text

    if method not in ("gradient", "maximize"):
        raise ConfigError(f"--method must be gradient or maximize, got '{method}'")
    single = len(runs) == 1
    figure = (out or runs[0] / "rf") / "fields.png" if single else out or Path("rf_comparison.png")
    figure_path(figure, fmt)  # a bad --out or --format fails before any computing
    records = [read_run(run) for run in runs]
    conditions = {id(r): g.name for g in group_by_setting(records) for r in g.runs}
    results, panels = [], []
    on = pick_device(device)
    for run, record in zip(runs, records, strict=True):
        if (run / "checkpoints" / f"{checkpoint}.pt").is_file():
            result = computed_fields(run, layer, method, checkpoint, on)
            atomic_write_text(run / "rf" / "rf.json", json.dumps(result) + "\n")
        elif (result := recorded_fields(run, layer, method)) is None:
            raise CheckpointError(f"{run} has no checkpoints/{checkpoint}.pt and no fields of "
                                  f"this layer by --method {method} in rf/rf.json: run ldfa rf "
                                  "on the run folder that has its checkpoints")  # fmt: skip
        results.append(result)
        condition = conditions.get(id(record), record.rule_and_rank)  # a repeated seed
        fields = [np.asarray(f) for f in result["fields"]]
        panels.append(FieldPanel(_title(record), fields, result["mean"], condition))
    console = stderr_console()
    fig = draw_fields(panels, " / ".join(sorted({r["layer"] for r in results})), method)
    written = save_figure(fig, figure, fmt)
    if single and out is not None:
        atomic_write_text(written.parent / "rf.json", json.dumps(results[0]) + "\n")
    console.print(f"wrote {written}; each run's fields and measures in RUN/rf/rf.json")
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
        brief = [{k: v for k, v in r.items() if k != "fields"} for r in results]
        print(json.dumps(brief if len(brief) > 1 else brief[0], indent=2))
