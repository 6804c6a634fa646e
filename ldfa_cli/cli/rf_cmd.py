"""``ldfa rf``: receptive fields of a trained run's layer, drawn and measured (Sec. 6)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.console import results_console, stderr_console
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


def recorded_fields(run: Path, layer: str | None, method: str, checkpoint: str) -> dict | None:
    """The fields ``ldfa rf`` recorded in ``RUN/rf/rf.json`` for this layer, method and
    checkpoint, for a run folder without checkpoints (an archived record); None where there
    are none."""
    record = run / "rf" / "rf.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    same = data.get("method") == method and data.get("checkpoint") == checkpoint
    if "fields" not in data or not same or layer not in (None, data["layer"]):
        return None
    return data


def computed_fields(run: Path, layer: str | None, method: str, checkpoint: str, on) -> dict:
    """Fields of ``layer`` (default: the retina output) from the run's checkpoint (or a
    checkpoint file), their measures, the run's resolved config, and what the figure and
    the JSON say of them; the fields cropped to their support and rounded to 5 significant
    digits, so that the record draws them again."""
    import numpy as np
    from torch import nn

    from ldfa_cli.analysis.rf import crop_to_support, receptive_fields, summary
    from ldfa_cli.data import dataset_shape
    from ldfa_cli.engine.build import load_trained

    _, _, recipe, model = load_trained(run, checkpoint, on)
    shape = dataset_shape(recipe.data)
    name = layer or default_layer(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if name not in convs:
        what = "a layer" if name not in dict(model.named_modules()) else "a Conv2d layer"
        raise ConfigError(f"--layer '{name}' is not {what} of {run}'s model; fields are "
                          f"drawn of its Conv2d layers: {', '.join(convs) or 'none'}")  # fmt: skip
    fields = receptive_fields(model, name, (shape.channels, shape.size, shape.size),
                              method=method)  # fmt: skip
    cropped = [np.round(crop_to_support(f), 5 - int(np.log10(max(np.abs(f).max(), 1e-30))))
               for f in fields]  # fmt: skip
    fb = recipe.feedback
    return {"run": str(run), "layer": name, "rule": fb.rule, "rank": fb.rank, "method": method,
            "checkpoint": checkpoint, **summary(fields),
            "fields": [f.tolist() for f in cropped],
            "config": recipe.model_dump(mode="json")}  # fmt: skip


def _record_text(result: dict) -> str:
    """What rf.json keeps of a run's fields: all but the resolved config (its record's)."""
    return json.dumps({k: v for k, v in result.items() if k != "config"}) + "\n"


def fields_of(run: Path, layer: str | None, method: str, checkpoint: str, on) -> dict:
    """A run folder's fields, computed from its checkpoint (and recorded in its
    rf/rf.json) or read from that record; a checkpoint file's, computed."""
    from ldfa_cli.engine.checkpoint import atomic_write_text

    if run.is_file() or (run / "checkpoints" / f"{checkpoint}.pt").is_file():
        result = computed_fields(run, layer, method, checkpoint, on)
        if run.is_dir():
            atomic_write_text(run / "rf" / "rf.json", _record_text(result))
        return result
    result = recorded_fields(run, layer, method, checkpoint)
    if result is None:
        raise CheckpointError(f"{run} has no checkpoints/{checkpoint}.pt and no fields of "
                              f"this layer by --method {method} from its {checkpoint} "
                              "checkpoint in rf/rf.json: run ldfa rf on the run folder that "
                              "has its checkpoints")  # fmt: skip
    return result


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
    """Receptive fields of a conv layer's channels, drawn and measured.

    Runs side by side (diverging colours centred at zero), and per-channel rotational
    symmetry, orientation selectivity and centre-surround index; several runs add each
    measure's mean ± sd per condition. Each run's fields and measures are recorded in
    RUN/rf/rf.json, from which a run folder without checkpoints (an archived record) is
    drawn again."""
    import numpy as np

    from ldfa_cli.analysis.figures import figure_path, save_figure
    from ldfa_cli.analysis.rf import FieldPanel, draw_fields
    from ldfa_cli.analysis.runs import RunRecord, group_by_setting, read_run
    from ldfa_cli.engine.build import pick_device
    from ldfa_cli.engine.checkpoint import atomic_write_text

    if method not in ("gradient", "maximize"):
        raise ConfigError(f"--method must be gradient or maximize, got '{method}'")
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint must be last or best, got '{checkpoint}'")
    single = len(runs) == 1
    figure = (out or runs[0] / "rf") / "fields" if single else out or Path("rf_comparison")
    figure_path(figure, fmt)  # a bad --out or --format fails before any computing
    console = stderr_console()
    on = pick_device(device)
    results = [fields_of(run, layer, method, checkpoint, on) for run in runs]
    records = [RunRecord(run, result["config"], "") if run.is_file() else read_run(run)
               for run, result in zip(runs, results, strict=True)]  # fmt: skip
    conditions = {id(r): g.name for g in group_by_setting(records, say=console.print)
                  for r in g.runs}  # fmt: skip
    panels = []
    for record, result in zip(records, results, strict=True):
        condition = conditions.get(id(record), record.rule_and_rank)  # a repeated seed
        fields = [np.asarray(f) for f in result["fields"]]
        title = f"{condition}\n{_title(record)}"
        panels.append(FieldPanel(title, fields, result["mean"], condition))
    fig = draw_fields(panels, " / ".join(sorted({r["layer"] for r in results})), method)
    written = save_figure(fig, figure, fmt)
    if single and out is not None:
        atomic_write_text(written.parent / "rf.json", _record_text(results[0]))
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
    results_console(json_out).print(table)
    if json_out:
        brief = [{k: v for k, v in r.items() if k not in ("fields", "config")} for r in results]
        print(json.dumps(brief if len(brief) > 1 else brief[0], indent=2))
