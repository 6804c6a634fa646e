"""``ldfa flops``: per-step FLOPs of a recipe (per layer, against backprop), or the
compute each run in a set of run folders needed to reach its target accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.analysis.figures import flop_unit
from ldfa_cli.analysis.runs import checked_split
from ldfa_cli.console import results_console, stderr_console
from ldfa_cli.errors import CheckpointError, ConfigError


def _gflops(value: float) -> str:
    """GFLOPs to 3 decimals; small non-zero costs (a reset amortised over many steps)
    with 3 significant digits instead of 0.000."""
    if 0 < abs(value) < 5e5:
        return f"{value / 1e9:.2e}"
    return f"{value / 1e9:,.3f}"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "-"


def _recipe_table(report, title: str) -> Table:
    from ldfa_cli.measure.flops import ALL_PHASES, PHASES

    table = Table(title=title, caption="GFLOPs per training step (2 per multiply-add); "
                  "ratios to backprop through the same layers")  # fmt: skip
    for col in ("layer", "rule", "r", "samples", "forward", "input grad", "broadcast",
                "weight grad", "feedback update", "total"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("layer", "rule") else "right")
    for row in report.layers:
        other = row["layer"] == "(other)"
        fwd, inp, bcast, wgt, upd = (row[p] for p in PHASES)
        total = fwd + inp + bcast + wgt + upd + row["backward"]
        bp_total = sum(row[f"bp_{p}"] for p in ALL_PHASES)
        if other:
            cells = [_gflops(fwd), f"{_gflops(row['backward'])} (backward, unsplit)", "", "",
                     "-"]  # fmt: skip
        else:
            cells = [_gflops(fwd), f"{_gflops(inp)} ({_ratio(inp, row['bp_input_grad'])})",
                     _gflops(bcast), _gflops(wgt), _gflops(upd)]  # fmt: skip
        table.add_row(row["layer"], row.get("rule", "-"), str(row.get("rank") or "-"),
                      str(row.get("samples") or "-"), *cells,
                      f"{_gflops(total)} ({_ratio(total, bp_total)})")  # fmt: skip
    table.add_section()
    bp_rows = report.reference.extra_rows()
    for name, value in report.rule.extra_rows().items():  # costs beside the products
        if value or bp_rows.get(name):
            cell = f"{_gflops(value)} ({_ratio(value, bp_rows.get(name))})"
            table.add_row(name, *[""] * 8, cell)
    rule, bp = report.rule.total, report.reference.total
    table.add_section()
    table.add_row("total", *[""] * 8, f"{_gflops(rule)} ({_ratio(rule, bp)})")
    return table


def recipe_flops(spec: str, overrides: list[str], batch_size: int | None, device: str,
                 json_out: bool) -> None:  # fmt: skip
    from ldfa_cli.analysis.flops import CONVENTIONS, OMITTED, recipe_report
    from ldfa_cli.config import load_recipe
    from ldfa_cli.data import steps_per_epoch
    from ldfa_cli.engine.build import pick_device

    recipe, path = load_recipe(spec, overrides)
    batch = batch_size or recipe.train.batch_size
    steps = steps_per_epoch(recipe.data, recipe.train.batch_size)  # for the reset interval
    report = recipe_report(recipe, batch, pick_device(device), steps)
    data = {"recipe": path.stem, "batch_size": batch, "steps_per_epoch": steps,
            **report.to_dict()}  # fmt: skip
    results_console(json_out).print(_recipe_table(report, f"{path.stem}: one training step, "
                                                  f"batch {batch}"))  # fmt: skip
    console = stderr_console()
    forward = data["forward_measured_flops"] / 2
    if report.fvcore_macs is not None:
        console.print(f"forward: {forward / 1e9:,.3f} G multiply-adds measured; fvcore "
                      f"{report.fvcore_macs / 1e9:,.3f} G {report.fvcore_note}")  # fmt: skip
    else:
        console.print(f"fvcore cross-check unavailable: {report.fvcore_note}")
    for warning in report.warnings:
        console.print(f"[yellow]warning[/yellow]: measured and analytic differ: {warning}")
    console.print(f"not counted: {OMITTED}; ops seen with no cost: "
                  f"{', '.join(report.rule.uncounted) or 'none'}")  # fmt: skip
    console.print(f"counted by convention: {CONVENTIONS}")
    if json_out:
        print(json.dumps(data, indent=2))


def _final_cell(row: dict, metric: str) -> str:
    """The final value ± sd over seeds: an accuracy in %, bits per token as they are."""
    from ldfa_cli.analysis.compute import HIGHER_IS_BETTER

    scale, digits = (100, 2) if HIGHER_IS_BETTER[metric] else (1, 4)
    sd = row.get("final_sd")
    text = f"{scale * row['final']:.{digits}f}"
    return text + (f" ± {scale * sd:.{digits}f}" if sd is not None else "")


def _reference_cell(reference: dict | None) -> str:
    if not reference:
        return "-"
    sd = f" ± {100 * reference['sd']:.2f}" if reference.get("sd") is not None else ""
    return f"{100 * reference['top1']:.2f}{sd}"


def runs_flops(paths: list[Path], target: float | None, json_out: bool, plot: Path | None,
               metric: str = "acc", fmt: str | None = None,
               split: str = "test") -> None:  # fmt: skip
    from ldfa_cli.analysis.compute import (
        HIGHER_IS_BETTER,
        add_common_target,
        draw_compute,
        group_runs,
        mixed_baseline_warning,
        summarise_run,
    )
    from ldfa_cli.analysis.figures import figure_path, save_figure
    from ldfa_cli.analysis.runs import collect_runs

    if plot is not None:
        figure_path(plot, fmt)  # a bad --plot or --format fails before any reading
    elif fmt is not None:
        raise ConfigError("--format sets --plot's format: give --plot FILE too")
    higher = HIGHER_IS_BETTER[metric]
    if higher and target is None:
        target = 0.9
    if higher and not 0 < target <= 1:
        raise ConfigError(f"--target is a fraction of the final {metric} in (0, 1], got {target}")

    console = stderr_console()
    runs = []
    for path in collect_runs(paths, say=console.print):
        try:
            runs.append(summarise_run(path, target, metric, split))
        except CheckpointError as error:  # no evaluation yet, an older run: noted, not fatal
            console.print(f"left out {error}")
    if not runs:
        raise ConfigError("none of these runs can be used (each one left out above, and why)")
    if len(datasets := sorted({run.dataset for run in runs})) > 1:
        raise ConfigError(f"these runs learned {len(datasets)} datasets ({', '.join(datasets)}):"
                          " compute to a target compares runs of one; give each its own "
                          "command")  # fmt: skip
    common = add_common_target(runs, target, metric)
    if not higher and common is None and target is None:
        raise ConfigError(f"--metric {metric}: give --target (the {metric} to reach) or a "
                          "backprop run, whose final value is the target then")  # fmt: skip
    rows, warnings = group_runs(runs)
    if common is not None and (mixed := mixed_baseline_warning(rows)):
        warnings.append(mixed)
    columns = ("flops_to_target", "flops_to_common", "flops_to_bp_final")
    scale, unit = flop_unit([r[k] for r in rows for k in columns if r[k]])
    named = metric if split == "test" else f"val {metric}"  # which split the targets read
    goal = (f"{target:.0%} of final {named}" if higher
            else f"{named} <= {target if target is not None else round(common, 4)}")  # fmt: skip
    table = Table(title=f"compute to {goal} ({len(runs)} runs, {len(rows)} settings)",
                  caption=f"a row: runs alike but for the seed; final {named}: mean of the "
                  "last 3 evaluations, ± sd over seeds; compute columns: mean ± standard "
                  "error")  # fmt: skip

    def cell(row, key, scale=1.0, digits=3):
        mean, se = row[key], row.get(f"{key}_se")
        if mean is None:
            return "not reached"
        text = f"{mean / scale:.{digits}f}"
        text += f" ± {se / scale:.{digits}f}" if se is not None else ""
        reached = row.get(f"{key}_reached")
        return text + (
            f" ({reached}/{row['seeds']})" if reached not in (None, row["seeds"]) else ""
        )

    # column -> its cell; the reference and BP columns only where a row has something there
    own = "own target" if higher else "target"
    cells = {
        "recipe": lambda row: row["recipe"], "rule": lambda row: row["rule"],
        "r": lambda row: str(row["rank"] or "-"), "setting": lambda row: row["setting"] or "-",
        "seeds": lambda row: str(row["seeds"]),
        f"final {named} ± sd": lambda row: _final_cell(row, metric),
        "reference": lambda row: _reference_cell(row["reference"]),
        f"{unit} to {own}": lambda row: cell(row, "flops_to_target", scale),
        f"s to {own}": lambda row: cell(row, "time_to_target", 1, 1),
        f"{unit} to BP target": lambda row: cell(row, "flops_to_common", scale),
        f"{unit} to BP final": lambda row: cell(row, "flops_to_bp_final", scale),
    }  # fmt: skip
    if not any(row["reference"] for row in rows):
        del cells["reference"]
    if common is None or not higher:  # (lower is better: the target is one level already)
        del cells[f"{unit} to BP target"]
    if common is None:
        del cells[f"{unit} to BP final"]
    for col in cells:
        widest = max(len(row["setting"] or "") for row in rows) if col == "setting" else 0
        table.add_column(
            col,
            overflow="fold",
            min_width=min(widest, 40) or None,
            justify="left" if col in ("recipe", "rule", "setting") else "right",
        )
    for row in rows:
        table.add_row(*(cell(row) for cell in cells.values()))
    results_console(json_out).print(table)
    for warning in warnings:
        console.print(f"[yellow]warning[/yellow]: {warning}")
    for row in rows:
        if row["reference"]:
            console.print(f"reference of {row['recipe']}: {row['reference']['source']}")
    if common is not None and higher:
        console.print(f"BP target: {target:.0%} of BP's mean final {named} = {common:.4f}; "
                      f"BP final: {common / target:.4f} (runs that never reach it are left "
                      "out of the mean, the column says how many did)")  # fmt: skip
    elif common is not None:
        console.print(f"target: {named} <= {common:.4f} ({'given' if target else 'BP'}'s "
                      "final); runs that never reach it are left out of the mean, the column "
                      "says how many did")  # fmt: skip
    if plot is not None:
        fig = draw_compute(rows, target, common=common is not None and higher, metric=metric,
                           split=split)  # fmt: skip
        console.print(f"wrote {save_figure(fig, plot, fmt)}")
    if json_out:
        print(json.dumps({"target": target, "bp_target_acc": common, "groups": rows,
                          "warnings": warnings, "runs": [r.to_dict() for r in runs]},
                         indent=2))  # fmt: skip


def _recipe_mode(targets: list[str]) -> bool:
    """A recipe (a YAML file or a shipped recipe's name) with key=value overrides, not run
    or sweep folders."""
    first = Path(targets[0])
    if first.is_dir():
        return False
    if first.suffix in (".yaml", ".yml"):
        return True
    return not first.exists() and all("=" in t or t.startswith("~") for t in targets[1:])


def flops(
    targets: list[str] = typer.Argument(
        ..., help="A RECIPE and its key=value overrides, or run folders and sweep folders."
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Recipe mode: batch."),
    device: str = typer.Option("cpu", "--device", help="Recipe mode: auto, cpu, cuda, mps."),
    target: float = typer.Option(
        None,
        "--target",
        min=0.0,
        help="Run mode: a fraction of the final accuracy (default 0.9); for a lower-is-better "
        "--metric the value to reach (default: backprop's final value).",
    ),  # fmt: skip
    metric: str = typer.Option(
        "acc", "--metric", help="Run mode: acc or top5; bpc, ppl or loss (language models)."
    ),
    plot: Path = typer.Option(
        None, "--plot", help="Run mode: write the Fig. 3c-style figure (.png, .pdf, .svg)."
    ),
    split: str = typer.Option(
        "test",
        "--split",
        help="Run mode: the evaluations the targets read, test or val (the "
        "validation split: a language model's, or data.val_fraction's held-out images).",
    ),
    fmt: str = typer.Option(None, "--format", help="--plot's format: png, pdf or svg."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """FLOPs of a recipe's training step, or the compute runs needed to reach a target.

    Given a recipe: one step's FLOPs under its rule and under backprop, per layer. Given run
    folders: the training compute each needed to reach its target accuracy (or bpc)."""
    recipe_mode = _recipe_mode(targets)
    given = {
        "--batch-size": batch_size is not None,
        "--device": device != "cpu",
        "--target": target is not None,
        "--metric": metric != "acc",
        "--plot": plot is not None,
        "--split": split != "test",
        "--format": fmt is not None,
    }
    other_mode = [flag for flag, on in given.items()  # each option serves one of the modes
                  if on and (flag in ("--batch-size", "--device")) != recipe_mode]  # fmt: skip
    if other_mode:
        mode, other = ("a recipe", "run folders") if recipe_mode else ("run folders", "a recipe")
        raise ConfigError(f"{', '.join(other_mode)}: for {other} only, and {targets[0]!r} "
                          f"makes this a count of {mode}; leave them out")  # fmt: skip
    if recipe_mode:
        recipe_flops(targets[0], targets[1:], batch_size, device, json_out)
    else:
        from ldfa_cli.analysis.compute import HIGHER_IS_BETTER

        if metric not in HIGHER_IS_BETTER:
            raise ConfigError(f"--metric must be one of {', '.join(HIGHER_IS_BETTER)}, got "
                              f"'{metric}'")  # fmt: skip
        runs_flops([Path(t) for t in targets], target, json_out, plot, metric, fmt,
                   checked_split(split))  # fmt: skip
