"""Compute to accuracy: training FLOPs and wall-clock until a run first reaches a target
fraction of its final accuracy (the paper's Fig. 3c bottom), until it reaches that fraction
of backprop's mean final accuracy, and until it reaches backprop's mean final accuracy
itself (the authors' second criterion), grouped over seeds: runs whose whole resolved
config is the same but for the seed (and the output settings) are one group."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ldfa_cli.analysis.figures import (
    BP_COLOUR,
    COLUMN_IN,
    METRIC_NAMES,
    PAGE_IN,
    colour,
    flop_unit,
    new_figure,
    styled_figure,
)
from ldfa_cli.analysis.runs import (
    dataset_of,
    distinguishing,
    metric_key,
    recorded_recipe,
    run_settings,
)
from ldfa_cli.engine.metrics import read_metrics
from ldfa_cli.errors import CheckpointError


@dataclass
class RunSummary:
    path: str
    recipe: str
    rule: str
    rank: int | float | None
    seed: int
    final: float  # the metric's mean over the last 3 evaluations
    flops_to_target: float | None
    time_to_target: float | None
    flops_to_common: float | None = None
    time_to_common: float | None = None
    flops_to_bp_final: float | None = None  # first reaching BP's mean final accuracy
    time_to_bp_final: float | None = None
    reference: dict | None = None  # the recipe's published top-1 and its source
    settings: dict | None = None  # the resolved config, flat, but for the seed and output
    metric: str = "acc"  # what final and the targets measure
    split: str = "test"  # the evaluations they read: the test split's or the validation split's
    # the run's evaluation events, read once for its own target and again for backprop's
    evaluations: list[dict] = field(default_factory=list, repr=False)
    dataset: str = ""  # what it learned (runs of two datasets are not compared)

    @property
    def group(self) -> tuple:
        return (self.recipe, tuple(sorted((self.settings or {}).items())))

    @property
    def is_bp(self) -> bool:
        return self.rule == "bp"

    def to_dict(self) -> dict:
        """What ``--json`` prints of the run: its summary, not its evaluations again."""
        return {k: v for k, v in vars(self).items() if k != "evaluations"}


# an evaluation's metrics and whether higher is better: accuracies, and a language model's
# bits per token, perplexity and loss
HIGHER_IS_BETTER = {"acc": True, "top5": True, "bpc": False, "ppl": False, "loss": False}


def reaches(value: float, level: float, metric: str) -> bool:
    return value >= level if HIGHER_IS_BETTER[metric] else value <= level


def _first_reaching(evals: list[dict], level: float | None, metric: str = "acc",
                    split: str = "test") -> tuple[float | None, float | None]:  # fmt: skip
    if level is None:
        return None, None
    key = metric_key(metric, split)
    for event in evals:
        if reaches(event[key], level, metric):
            return event.get("train_flops"), event.get("time_s")
    return None, None


def own_level(final: float, target: float | None, metric: str) -> float | None:
    """The level a run's compute to target counts to: ``target`` times its final value for
    an accuracy (a fraction of it), the value ``target`` itself for a lower-is-better
    metric (None: backprop's final value, set once the runs are all read)."""
    return target * final if HIGHER_IS_BETTER[metric] else target


def summarise_run(run_dir: Path, target: float | None, metric: str = "acc",
                  split: str = "test") -> RunSummary:  # fmt: skip
    run_dir = Path(run_dir)
    metrics, config_file = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file() or not config_file.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no metrics.jsonl/config.yaml)")
    config = yaml.safe_load(config_file.read_text())
    evals = [e for e in read_metrics(metrics) if e.get("event") == "eval"]
    if not evals:
        raise CheckpointError(f"{run_dir} has no evaluation yet")
    if "train_flops" not in evals[-1]:
        raise CheckpointError(f"{run_dir} has no train_flops in metrics.jsonl (an older run?)")
    if metric not in evals[-1]:
        raise CheckpointError(f"{run_dir}'s evaluations have no '{metric}' (acc for a "
                              "classifier; bpc, ppl or loss for a language model)")  # fmt: skip
    key = metric_key(metric, split)
    if key not in evals[-1]:
        raise CheckpointError(f"{run_dir} has no validation split (data.val_fraction 0): "
                              "use --split test")  # fmt: skip
    last = [e[key] for e in evals[-3:]]
    final = sum(last) / len(last)
    flops, seconds = _first_reaching(evals, own_level(final, target, metric), metric, split)
    recipe = recorded_recipe(run_dir)
    fb = config["feedback"]
    reference = config.get("reference")
    if reference:
        top1 = reference.get("top1")
        top1 = 1.0 - reference["top1_error"] if top1 is None else top1
        reference = {"top1": top1, "sd": reference.get("sd"), "source": reference["source"]}
    return RunSummary(str(run_dir), recipe or config.get("description", "")[:40], fb["rule"],
                      fb.get("rank"), config["train"]["seed"], final, flops, seconds,
                      reference=reference, settings=run_settings(config), metric=metric,
                      split=split, evaluations=evals, dataset=dataset_of(config))  # fmt: skip


