"""ldfa train / eval end to end on tiny overrides, resume, run folders, failures."""

import json
import pickle
import signal

import numpy as np
import pytest
import torch
import yaml

from ldfa_cli.engine.metrics import read_metrics
from tests.helpers import press_ctrl_c_during, recipe_layers, run_cli

TINY_TRAIN = {"epochs": 1, "batch_size": 32, "log_every": 2, "eval_batch_size": 128}
FAMILIES = {
    "mlp": ({"name": "mlp", "widths": [32, 32]}, {"rule": "ldfa_local", "rank": 4}),
    "vgg": ({"name": "vgg", "width_multiplier": 0.0625},
            {"rule": "ldfa", "rank": 0.5, "include": ["features.*"]}),
    "vit": ({"name": "vit", "embed_dim": 16, "depth": 1, "num_heads": 2},
            {"rule": "ldfa", "rank": 4}),
    "retina": ({"name": "retina", "retina_channels": 4, "bottleneck": 2, "vvs_channels": 4,
                "vvs_layers": 1, "kernel_size": 3, "fc_width": 16},
               {"rule": "ldfa_local", "rank": 2, "options": {"learn_q": True}}),
}  # fmt: skip


def write_recipe(path, model, feedback, train=None, data=None, **extra):
    recipe = {"description": "test", "model": model, "feedback": feedback,
              "data": {"dataset": "digits", "subset": 128, **(data or {})},
              "train": {**TINY_TRAIN, **(train or {})}, **extra}  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_train_then_eval_each_model_family(capsys, tmp_path, family):
    model, feedback = FAMILIES[family]
    recipe = write_recipe(tmp_path / f"{family}.yaml", model, feedback)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["epochs_done"] == 1 and result["step"] == 4
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "env.json",
                                               "checkpoints"}  # fmt: skip
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    events = read_metrics(run / "metrics.jsonl")
    for event in events:
        assert {"event", "epoch", "step", "split", "loss", "acc", "lr", "images_seen",
                "time_s"} <= set(event)  # fmt: skip
    assert [e["event"] for e in events].count("eval") == 1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"] == 4

    code, out, err = run_cli(capsys, "eval", run, "--json", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    assert 0.0 <= report["acc"] <= 1.0 and len(report["per_class_acc"]) == 10
    assert report["acc"] == pytest.approx(events[-1]["acc"])
    assert report["diagnostics"] and all(-1 <= d["grad_cosine"] <= 1
                                         for d in report["diagnostics"])  # fmt: skip


def test_resume_gives_the_same_losses_bit_for_bit(capsys, tmp_path):
    model = {"name": "vgg", "width_multiplier": 0.0625}  # BatchNorm and dropout: RNG matters
    feedback = {"rule": "ldfa_local", "rank": 2, "options": {"learn_q": True}}
    recipe = write_recipe(tmp_path / "r.yaml", model, feedback,
                          train={"epochs": 2, "deterministic": True, "log_every": 1},
                          data={"augment": {"crop_padding": 1, "hflip": True}})  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    assert run_cli(capsys, "train", recipe, "--out", parts, "--device", "cpu",
                   "--stop-after", "1")[0] == 0  # fmt: skip
    halfway = torch.load(parts / "checkpoints" / "last.pt", weights_only=True)
    assert halfway["progress"]["epoch"] == 1
    code, _, err = run_cli(capsys, "train", "--resume", parts, "--device", "cpu")
    assert code == 0, err

    def losses(run):
        return [(e["event"], e["step"], e["loss"]) for e in read_metrics(run / "metrics.jsonl")]

    assert losses(whole) == losses(parts)
    assert len(losses(whole)) == 2 * 4 + 2
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(parts / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    env = json.loads((parts / "env.json").read_text())
    assert len(env["resumes"]) == 1


def test_non_empty_folder_refused_unless_overwrite(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "train", recipe, "--out", run)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (run / "keep.txt").read_text() == "precious"
    assert run_cli(capsys, "train", recipe, "--out", run, "--overwrite", "--device", "cpu")[0] == 0
    assert not (run / "keep.txt").exists()


def test_dry_run_writes_nothing_and_shows_the_layers(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["vit"])
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", recipe, "--out", run, "--dry-run", "--device", "cpu")
    assert code == 0, err
    assert not run.exists()
    layers = recipe_layers(recipe)  # every Linear and Conv, as the installed timm names them
    assert "kept: its input needs no gradient" in layers.values()
    for word in (*layers, "its input needs no gradient", "parameters: forward",
                 "one training step"):  # fmt: skip
        assert word in out and word not in err  # a table to stdout: it pipes


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], train={"epochs": 3})
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "--out", run, "--stop-after", "1",
                   "--device", "cpu")[0] == 0  # fmt: skip
    good = (run / "checkpoints" / "last.pt").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", run, "optim.lr=1e30", "--device", "cpu")
    assert code == 1 and "loss became" in err and "Traceback" not in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    code, _, err = run_cli(capsys, "train", "--resume", run, "optim.name=sgd", "--device", "cpu")
    assert code == 2 and "optim.name is 'sgd' but the run was trained with 'adam'" in err
    code, _, err = run_cli(capsys, "train", "--resume", run, "feedback.rank=3", "--device", "cpu")
    assert code == 2 and "does not fit the resumed recipe" in err


def test_corrupt_or_foreign_checkpoint_gets_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "eval", bad)
    assert code == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    code, _, err = run_cli(capsys, "eval", foreign)
    assert code == 2 and "not an ldfa checkpoint" in err
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and "not a run folder" in err


