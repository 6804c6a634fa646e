"""Learning curves and alignment over training, drawn from run records (``ldfa plot``).

Runs that are one setting but for the seed are one line, their mean, in a band of ± one
standard deviation, the seed count in the legend; runs are named by what sets them apart
(:func:`~ldfa_cli.analysis.runs.group_by_setting`), never by their folder's timestamp.
Runs of different datasets get panels of their own (one row each), as their metrics do
not share an axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldfa_cli.analysis.figures import (
    BP_COLOUR,
    METRIC_NAMES,
    PAGE_IN,
    colour,
    flop_unit,
    line_style,
    new_figure,
    styled_figure,
)
from ldfa_cli.analysis.runs import RunGroup, metric_key
from ldfa_cli.engine.metrics import read_metrics
from ldfa_cli.errors import CheckpointError

X_AXES = {"epoch": "epoch", "flops": "train_flops", "time": "time_s"}
PERCENT = ("acc", "top5")


def metric_of(groups: list[RunGroup], asked: str | None) -> str:
    """The metric drawn for a panel: the one asked, else bpc for a language model, else acc
    (read from the first run that has evaluated)."""
    if asked:
        return asked
    evaluated = next((r.evaluations for g in groups for r in g.runs if r.evaluations), None)
    return "bpc" if evaluated and "bpc" in evaluated[0] else "acc"


@dataclass
class Band:
    """A group's curve: x, the mean over its seeds and their sd (0 where one seed has
    reached that evaluation), and how many seeds it holds."""

    x: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    seeds: int


def band(group: RunGroup, x_key: str, y_key: str) -> Band | None:
    """The mean and sd over the group's seeds at each evaluation (x itself averaged, which
    matters for wall-clock only), each over the seeds that reached it, so that an unfinished
    seed shortens nothing; None where no run has evaluated."""
    xs, ys = [], []
    for run in group.runs:
        evals = run.evaluations
        if not evals:
            continue
        for key in (x_key, y_key):
            if key not in evals[0]:
                raise CheckpointError(f"{run.path}: its evaluations have no '{key}'"
                                      + _hint(key))  # fmt: skip
        xs.append([e[x_key] for e in evals])
        ys.append([e[y_key] for e in evals])
    if not xs:
        return None
    n = max(map(len, xs))
    x, y = (np.array([row + [np.nan] * (n - len(row)) for row in rows], dtype=float)
            for rows in (xs, ys))  # fmt: skip
    reached = (~np.isnan(y)).sum(axis=0)
    mean = np.nanmean(y, axis=0)
    centred = np.where(np.isnan(y), 0.0, y - mean)
    sd = np.sqrt((centred**2).sum(axis=0) / np.maximum(reached - 1, 1))
    return Band(np.nanmean(x, axis=0), mean, np.where(reached > 1, sd, 0.0), len(xs))


def _hint(key: str) -> str:
    if key.startswith("val_"):
        return " (no validation split: data.val_fraction 0); plot --split test"
    if key in ("train_flops", "time_s"):
        return " (an older run?)"
    return " (acc or top5 for a classifier, bpc or ppl for a language model)"


def _draw_band(ax, found: Band, scale: float, label: str, look: dict) -> None:
    ax.plot(found.x * scale, found.mean, marker=".", label=label, **look)
    if found.sd.any():
        ax.fill_between(found.x * scale, found.mean - found.sd, found.mean + found.sd,
                        color=look["color"], alpha=0.2, linewidth=0)  # fmt: skip


def colours_of(panels: dict[str, list[RunGroup]]) -> dict[str, dict]:
    """A colour and line style per group name, the same in every panel: black and solid
    for the first backprop group, the palette in order for the rest, each round of it in
    a line style of its own."""
    looks: dict[str, dict] = {}
    for groups in panels.values():
        for group in groups:
            if group.name in looks:
                continue
            is_bp = group.runs[0].config.get("feedback", {}).get("rule") == "bp"
            if is_bp and all(look["color"] != BP_COLOUR for look in looks.values()):
                looks[group.name] = {"color": BP_COLOUR, "linestyle": "-"}
            else:
                index = sum(look["color"] != BP_COLOUR for look in looks.values())
                looks[group.name] = {"color": colour(index), "linestyle": line_style(index)}
    return looks


def legend_of(group: RunGroup, seeds: int) -> str:
    """The group's name and its seed, or how many seeds its mean ± sd is over."""
    if seeds == 1:
        seed = next(r.seed for r in group.runs if r.evaluations)
        return f"{group.name}, seed {seed}"
    return f"{group.name} (mean ± sd, {seeds} seeds)"