def add_common_target(runs: list[RunSummary], target: float | None,
                      metric: str = "acc") -> float | None:  # fmt: skip
    """With backprop runs among them: every run's cost to reach BP's level (target x BP's
    mean final accuracy; for a lower-is-better metric ``target`` itself, or BP's mean final
    value where none is given, which then is every run's own target too) and to reach BP's
    mean final value itself. Returns BP's level."""
    bp = [r.final for r in runs if r.is_bp]
    if not bp:
        return None
    bp_final = sum(bp) / len(bp)
    higher = HIGHER_IS_BETTER[metric]
    level = target * bp_final if higher else (bp_final if target is None else target)
    for run in runs:
        evals, split = run.evaluations, run.split
        run.flops_to_common, run.time_to_common = _first_reaching(evals, level, metric, split)
        run.flops_to_bp_final, run.time_to_bp_final = _first_reaching(evals, bp_final, metric,
                                                                      split)  # fmt: skip
        if not higher and target is None:  # no own target was given: BP's final is it
            run.flops_to_target, run.time_to_target = run.flops_to_common, run.time_to_common
    return level


def mixed_baseline_warning(rows: list[dict]) -> str | None:
    """A note when the backprop runs are of more than one setting (another schedule, other
    epochs): BP's final value and every target from it is their mean over all those runs,
    which is rarely the comparison meant."""
    bp = [row for row in rows if row["rule"] == "bp"]
    if len(bp) < 2:
        return None
    named = "; ".join(f"{row['recipe']} {row['setting'] or ''}".rstrip()
                      + f": {row['seeds']} run{'s' * (row['seeds'] > 1)}"
                      for row in bp)  # fmt: skip
    return (f"BP's final value is the mean over the backprop runs of {len(bp)} settings "
            f"({named}); pass one setting's runs to compare against it alone")  # fmt: skip