def test_missing_dataset_offline_names_the_files(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"],
                          data={"dataset": "fashion_mnist", "root": str(tmp_path / "none"),
                                "download": False})  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run")
    assert code == 2
    assert "train-images-idx3-ubyte" in err and "data.root" in err and "Traceback" not in err
    recipe = write_recipe(tmp_path / "c.yaml", *FAMILIES["mlp"],
                          data={"dataset": "cifar10", "root": str(tmp_path / "none"),
                                "download": False})  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run2")
    assert code == 2 and "cifar-10-python.tar.gz" in err


def _write_fake_cifar10(root, per_batch=8, seed=0):
    """Tiny files in the real CIFAR-10 python pickle format."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(per_batch)]}  # fmt: skip
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)


def test_fake_cifar_folder_in_the_real_format_loads_and_trains(capsys, tmp_path):
    from ldfa_cli.config import validate
    from ldfa_cli.data import load_data

    _write_fake_cifar10(tmp_path / "cifar")
    config = validate(
        {
            "data": {
                "dataset": "cifar10",
                "root": str(tmp_path / "cifar"),
                "download": False,
                "grayscale": True,
                "classes": 4,
            }
        }
    )
    data = load_data(config.data)
    assert data.train.images.dtype == torch.uint8 and data.channels == 1 and data.size == 32
    assert data.classes == 4 and int(data.train.labels.max()) < 4
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"],
                          data={"dataset": "cifar10", "root": str(tmp_path / "cifar"),
                                "download": False, "subset": None})  # fmt: skip
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "train", recipe, "--out", tmp_path / "run2")
    assert code == 2 and "could not be read" in err


def test_tensorboard_option_writes_event_files(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], output={"tensorboard": True})
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")[0] == 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_and_compile_recipe_options_train(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"],
                          train={"precision": "bf16", "compile": True})  # fmt: skip
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu", "--json")
    assert code == 0, err
    final = json.loads(out)["final"]
    assert 0.0 <= final["acc"] <= 1.0 and final["loss"] == final["loss"]  # finite, not NaN


@pytest.mark.parametrize("setting, mode", [(False, None), (True, "default"),
                                           ("reduce-overhead", "reduce-overhead")])  # fmt: skip
def test_train_compile_takes_a_mode(capsys, tmp_path, monkeypatch, setting, mode):
    # CUDA graphs ("reduce-overhead") need a GPU to run: here only the wiring is checked
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], train={"compile": setting})
    code, _, err = run_cli(capsys, "train", recipe, "train.epochs=1", "--out", tmp_path / "run",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert modes == ([] if mode is None else [mode])


def test_train_compile_refuses_an_unknown_mode(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], train={"compile": "fast"})
    code, out, _ = run_cli(capsys, "validate", recipe)
    assert code == 2 and "train.compile" in out and "reduce-overhead" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("where, call, stopped_at", [
    ("backward_with_rules", 3, (0, 3, 3)),  # mid-epoch: the step finishes, then the stop
    ("evaluate", 1, (1, 0, 4)),  # at the epoch's end: the evaluation and the epoch count
])  # fmt: skip
def test_ctrl_c_stops_at_a_step_boundary_and_resume_equals_an_unbroken_run(
    capsys, tmp_path, monkeypatch, where, call, stopped_at
):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"],
                          train={"epochs": 2, "deterministic": True, "log_every": 1})  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(capsys, "train", recipe, "--out", whole, "--device", "cpu")[0] == 0
    restore = press_ctrl_c_during(monkeypatch, where, call)
    code, _, err = run_cli(capsys, "train", recipe, "--out", broken, "--device", "cpu")
    assert code == 130 and f"ldfa train --resume {broken}" in " ".join(err.split())
    progress = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["batch_in_epoch"], progress["step"]) == stopped_at
    restore()
    assert run_cli(capsys, "train", "--resume", broken, "--device", "cpu")[0] == 0

    def events(run):
        return [(e["event"], e["step"], e["loss"]) for e in read_metrics(run / "metrics.jsonl")]

    assert events(broken) == events(whole)  # no event lost or repeated, the same losses


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], train={"epochs": 2})
    run = tmp_path / "run"
    press_ctrl_c_during(monkeypatch, "backward_with_rules", 6, presses=2)  # epoch 2's 2nd step
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")
    assert code == 130 and "stopped at once" in err
    progress = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert (progress["epoch"], progress["batch_in_epoch"], progress["step"]) == (1, 0, 4)
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


def test_a_run_ends_with_a_line_saying_where_it_is_and_eval_names_best_pts_epoch(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", *FAMILIES["mlp"], train={"epochs": 2})
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--stop-after", "1",
                           "--device", "cpu")  # fmt: skip
    flat = " ".join(err.split())
    assert code == 0 and "stopped after epoch 1 of 2 (--stop-after)" in flat
    assert f"continue with: ldfa train --resume {run}" in flat
    code, _, err = run_cli(capsys, "train", "--resume", run, "--device", "cpu")
    flat = " ".join(err.split())
    assert code == 0 and "done: 2 epochs, 8 steps in" in flat and f"run folder {run}" in flat
    code, out, _ = run_cli(capsys, "eval", run, "--checkpoint", "best", "--json", "--device", "cpu")
    best = json.loads(out)
    assert best["epoch"] in (1, 2) and best["epoch"] == best["step"] / 4  # the evaluation's epoch