@styled_figure
def draw_curves(panels: dict[str, list[RunGroup]], x: str, metric: str | None,
                split: str):  # fmt: skip
    """A row per dataset: its metric (left) and loss (right) against ``x`` (epoch, flops,
    time) on the ``split`` (test or val), a line per group."""
    x_key = X_AXES[x]
    rows = sum(len(groups) for groups in panels.values())
    fig = new_figure(PAGE_IN, 2.4 * len(panels) + 0.2 * ((rows + 1) // 2) + 0.3)
    looks = colours_of(panels)
    axes = fig.subplots(len(panels), 2, squeeze=False)
    scale, unit = 1.0, {"epoch": "epoch", "time": "wall-clock (s)"}.get(x, "")
    if x == "flops":
        every = [b.x.max() for groups in panels.values() for g in groups
                 if (b := band(g, x_key, metric_key("loss", split))) is not None]  # fmt: skip
        factor, name = flop_unit(every)
        scale, unit = 1.0 / factor, f"training compute ({name})"
    for (dataset, groups), (metric_ax, loss_ax) in zip(panels.items(), axes, strict=True):
        shown = metric_of(groups, metric)
        percent = 100.0 if shown in PERCENT else 1.0
        for group in groups:
            found = band(group, x_key, metric_key(shown, split))
            if found is None:
                continue
            found.mean, found.sd = percent * found.mean, percent * found.sd
            label = legend_of(group, found.seeds)
            _draw_band(metric_ax, found, scale, label, looks[group.name])
            _draw_band(loss_ax, band(group, x_key, metric_key("loss", split)), scale, label,
                       looks[group.name])  # fmt: skip
        name = METRIC_NAMES.get(shown, shown)
        metric_ax.set(xlabel=unit, ylabel=f"{split} {shown}" + (" (%)" if percent == 100 else ""),
                      title=f"{dataset}: {split} {name}")  # fmt: skip
        loss_ax.set(xlabel=unit, ylabel=f"{split} loss", title=f"{dataset}: {split} loss (nats)")
    handles = {}  # one legend below every panel, each group once
    for ax in axes[:, 0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=2)
    return fig


ALIGNMENT_PANELS = (("angle_deg", "angle(B, W^T) (degrees)"),
                    ("norm_ratio", "||B|| / ||W^T||"),
                    ("grad_cosine", "cos(input grad, backprop's)"))  # fmt: skip


@styled_figure
def draw_alignment(groups: list[RunGroup]):
    """Alignment over training (``train.log_alignment_every``): a panel per measure. One
    run: a line per converted layer. Several: a colour per run, its layers thin and their
    mean thick (the one labelled), so that two runs of a 17-layer ViT stay readable."""
    fig = new_figure(PAGE_IN, 2.6)
    axes = fig.subplots(1, 3)
    runs = [(group, run) for group in groups for run in group.runs]
    drawn = 0
    for index, (group, run) in enumerate(runs):
        events = [e for e in read_metrics(run.path / "metrics.jsonl") if e["event"] == "alignment"]
        layers = list(events[0]["layers"]) if events else []
        steps = [e["step"] for e in events]
        name = f"{group.name}, seed {run.seed}"
        for ax, (key, _) in zip(axes, ALIGNMENT_PANELS, strict=True):
            curves = [[e["layers"][layer][key] for e in events] for layer in layers]
            for layer, curve in zip(layers, curves, strict=True):
                if len(runs) == 1:
                    ax.plot(steps, curve, marker=".", label=layer)
                else:
                    ax.plot(steps, curve, color=colour(index), linewidth=0.6, alpha=0.35)
            if len(runs) > 1 and curves:
                mean = np.mean(np.array(curves, dtype=float), axis=0)
                ax.plot(steps, mean, color=colour(index), linewidth=2.0, marker=".",
                        label=f"{name} (mean of {len(layers)} layers)")  # fmt: skip
        drawn += len(layers)
    if not drawn:
        raise CheckpointError("no alignment events in these runs: train them with "
                              "train.log_alignment_every=N")  # fmt: skip
    for ax, (_, label) in zip(axes, ALIGNMENT_PANELS, strict=True):
        ax.set(xlabel="step", ylabel=label)
    title = f"{runs[0][0].name}, seed {runs[0][1].seed}" if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"alignment of the feedback B with W^T over training: {title}")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))))
    return fig
