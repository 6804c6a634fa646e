"""Files and tables of a theory run: the Fig. 2 / Fig. 4a style PNG, a CSV of the curves,
a JSON summary and the table of final Lambda per mode."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from ldfa_cli.engine.checkpoint import atomic_write_bytes, atomic_write_text

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


def plot(result: TheoryResult, path: Path) -> None:
    """A panel per (mode, rank): simulation solid, theory dashed, a colour per task mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    modes = list(dict.fromkeys(c.mode for c in result.curves))
    ranks = list(dict.fromkeys(c.rank for c in result.curves))
    fig, axes = plt.subplots(len(modes), len(ranks), figsize=(4.2 * len(ranks), 2.6 * len(modes)),
                             sharex=True, sharey=True, squeeze=False)  # fmt: skip
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, cfg.d))
    for c in result.curves:
        ax = axes[modes.index(c.mode)][ranks.index(c.rank)]
        for i in range(cfg.d):
            ax.plot(c.steps, c.simulation[:, i], color=colours[i], lw=1.2)
            ax.plot(c.steps, c.theory[:, i], color=colours[i], lw=1.2, ls="--")
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{TITLES.get(c.mode, c.mode)}, r = {c.rank}", fontsize=9)
        ax.set_ylim(-0.1, 1.2)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel(r"$\Lambda_i$")
    handles = [plt.Line2D([], [], color="k", lw=1.2), plt.Line2D([], [], color="k", ls="--")]
    fig.legend(handles, ["simulation", "theory"], loc="upper right", fontsize=8)
    fig.suptitle(f"linear network {cfg.n}-{cfg.k}-{cfg.m}, task rank d = {cfg.d} "
                 f"(colour: mode 1 dark to {cfg.d} light), p = {cfg.p}", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


def write_all(result: TheoryResult, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    atomic_write_text(out / "summary.json", json.dumps(data, indent=2) + "\n")
    write_csv(result, out / "curves.csv")
    plot(result, out / "theory.png")
    return data
