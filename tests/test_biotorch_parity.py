"""Parity with BioTorch: the sign-concordant rules (uSF, brSF, frSF) follow W's sign after
every step and send B's product upstream; alignment logged while training; LeNet and the
CIFAR ResNets; a multistep schedule; resized images."""

import json
import math

import pytest
import torch
import yaml
from torch import nn

from ldfa_cli.config import validate
from ldfa_cli.feedback import LDFAConv2d, LDFALinear, alignment_diagnostics, convert
from tests.helpers import run_cli


@pytest.mark.parametrize("rule", ["usf", "brsf", "frsf"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sign_concordant_feedback_follows_w_and_is_what_goes_upstream(rule, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = LDFALinear(12, 7, rule=rule)
        x = torch.randn(5, 12)
    else:
        layer = LDFAConv2d(3, 6, 3, padding=1, rule=rule)
        x = torch.randn(2, 3, 6, 6)
    scale = float(layer.weight.detach().square().mean().sqrt())
    optimizer = torch.optim.SGD([layer.weight, layer.bias], lr=0.5)
    magnitudes = []
    for _ in range(4):  # W's signs change under these large steps
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        g = torch.randn_like(out)
        out.backward(g)
        B = layer.rule.feedback_matrix(layer)  # what this step's backward used
        nonzero = layer.weight.detach() != 0
        assert torch.equal(torch.sign(B)[nonzero], torch.sign(layer.weight.detach())[nonzero])
        if kind == "linear":
            torch.testing.assert_close(xi.grad, g @ B)
        else:
            expected = torch.nn.grad.conv2d_input(x.shape, B, g, padding=1)
            torch.testing.assert_close(xi.grad, expected)
        torch.testing.assert_close(layer.weight.grad, _standard_weight_grad(layer, x, g, kind))
        magnitudes.append(B.abs().clone())
        optimizer.step()
        optimizer.zero_grad()
    if rule == "usf":  # one magnitude, the RMS of W at conversion
        assert all(torch.allclose(m[m > 0], torch.tensor(scale)) for m in magnitudes)
    elif rule == "frsf":  # fixed random magnitudes
        assert all(torch.equal(m, magnitudes[0]) for m in magnitudes)
        assert magnitudes[0].std() > 0 and magnitudes[0].max() <= math.sqrt(3) * scale
    else:  # brsf: redrawn every step, RMS of the draw = scale
        assert not torch.equal(magnitudes[0], magnitudes[1])
        rms = torch.stack(magnitudes).square().mean().sqrt()
        assert abs(float(rms) / scale - 1) < 0.2


def _standard_weight_grad(layer, x, g, kind):
    if kind == "linear":
        return g.t() @ x
    return torch.nn.grad.conv2d_weight(x, layer.weight.shape, g, padding=1)


def test_usf_is_aligned_with_w_and_fa_is_not():
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))  # fmt: skip
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    rows = {r: alignment_diagnostics(convert(copy.deepcopy(base), r, example_input=x), x, y)
            for r in ("usf", "fa")}  # fmt: skip
    for row in rows["usf"]:  # sign(W) . W / (|sign W| |W|) = mean|w| / rms(w): ~30 degrees
        assert row["angle_deg"] < 45 and abs(row["norm_ratio"] - 1) < 1e-6
        assert row["grad_cosine"] > 0.7
    assert all(row["angle_deg"] > 80 for row in rows["fa"])  # random B: about orthogonal


def test_log_alignment_every_writes_angles_and_norm_ratios_per_layer(capsys, tmp_path, drawn):
    code, _, err = run_cli(capsys, "train", "quickstart", "train.epochs=1", "feedback.rule=usf",
                           "~feedback.rank", "train.log_alignment_every=5", "--out",
                           tmp_path / "run", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    from ldfa_cli.engine.metrics import read_metrics

    events = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if e["event"] == "alignment"]  # fmt: skip
    steps = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["step"]  # one epoch's
    assert steps > 35 and [e["step"] for e in events] == list(range(5, steps + 1, 5))
    layers = events[0]["layers"]
    assert set(layers) == {"fc2", "head"}
    for values in layers.values():
        assert 0 <= values["angle_deg"] < 90 and values["norm_ratio"] > 0
        assert -1 <= values["grad_cosine"] <= 1
    code, _, err = run_cli(capsys, "plot", "--alignment", tmp_path / "run", "--out",
                           tmp_path / "a.png")  # fmt: skip
    assert code == 0 and (tmp_path / "a.png").stat().st_size > 1000
    fig = drawn["a.png"]
    assert fig.get_suptitle().startswith("alignment of the feedback B with W^T over training")
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "angle(B, W^T) (degrees)", "||B|| / ||W^T||", "cos(input grad, backprop's)"]  # fmt: skip
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fc2", "head"]
    # several runs: a colour per run, its layers' mean labelled
    code, _, err = run_cli(capsys, "plot", "--alignment", tmp_path / "run", tmp_path / "run",
                           "--out", tmp_path / "b.png")  # fmt: skip
    assert code == 0 and (tmp_path / "b.png").stat().st_size > 1000


