"""Receptive fields: measures order hand-made filters, a single conv's field is its kernel,
the command runs on a tiny trained run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ldfa_cli.analysis.rf import (
    crop_to_support,
    difference_of_gaussians,
    gabor,
    measures,
    receptive_fields,
)
from ldfa_cli.feedback import convert
from tests.helpers import run_cli

SUMMARISE = Path(__file__).resolve().parents[1] / "scripts" / "summarise-runs"


def test_measures_order_a_difference_of_gaussians_and_a_gabor():
    dog, gab = measures(difference_of_gaussians()), measures(gabor())
    assert dog["rotational_symmetry"] > 0.95 > 0.5 > gab["rotational_symmetry"]
    assert gab["orientation_selectivity"] > 0.8 > 0.1 > dog["orientation_selectivity"]
    assert dog["centre_surround_index"] > 0.9 > 0.5 > gab["centre_surround_index"]
    noise = measures(np.random.default_rng(0).standard_normal((15, 15)))
    assert noise["rotational_symmetry"] < 0.2 and noise["orientation_selectivity"] < 0.2


def test_the_field_of_a_single_conv_is_its_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 5, padding=2))
    fields = receptive_fields(model, "0", (2, 11, 11))
    for c in range(3):  # input channels are averaged; torch's conv is a correlation: no flip
        kernel = model[0].weight[c].mean(0).detach().numpy()
        np.testing.assert_allclose(crop_to_support(fields[c]), kernel, atol=1e-6)


@pytest.mark.parametrize(("rule", "options"), [("ldfa_local", {"rank": 1}),
                                               ("dldfa", {"rank": 1, "source": "4"})])  # fmt: skip
def test_fields_are_the_forward_maps_whatever_rule_trained_it(rule, options):
    """The field is a property of the forward map: a low-rank rule's backward (its feedback
    pathway) must not stand in for it, and a broadcast rule's must not be needed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))  # fmt: skip
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.bias.fill_(0.1)  # every ReLU open at a blank input
    plain = receptive_fields(model, "2", (1, 9, 9))
    convert(model, rule, include=["2", "4"], example_input=torch.randn(2, 1, 9, 9), **options)
    np.testing.assert_allclose(receptive_fields(model, "2", (1, 9, 9)), plain, atol=1e-6)
    assert receptive_fields(model, "2", (1, 9, 9), method="maximize", steps=3).shape == (4, 9, 9)
    assert all(p.grad is None for p in model.parameters())


def test_rf_command_on_a_tiny_trained_retina(capsys, tmp_path, drawn):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "tiny retina",
        "model": {"name": "retina", "retina_channels": 4, "bottleneck": 2, "vvs_channels": 4,
                  "vvs_layers": 1, "kernel_size": 3, "fc_width": 16},
        "feedback": {"rule": "ldfa", "rank": 1, "include": ["retina*"]},
        "data": {"dataset": "digits", "subset": 64},
        "train": {"epochs": 1, "batch_size": 32},
    }))  # fmt: skip
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")[0] == 0
    code, out, err = run_cli(capsys, "rf", run, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["layer"] == "retina2" and len(data["channels"]) == 2
    assert (run / "rf" / "fields.png").stat().st_size > 500 and (run / "rf" / "rf.json").is_file()
    for args, words in ((["--layer", "fc"], ["not a Conv2d layer", "retina1, retina2"]),
                        (["--layer", "nope"], ["not a layer"]),
                        (["--checkpoint", "nope"], ["last or best"])):  # fmt: skip
        code, _, err = run_cli(capsys, "rf", run, *args, "--out", tmp_path / "x")
        assert code == 2 and all(w in err for w in words), err
    for name, overrides in (("run1", ["train.seed=1"]), ("bp", ["feedback.rule=bp"])):
        assert run_cli(capsys, "train", recipe, *overrides, "--out", tmp_path / name,
                       "--device", "cpu")[0] == 0  # fmt: skip
    code, _, err = run_cli(capsys, "rf", run, tmp_path / "run1", tmp_path / "bp", "--method",
                           "maximize", "--out", tmp_path / "cmp.pdf")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "cmp.pdf").read_bytes().startswith(b"%PDF")
    fig = drawn["cmp.pdf"]
    runs, summary = fig.subfigs
    titles = [sub._suptitle.get_text() for sub in runs.subfigs if sub._suptitle]
    # the fields of one run per condition (its first seed); the summary over every run
    assert [t.split("\n")[:2] for t in titles] == [
        ["r (rule=ldfa)", "ldfa r=1, bottleneck 2, seed 0"],
        ["r (rule=bp)", "bp, bottleneck 2, seed 0"]]  # fmt: skip
    assert all("sym " in t and "csi " in t for t in titles)
    tiles = [ax for sub in runs.subfigs for ax in sub.axes if ax.get_images()]
    assert [ax.get_title() for ax in tiles] == ["0", "1", "0", "1"]  # channel numbers
    (bar,) = [ax for sub in runs.subfigs for ax in sub.axes if ax.get_ylabel()]
    assert bar.get_ylabel() == "field / max |field|" and bar.get_ylim() == (-1.0, 1.0)
    assert fig.get_suptitle() == ("receptive fields of layer retina2: the input that maximises "
                                  "each channel's centre unit")  # fmt: skip
    assert "centre-surround index, -1 to 1" in fig.get_supxlabel()
    measures = [ax.get_title() for ax in summary.axes]
    assert measures == ["rotational symmetry", "orientation selectivity", "centre-surround index"]
    assert "(1/2 per condition)" in summary._suptitle.get_text()

    # an archived record (no checkpoints) draws again from the fields its rf.json recorded
    archive = tmp_path / "archive"
    done = subprocess.run([sys.executable, SUMMARISE, run, tmp_path / "bp", "--archive", archive],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.returncode == 0
    records = [archive / run.parent.name / name for name in ("run", "bp")]
    assert not (records[0] / "checkpoints").exists() and (records[0] / "rf" / "rf.json").is_file()
    code, _, err = run_cli(capsys, "rf", *records, "--method", "maximize", "--out",
                           tmp_path / "again.png")  # fmt: skip
    assert code == 0, err
    again = [sub._suptitle.get_text() for sub in drawn["again.png"].subfigs[0].subfigs
             if sub._suptitle]  # fmt: skip
    assert again == titles[:1] + [titles[1]]  # the same runs, measures and titles
    code, _, err = run_cli(capsys, "rf", records[0], "--method", "gradient")
    assert code == 2 and "no fields of this layer by --method gradient" in err
    code, _, err = run_cli(capsys, "rf", records[0], "--method", "maximize", "--checkpoint", "best")
    assert code == 2 and "from its best checkpoint" in err  # recorded from last.pt
    # a checkpoint file draws too, as PDF by --format with the default name
    code, _, err = run_cli(capsys, "rf", run / "checkpoints" / "last.pt", "--out", tmp_path / "f",
                           "--format", "pdf")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "f" / "fields.pdf").read_bytes().startswith(b"%PDF")
    assert [t.get_text() for t in summary.axes[0].get_xticklabels()] == ["r (rule=ldfa)",
                                                                        "r (rule=bp)"]  # fmt: skip
