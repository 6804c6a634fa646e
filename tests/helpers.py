"""Run the ldfa command in-process (fast) with its real error mapping and exit codes; press
Ctrl-C inside it."""

from __future__ import annotations

import os
import signal
import sys

from ldfa_cli.cli.app import app
from ldfa_cli.cli.errors import run_guarded


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ldfa ARGS``."""
    argv = sys.argv
    sys.argv = ["ldfa", *map(str, args)]
    try:
        try:
            code = run_guarded(app)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def train_one_epoch_then_resume(capsys, recipe, run) -> None:
    """``ldfa train RECIPE --stop-after 1`` into ``run``, then ``--resume`` to the end; both
    must succeed (the run to compare with an uninterrupted one)."""
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--stop-after", "1",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--resume", run, "--device", "cpu")
    assert code == 0, err


def eval_losses(run) -> list[tuple]:
    """(step, loss, val_loss) of every evaluation of a language model's run."""
    from ldfa_cli.engine.metrics import read_metrics

    return [(e["step"], e["loss"], e["val_loss"])
            for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]  # fmt: skip


def press_ctrl_c_during(monkeypatch, name: str, call: int, presses: int = 1):
    """Send this process ``presses`` real SIGINTs while ``name``, a function the training
    loop or step imports (``evaluate``, ``backward_with_rules``), runs for the call-th time
    in training. Returns an undo."""
    import ldfa_cli.engine.loop
    import ldfa_cli.engine.step

    loop = next(m for m in (ldfa_cli.engine.loop, ldfa_cli.engine.step) if hasattr(m, name))
    real, calls = getattr(loop, name), {"n": 0}

    from ldfa_cli.feedback import accounting

    def pressed(*args, **kwargs):
        if not accounting.ACTIVE:  # the FLOP meter's step on a copy is not counted
            calls["n"] += 1
        if calls["n"] == call and not accounting.ACTIVE:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, name, pressed)
    return lambda: monkeypatch.setattr(loop, name, real)


def analytic(layer, samples: int, batch: int = 0) -> dict:
    """The layer's analytic FLOPs by phase, as its rule states them."""
    return layer.rule.analytic_flops(layer, samples, batch)


def recipe_layers(recipe_spec, overrides=()) -> dict[str, str]:
    """{layer name: conversion note} of every Linear/Conv layer of a recipe's model as the
    recipe converts it, so that tests name layers as the installed timm does."""
    import torch

    from ldfa_cli.config import load_recipe
    from ldfa_cli.engine.build import shaped_network
    from ldfa_cli.feedback import conversion_report

    recipe, _ = load_recipe(str(recipe_spec), list(overrides))
    model = shaped_network(recipe, torch.device("cpu"))
    return {row.name: row.note for row in conversion_report(model).rows}
