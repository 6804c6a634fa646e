"""``ldfa eval``: accuracy, loss, per-class accuracy and per-layer feedback alignment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from ldfa_cli.console import results_console


def evaluate_checkpoint(target: Path, split: str, device_name: str, which: str, probe: int):
    from ldfa_cli.data import load_data
    from ldfa_cli.engine.build import load_trained, pick_device
    from ldfa_cli.engine.evaluate import evaluate
    from ldfa_cli.engine.regularise import plain_task_loss
    from ldfa_cli.feedback import alignment_diagnostics

    device = pick_device(device_name)
    path, state, recipe, model = load_trained(target, which, device)
    data = load_data(recipe.data, device)
    if split == "train":
        data = data.with_train_as_test()
    if split == "val" and not data.has_val:
        from ldfa_cli.errors import ConfigError

        raise ConfigError("--split val: this run holds no images out of training "
                          "(data.val_fraction 0); use --split test")  # fmt: skip
    result = evaluate(model, data, recipe.train.eval_batch_size,
                      split="val" if split == "val" else "test")  # fmt: skip
    x, y = data.probe(probe, split="val")
    diagnostics = alignment_diagnostics(model, x, y, plain_task_loss)
    progress = state["progress"]  # best.pt is saved before its epoch counts as done
    steps = data.steps_per_epoch(recipe.train.batch_size)
    epochs = round(progress["epoch"] + progress["batch_in_epoch"] / max(steps, 1), 4)
    return {"checkpoint": str(path), "split": split, "step": progress["step"],
            "epoch": epochs, **result, "class_names": data.class_names,
            "reference": reference_beside(recipe.reference, result["acc"]),
            "diagnostics": diagnostics}  # fmt: skip


def reference_beside(reference, measured: float) -> dict | None:
    """The recipe's published number, as top-1 accuracy, beside the measured one."""
    if reference is None:
        return None
    return {"top1": reference.accuracy, "sd": reference.sd, "source": reference.source,
            "measured": measured, "difference": measured - reference.accuracy}  # fmt: skip


def describe_reference(ref: dict) -> str:
    sd = f" ± {ref['sd']:.4f}" if ref.get("sd") is not None else ""
    return (f"reference top-1 {ref['top1']:.4f}{sd} ({ref['source']}); measured "
            f"{ref['measured']:.4f} ({100 * ref['difference']:+.2f} points)")  # fmt: skip


def eval_(
    target: Path = typer.Argument(..., help="A run folder or a checkpoint file."),
    split: str = typer.Option(
        "test", "--split", help="test, val (the images held out of training) or train."
    ),
    checkpoint: str = typer.Option("last", "--checkpoint", help="In a run folder: last or best."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    probe: int = typer.Option(256, "--probe", min=1, help="Probe batch size for diagnostics."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """Evaluate a trained run: accuracy, loss, per-class accuracy, feedback alignment."""
    from ldfa_cli.errors import ConfigError

    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split must be test, val or train, got '{split}'")
    if checkpoint not in ("last", "best"):
        raise ConfigError(f"--checkpoint must be last or best, got '{checkpoint}'")
    result = evaluate_checkpoint(target, split, device, checkpoint, probe)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    console = results_console()  # the result itself: stdout
    where = f"{result['checkpoint']} (epoch {result['epoch']:g}, step {result['step']})"
    if "bpc" in result:  # a language model: bits per character, then next-token accuracy
        console.print(f"{where}: {split} bpc {result['bpc']:.4f} (loss {result['loss']:.4f} "
                      f"nats per token, ppl {result['ppl']:.3f}), next-token accuracy "
                      f"{result['acc']:.4f}, {result['samples']} tokens")  # fmt: skip
    else:
        console.print(f"{where}: {split} accuracy {result['acc']:.4f} (top-5 "
                      f"{result['top5']:.4f}), loss {result['loss']:.4f}, "
                      f"{result['samples']} images")  # fmt: skip
    if result["reference"] is not None:
        console.print(describe_reference(result["reference"]))
    if "bpc" not in result:  # (a language model's per-token table would list its vocabulary)
        classes = Table(title="per-class accuracy")
        classes.add_column("class")
        classes.add_column("accuracy", justify="right")
        for name, acc in zip(result["class_names"], result["per_class_acc"], strict=True):
            classes.add_row(name, f"{acc:.4f}")
        console.print(classes)
    if result["diagnostics"]:
        table = Table(title="feedback alignment (probe batch)")
        columns = ["layer", "rule", "rank", "||B-W^T||/||W^T||", "angle(B, W^T)", "cos(grad, BP)"]
        svd = any("u_orth_error" in row for row in result["diagnostics"])
        if svd:  # svd_dfa: how far the factors are from orthonormal
            columns += ["||U^T U - I||", "||V^T V - I||"]
        for col in columns:
            table.add_column(col, justify="left" if col in ("layer", "rule") else "right")
        for row in result["diagnostics"]:
            cells = [row["name"], row["rule"], str(row["rank"]), f"{row['rel_error']:.3f}",
                     f"{row['angle_deg']:.1f}°", f"{row['grad_cosine']:.3f}"]  # fmt: skip
            if svd:
                cells += [f"{row.get(k, math.nan):.3f}" for k in ("u_orth_error", "v_orth_error")]
            table.add_row(*cells)
        console.print(table)