def _mean_se(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and standard error over the runs that reached the target; None if none did."""
    got = [v for v in values if v is not None]
    if not got:
        return None, None, 0
    mean = sum(got) / len(got)
    if len(got) < 2:
        return mean, None, len(got)
    var = sum((v - mean) ** 2 for v in got) / (len(got) - 1)
    return mean, math.sqrt(var / len(got)), len(got)


def group_runs(runs: list[RunSummary]) -> tuple[list[dict], list[str]]:
    """One row per group (the same config but for the seed), BP first then by rank: the
    mean and standard error over its seeds, and what sets it apart from the other groups.
    A seed that two runs of a group share counts once (the first run); the warnings say
    which runs were left out."""
    groups: dict[tuple, dict[int, RunSummary]] = {}
    warnings = []
    for run in runs:
        seeds = groups.setdefault(run.group, {})
        if run.seed in seeds:
            warnings.append(f"{run.path} repeats seed {run.seed} of {seeds[run.seed].path} "
                            "(the same config): counted once, the first")  # fmt: skip
        else:
            seeds[run.seed] = run

    def order(key):
        run = next(iter(groups[key].values()))
        rank = run.rank if run.rule != "bp" else None
        return (run.rule != "bp", float("inf") if rank is None else float(rank), run.rule)

    keys = sorted(groups, key=order)
    labels = {}  # what sets a group apart from the other groups of its recipe
    for recipe in {key[0] for key in keys}:
        mine = [key for key in keys if key[0] == recipe]
        found = distinguishing([next(iter(groups[k].values())).settings or {} for k in mine])
        labels.update(zip(mine, found, strict=True))
    rows = []
    for key in keys:
        label = labels[key]
        members = list(groups[key].values())
        first = members[0]
        row = {"recipe": first.recipe, "rule": first.rule,
               "rank": first.rank if first.rule != "bp" else None, "setting": label,
               "seeds": len(members),
               "reference": next((m.reference for m in members if m.reference), None)}  # fmt: skip
        for name in ("final", "flops_to_target", "time_to_target", "flops_to_common",
                     "time_to_common", "flops_to_bp_final", "time_to_bp_final"):  # fmt: skip
            mean, se, reached = _mean_se([getattr(m, name) for m in members])
            row[name], row[f"{name}_se"] = mean, se
            if name != "final":
                row[f"{name}_reached"] = reached
            elif se is not None:  # the spread over seeds, as results are reported
                row["final_sd"] = se * math.sqrt(reached)
        rows.append(row)
    return rows, warnings


def series_of(recipe: str | None, setting: str = "") -> str:
    """The family a run's recipe belongs to, its rank and 'bp' taken out of the name, so
    that fmnist_vit_bp, fmnist_vit_r8 and fmnist_vit_r16 draw one curve and
    fmnist_vit_r16_authors another; a setting that sets groups apart makes its own."""
    family = re.sub(r"_(r\d+|bp)(?=_|$)", "", recipe or "")
    return f"{family} ({setting})" if setting else family


def _sd(row: dict, name: str) -> float:
    """The sd over seeds of a row's ``name`` (its se times the root of the seeds counted)."""
    se = row.get(f"{name}_se")
    reached = row.get(f"{name}_reached", row.get("seeds", 1))
    return 0.0 if se is None else se * math.sqrt(reached)


@styled_figure
def draw_compute(rows: list[dict], target: float | None, common: bool, metric: str = "acc",
                 split: str = "test"):  # fmt: skip
    """Fig. 3c bottom: bars of the final metric from zero and lines of the compute to the
    target against rank, backprop's slot at the left where backprop runs were given; one
    series per recipe family (bars side by side, a line each); error bars ± 1 sd over
    seeds; every bar, line and reference in the legend; the labels name the ``split`` whose
    evaluations the bars and targets read."""
    from matplotlib.patches import Patch

    key = "flops_to_common" if common else "flops_to_target"
    higher = HIGHER_IS_BETTER[metric]
    percent = 100 if higher else 1  # accuracies in %
    named = METRIC_NAMES.get(metric, metric)
    has_bp = any(r["rule"] == "bp" for r in rows)
    slots = ["BP"] if has_bp else []
    slots += [f"r={r}" for r in sorted({r["rank"] for r in rows if r["rule"] != "bp"
                                         and r["rank"] is not None}, key=float)]  # fmt: skip
    slots += list(dict.fromkeys(r["rule"] for r in rows if r["rule"] != "bp" and r["rank"] is None))
    names = list(dict.fromkeys(series_of(r["recipe"], r.get("setting", "")) for r in rows))
    scale, unit = flop_unit([r[key] for r in rows])
    width = 0.8 / len(names)
    wide = 0.9 * len(slots) * max(1, len(names) / 1.5) + 2.2
    fig = new_figure(min(PAGE_IN, max(COLUMN_IN, wide)), 3.4 + 0.12 * len(names))
    ax = fig.subplots()
    twin = ax.twinx()
    twin.grid(False)
    handles = []
    for i, name in enumerate(names):
        mine = [r for r in rows if series_of(r["recipe"], r.get("setting", "")) == name]
        offset = (i - (len(names) - 1) / 2) * width
        xs = [slots.index(_slot(r)) + offset for r in mine]
        tint = colour(i)
        ax.bar(xs, [percent * (r["final"] or 0) for r in mine], width=width * 0.95,
               yerr=[percent * _sd(r, "final") for r in mine], capsize=2, alpha=0.45,
               color=[BP_COLOUR if r["rule"] == "bp" else tint for r in mine])  # fmt: skip
        if any(r["rule"] != "bp" for r in mine):  # (backprop's bar is black, its own entry)
            handles.append(Patch(color=tint, alpha=0.45, label=f"final {named}: {name}"))
        values = [r[key] / scale if r[key] is not None else float("nan") for r in mine]
        twin.errorbar(xs, values, yerr=[_sd(r, key) / scale for r in mine], color=tint,
                      marker="o", capsize=2)  # fmt: skip
        handles.append(_legend_line(tint, "-", "o", f"{unit} to target: {name}"))
        for r, value in zip(mine, values, strict=True):
            if r["rule"] == "bp" and value == value:
                twin.axhline(value, color=tint, ls=":", lw=0.8)
                label = f"backprop's {unit} to target: {name}"
                handles.append(_legend_line(tint, ":", None, label))
    if has_bp:
        handles.insert(0, Patch(color=BP_COLOUR, alpha=0.45, label=f"final {named}: backprop"))
    finals = [percent * ((r["final"] or 0) + _sd(r, "final")) for r in rows]
    ax.set_ylim(0, 100 if percent == 100 else 1.15 * max(finals, default=1.0))
    shown = f"{split} {named}" + (" (%)" if percent == 100 else " (lower is better)")
    ax.set(ylabel=shown, xlabel="feedback rank (or rule)")
    ax.set_xticks(range(len(slots)), slots)
    twin.set_ylim(bottom=0)
    if higher:
        what = "backprop's" if common else "its own"
        level = f"{target:.0%} of {what} final {split} {metric}"
    else:
        level = f"{split} {metric} <= " + ("backprop's final" if target is None else f"{target:g}")
    twin.set_ylabel(f"{unit} to {level}")
    ax.set_title(f"final {named} (bars) and training compute to {level} (lines);\n"
                 "mean ± 1 sd over seeds")  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=min(2, len(handles)))
    return fig


def _slot(row: dict) -> str:
    """A row's place on the x axis: backprop, its rank, or its rule where it has none (fa,
    dfa)."""
    if row["rule"] == "bp":
        return "BP"
    return row["rule"] if row["rank"] is None else f"r={row['rank']}"


def _legend_line(tint: str, style: str, marker: str | None, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=tint, ls=style, marker=marker, label=label)
