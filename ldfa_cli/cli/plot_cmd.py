"""``ldfa plot``: learning curves of several runs (seeds averaged), or their alignment."""

from __future__ import annotations

from pathlib import Path

import typer

from ldfa_cli.analysis.figures import figure_path, save_figure
from ldfa_cli.analysis.runs import checked_split
from ldfa_cli.console import stderr_console
from ldfa_cli.errors import ConfigError


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders and sweep folders."),
    x: str = typer.Option("epoch", "--x", help="epoch, flops or time."),
    alignment: bool = typer.Option(
        False, "--alignment", help="Draw the alignment of B with W^T over training instead."
    ),  # fmt: skip
    out: Path = typer.Option(
        None, "--out", help="File to write (.png, .pdf, .svg; default curves.png or --format's)."
    ),
    fmt: str = typer.Option(None, "--format", help="png, pdf or svg (default: --out's suffix)."),
    metric: str = typer.Option(
        None, "--metric", help="acc or top5; bpc or ppl (a language model's default: bpc)."
    ),
    split: str = typer.Option("test", "--split", help="test or val (the validation split)."),
) -> None:
    """Learning curves of runs against epoch, FLOPs or time, or their alignment.

    Test (or validation) accuracy or bpc and loss: seeds of one setting as their mean in a ±
    sd band, runs named by what sets them apart, a row of panels per dataset; or, with
    --alignment, each layer's angle, norm ratio and gradient cosine over training."""
    from ldfa_cli.analysis.curves import X_AXES, draw_alignment, draw_curves
    from ldfa_cli.analysis.runs import collect_runs, group_by_setting, read_run

    console = stderr_console()
    out = out or Path("curves")  # the suffix from --format, png by default
    figure_path(out, fmt)  # a bad --out or --format fails before any drawing
    records = [read_run(run) for run in collect_runs(runs, say=console.print)]
    if alignment:
        fig = draw_alignment(group_by_setting(records, say=console.print))
    else:
        if x not in X_AXES:
            raise ConfigError(f"--x must be epoch, flops or time, got '{x}'")
        checked_split(split)
        if not any(record.evaluations for record in records):
            raise ConfigError("none of these runs has an evaluation yet: nothing to draw")
        panels: dict[str, list] = {}
        for record in records:
            panels.setdefault(record.dataset, []).append(record)
        if len(panels) > 1:
            console.print(f"runs of {len(panels)} datasets ({', '.join(panels)}): a row of "
                          "panels each, as their metrics do not share an axis")  # fmt: skip
        grouped = {name: group_by_setting(members, say=console.print)
                   for name, members in panels.items()}  # fmt: skip
        fig = draw_curves(grouped, x, metric, split)
    console.print(f"wrote {save_figure(fig, out, fmt)}")
