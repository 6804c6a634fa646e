"""data.val_fraction: a seeded share of the training images held out; best.pt chosen on it,
the test set evaluated for the record; 0 trains on everything, as the published setups."""

import json

import torch

from ldfa_cli.config import validate
from ldfa_cli.data import load_data, steps_per_epoch
from ldfa_cli.data.device import hold_out
from ldfa_cli.data.sources import Split
from ldfa_cli.engine.metrics import read_metrics
from tests.helpers import run_cli
from tests.test_imagefolder import make_tree
from tests.test_train import write_recipe


def test_a_seeded_tenth_is_held_out_and_the_rest_trains():
    images = torch.arange(50).view(50, 1, 1, 1)  # each image says which it is
    train, val = hold_out(Split(images, torch.arange(50)), 0.1, seed=0)
    assert len(val.labels) == 5 and len(train.labels) == 45
    assert not set(val.labels.tolist()) & set(train.labels.tolist())
    again, _ = hold_out(Split(images, torch.arange(50)), 0.1, seed=0)
    other, _ = hold_out(Split(images, torch.arange(50)), 0.1, seed=1)
    assert torch.equal(again.labels, train.labels) and not torch.equal(other.labels, train.labels)
    assert hold_out(Split(images, torch.arange(50)), 0.0, seed=0)[1] is None

    config = validate({"data": {"dataset": "digits"}}).data
    data = load_data(config)
    assert data.has_val and len(data.train.labels) + len(data.val.labels) == 1438
    assert data.steps_per_epoch(32) == steps_per_epoch(config, 32) == -(-1294 // 32)
    whole = load_data(config.model_copy(update={"val_fraction": 0.0}))
    assert not whole.has_val and len(whole.train.labels) == 1438


def test_best_pt_is_chosen_on_validation_accuracy_and_the_test_set_logged(capsys, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "mlp", "widths": [16]},
                          {"rule": "ldfa", "rank": 2}, train={"epochs": 4},
                          data={"subset": 400})  # fmt: skip
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")
    assert code == 0 and "val acc" in err, err
    evals = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]
    assert all({"val_acc", "val_loss", "acc", "loss"} <= set(e) for e in evals)
    best = max(evals, key=lambda e: e["val_acc"])  # (the first of equals)
    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["progress"]
    assert saved["step"] == best["step"] and saved["best_acc"] == best["val_acc"]
    code, out, err = run_cli(capsys, "eval", run, "--split", "val", "--json", "--device", "cpu")
    assert code == 0, err
    assert abs(json.loads(out)["acc"] - evals[-1]["val_acc"]) < 1e-9


def test_an_image_folder_holds_images_of_train_out_too(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=10)
    config = validate({"data": {"dataset": "imagefolder", "root": str(root), "image_size": 16,
                                "workers": 0, "val_fraction": 0.2}}).data  # fmt: skip
    data = load_data(config)
    assert data.has_val and len(data.holdout_set) == 6 and len(data.train_set) == 24
    held = set(data.holdout_set.indices)
    assert not held & set(data.train_set.indices)
    assert sum(len(y) for _, y in data.eval_batches(4, split="val")) == 6
    assert data.steps_per_epoch(8) == steps_per_epoch(config, 8) == 3