def test_alignment_logging_leaves_training_unchanged(capsys, tmp_path):
    """Same losses with and without it: it reads the model in eval mode and leaves the
    gradients, BatchNorm statistics and the RNG alone."""
    from ldfa_cli.engine.metrics import read_metrics

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "t", "model": {"name": "lenet", "variant": "cifar"},
        "feedback": {"rule": "ldfa_local", "rank": 4},
        "data": {"dataset": "digits", "subset": 96, "resize": 32},
        "train": {"epochs": 1, "batch_size": 32, "log_every": 1, "deterministic": True},
    }))  # fmt: skip
    losses = []
    for every in (None, 1):
        extra = [f"train.log_alignment_every={every}"] if every else []
        out = tmp_path / f"run{every}"
        assert run_cli(capsys, "train", recipe, *extra, "--out", out, "--device", "cpu")[0] == 0
        losses.append([e["loss"] for e in read_metrics(out / "metrics.jsonl")
                       if e["event"] == "train"])  # fmt: skip
    assert losses[0] == losses[1]


def test_lenet_and_cifar_resnets():
    from ldfa_cli.models import InputShape, build_model

    lenet = build_model(validate({"model": {"name": "lenet"}}).model, InputShape(1, 32, 10))
    assert sum(p.numel() for p in lenet.parameters()) == 61_706  # LeNet-5 at 32x32
    for depth, params in ((20, 269_722), (56, 853_018)):  # He et al.: 0.27M and 0.85M
        model = build_model(validate({"model": {"name": "resnet_cifar", "depth": depth}}).model,
                            InputShape(3, 32, 10))  # fmt: skip
        assert sum(p.numel() for p in model.parameters()) == params
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    xavier = build_model(validate({"model": {"name": "lenet", "init": "xavier"}}).model,
                         InputShape(1, 32, 10))  # fmt: skip
    bound = math.sqrt(6 / (84 + 10))
    assert xavier.head.weight.abs().max() <= bound and not xavier.head.bias.any()
    with pytest.raises(Exception, match="6n \\+ 2"):
        validate({"model": {"name": "resnet_cifar", "depth": 21}})


def test_multistep_schedule_and_resize():
    from ldfa_cli.data import load_data
    from ldfa_cli.engine.optim import lr_factor

    config = validate({"schedule": {"name": "multistep", "milestones": [50, 75],
                                    "gamma": 0.1}}).schedule  # fmt: skip
    factors = [lr_factor(config, 0.1, e, 100) for e in (0, 49.99, 50, 74.99, 75, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(Exception, match="milestones"):
        validate({"schedule": {"name": "multistep"}})
    data = load_data(validate({"data": {"dataset": "digits", "resize": 32}}).data)
    assert data.train.images.shape[-2:] == (32, 32) and data.train.images.dtype == torch.uint8


def test_biotorch_recipes_carry_its_published_errors():
    from ldfa_cli.config import load_recipe

    expected = {"bp": 0.092, "fa": 0.1306, "dfa": 0.1281, "usf": 0.0969, "brsf": 0.1002,
                "frsf": 0.0961}  # fmt: skip
    for rule, error in expected.items():
        recipe, _ = load_recipe(f"fmnist_lenet_{rule}")
        assert recipe.reference.top1_error == error and "BioTorch" in recipe.reference.source
        o, s = recipe.optim, recipe.schedule
        assert (o.name, o.momentum, o.weight_decay) == ("sgd", 0.9, 1e-3)
        assert recipe.train.batch_size == 64
        assert (s.name, s.milestones, recipe.train.epochs, recipe.data.resize) == (
            "multistep", [50, 75], 100, 32)  # fmt: skip
    assert json.dumps(load_recipe("cifar10_resnet20_usf")[0].reference.top1_error) == "0.1005"
