"""Files and tables of a theory run: the Fig. 2 / Fig. 4a style figure, a CSV of the curves,
a JSON summary and the table of final Lambda per mode."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from ldfa_cli.analysis.figures import PAGE_IN, new_figure, save_figure, styled_figure
from ldfa_cli.engine.checkpoint import atomic_write_text

from .theory import TheoryResult, learning_times

TITLES = {
    "bp": "backprop (B = W2^T)",
    "fixed": "fixed low-rank B = QP",
    "learn_q": "learn Q, P fixed",
    "normative": "normative Q, P (eq. 9)",
    "oja": "Oja P (eqs. 15, A44), Q fixed",
}


def summary(result: TheoryResult) -> dict:
    cfg = result.config
    rows = []
    for c in result.curves:
        times = learning_times(c.simulation, c.steps)
        rows.append({
            "mode": c.mode, "rank": c.rank,
            "final_lambda_simulation": [round(float(v), 4) for v in c.simulation[-1]],
            "final_lambda_theory": [round(float(v), 4) for v in c.theory[-1]],
            "max_abs_discrepancy": round(c.discrepancy, 5),
            "step_reaching_0.9": [None if np.isinf(t) else int(t) for t in times],
        })  # fmt: skip
    return {"config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in vars(cfg).items()},
            "singular_values": [round(float(s), 4) for s in result.singular_values],
            "runs": rows}  # fmt: skip


def final_table(result: TheoryResult) -> Table:
    d = result.config.d
    table = Table(title="final Lambda_i = u_i^T W2 W1 v_i / S_ii (simulation); 1 = mode learned")
    table.add_column("mode")
    table.add_column("r", justify="right")
    for i in range(d):
        table.add_column(str(i + 1), justify="right")
    table.add_column("max|sim-theory|", justify="right")
    for c in result.curves:
        cells = [f"{v:.2f}" for v in c.simulation[-1]]
        table.add_row(c.mode, str(c.rank), *cells, f"{c.discrepancy:.3f}")
    return table


def write_csv(result: TheoryResult, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["mode", "rank", "step", "task_mode", "lambda_simulation", "lambda_theory"])
    for c in result.curves:
        for t, step in enumerate(c.steps):
            for i in range(result.config.d):
                writer.writerow([c.mode, c.rank, int(step), i + 1,
                                 f"{c.simulation[t, i]:.6g}", f"{c.theory[t, i]:.6g}"])  # fmt: skip
    atomic_write_text(path, buffer.getvalue())


@styled_figure
def draw_theory(result: TheoryResult):
    """A panel per (mode, rank): simulation solid, theory dashed, a colour per task mode
    (the colour bar names them)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D

    cfg = result.config
    modes = list(dict.fromkeys(c.mode for c in result.curves))
    ranks = list(dict.fromkeys(c.rank for c in result.curves))
    fig = new_figure(min(PAGE_IN, 2.6 * len(ranks) + 1.2), 1.7 * len(modes) + 0.9)
    axes = fig.subplots(len(modes), len(ranks), sharex=True, sharey=True, squeeze=False)
    cmap = colormaps["viridis"].resampled(cfg.d)
    colours = [cmap(i) for i in range(cfg.d)]
    for c in result.curves:
        ax = axes[modes.index(c.mode)][ranks.index(c.rank)]
        for i in range(cfg.d):
            ax.plot(c.steps, c.simulation[:, i], color=colours[i], lw=1.0)
            ax.plot(c.steps, c.theory[:, i], color=colours[i], lw=1.0, ls="--")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{TITLES.get(c.mode, c.mode)}, r = {c.rank}")
        ax.set_ylim(-0.1, 1.2)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel(r"$\Lambda_i$")
    handles = [Line2D([], [], color="k", lw=1.0), Line2D([], [], color="k", ls="--", lw=1.0),
               Line2D([], [], color="grey", ls=":", lw=0.6)]  # fmt: skip
    fig.legend(handles, ["simulation", "theory (ODE)", "learned (1)"], loc="outside lower center",
               ncols=3)  # fmt: skip
    norm = BoundaryNorm(np.arange(0.5, cfg.d + 1.5), cfg.d)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8,
                       label="task mode i (1: the largest singular value)")  # fmt: skip
    bar.set_ticks(sorted({1, cfg.d, *range(1, cfg.d + 1, max(1, cfg.d // 4))}))
    fig.suptitle(f"mode overlaps of a linear network {cfg.n}-{cfg.k}-{cfg.m}, task rank d = "
                 f"{cfg.d}, p = {cfg.p} samples")  # fmt: skip
    return fig


def write_all(result: TheoryResult, out: Path, fmt: str = "png") -> dict:
    """summary.json, curves.csv and the figure theory.<fmt> into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    atomic_write_text(out / "summary.json", json.dumps(data, indent=2) + "\n")
    write_csv(result, out / "curves.csv")
    save_figure(draw_theory(result), out / f"theory.{fmt}")
    return data
