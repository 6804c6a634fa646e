"""``ldfa plot``: test accuracy and loss of several runs on shared axes."""

from __future__ import annotations

import io
from pathlib import Path

import typer
import yaml

from ldfa_cli.console import stderr_console
from ldfa_cli.errors import CheckpointError, ConfigError

X_KEYS = {"epoch": ("epoch", 1.0, "epoch"), "flops": ("train_flops", 1e-12, "training TFLOPs"),
          "time": ("time_s", 1.0, "wall-clock (s)")}  # fmt: skip


def _label(run: Path) -> str:
    config = yaml.safe_load((run / "config.yaml").read_text())
    fb = config["feedback"]
    rank = f" r={fb['rank']}" if fb.get("rank") is not None and fb["rule"] != "bp" else ""
    return f"{run.name}: {fb['rule']}{rank}"


ALIGNMENT_PANELS = (("angle_deg", "angle(B, W^T) (degrees)"),
                    ("norm_ratio", "||B|| / ||W^T||"),
                    ("grad_cosine", "cos(input grad, backprop's)"))  # fmt: skip


def _check_run(run: Path) -> None:
    if not (run / "metrics.jsonl").is_file() or not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run} is not a run folder (no metrics.jsonl/config.yaml)")


def _save(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    from ldfa_cli.engine.checkpoint import atomic_write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, lambda handle: handle.write(buffer.getvalue()))
    stderr_console().print(f"wrote {out}")


def plot_alignment(runs: list[Path], out: Path) -> None:
    """Alignment over training (``train.log_alignment_every``): a panel per measure. One
    run: a line per converted layer. Several runs: a colour per run, its layers drawn thin
    and their mean thick (the one labelled), so that two runs of a 17-layer ViT stay
    readable."""
    import matplotlib.pyplot as plt

    from ldfa_cli.engine.metrics import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for index, run in enumerate(runs):
        _check_run(run)
        events = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "alignment"]
        layers = list(events[0]["layers"]) if events else []
        steps = [e["step"] for e in events]
        colour = colours[index % len(colours)]
        for ax, (key, _) in zip(axes, ALIGNMENT_PANELS, strict=True):
            curves = [[e["layers"][layer][key] for e in events] for layer in layers]
            for layer, curve in zip(layers, curves, strict=True):
                if len(runs) == 1:
                    ax.plot(steps, curve, marker=".", label=layer)
                else:
                    ax.plot(steps, curve, color=colour, linewidth=0.6, alpha=0.35)
            if len(runs) > 1 and curves:
                mean = [sum(values) / len(values) for values in zip(*curves, strict=True)]
                ax.plot(steps, mean, color=colour, linewidth=2.2, marker=".",
                        label=f"{_label(run)} (mean of {len(layers)} layers)")  # fmt: skip
        drawn += len(layers)
    if not drawn:
        raise CheckpointError("no alignment events in these runs: train them with "
                              "train.log_alignment_every=N")  # fmt: skip
    for ax, (_, label) in zip(axes, ALIGNMENT_PANELS, strict=True):
        ax.set(xlabel="step", ylabel=label)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, out)


def plot(
    runs: list[Path] = typer.Argument(..., help="Run folders and sweep folders."),
    x: str = typer.Option("epoch", "--x", help="epoch, flops or time."),
    alignment: bool = typer.Option(
        False, "--alignment", help="Draw the alignment of B with W^T over training instead."
    ),  # fmt: skip
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write."),
    metric: str = typer.Option(
        None, "--metric", help="acc or top5; bpc or ppl (a language model's default: bpc)."
    ),
    split: str = typer.Option("test", "--split", help="test or val (the validation split)."),
) -> None:
    """Test (or validation) accuracy or bpc and loss curves of several runs against epoch,
    FLOPs or time; or, with
    --alignment, each layer's angle, norm ratio and gradient cosine over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldfa_cli.analysis.runs import collect_runs
    from ldfa_cli.engine.metrics import read_metrics

    runs = collect_runs(runs, say=stderr_console().print)
    if alignment:
        plot_alignment(runs, out)
        return
    if x not in X_KEYS:
        raise ConfigError(f"--x must be epoch, flops or time, got '{x}'")
    if split not in ("test", "val"):
        raise ConfigError(f"--split must be test or val, got '{split}'")
    prefix = "val_" if split == "val" else ""
    key, scale, xlabel = X_KEYS[x]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    shown = metric or "acc"
    for run in runs:
        _check_run(run)
        evals = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]
        if not evals:
            continue
        if key not in evals[0]:
            raise CheckpointError(f"{run}: its metrics have no '{key}' (an older run?)")
        shown = metric or ("bpc" if "bpc" in evals[0] else "acc")
        if shown not in evals[0]:
            raise CheckpointError(f"{run}: its evaluations have no '{shown}' (acc for a "
                                  "classifier, bpc or ppl for a language model)")  # fmt: skip
        if prefix + shown not in evals[0]:
            raise CheckpointError(f"{run}: its evaluations have no validation split "
                                  "(data.val_fraction 0); plot --split test")  # fmt: skip
        percent = 100 if shown in ("acc", "top5") else 1
        xs = [e[key] * scale for e in evals]
        label = _label(run)
        acc_ax.plot(xs, [percent * e[prefix + shown] for e in evals], marker=".", label=label)
        loss_ax.plot(xs, [e[prefix + "loss"] for e in evals], marker=".", label=label)
    acc_ax.set(xlabel=xlabel, ylabel=f"{split} {shown}" + (" (%)" if percent == 100 else ""))
    loss_ax.set(xlabel=xlabel, ylabel=f"{split} loss")
    acc_ax.legend(fontsize=7)
    _save(fig, out)
