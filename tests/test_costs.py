"""Every cost of a step counted: elementwise work, the QR/SVD of an SVD reset, optimizer
steps; and the run's train_flops is the whole of `ldfa flops`' count."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.config import validate
from ldfa_cli.feedback import convert
from ldfa_cli.measure import costs
from ldfa_cli.measure.flops import PhaseFlopCounter
from tests.helpers import run_cli


def _charged(counter) -> float:
    return sum(counter.counts.values())


def test_elementwise_ops_are_charged_per_element():
    x = torch.randn(3, 4)
    with torch.no_grad(), PhaseFlopCounter() as counter:
        torch.relu(x) + x  # two primitive ops, 12 elements each
    assert counter.counts[("(elementwise)", "forward")] == 24
    h = torch.randn(2, 5, 8)
    with torch.no_grad(), PhaseFlopCounter() as counter:
        F.layer_norm(h, (8,))
    per_element = _charged(counter) / h.numel()
    assert 5 <= per_element <= 12  # however a version runs it: mean, var, scale, shift


def test_qr_and_svd_are_counted_by_golub_van_loan():
    a = torch.randn(10, 4, dtype=torch.float64)
    with PhaseFlopCounter() as counter:
        torch.linalg.qr(a)
    assert _charged(counter) == pytest.approx(4 * 10 * 16 - 4 * 64 / 3)
    with PhaseFlopCounter() as counter:
        torch.linalg.svd(a, full_matrices=False)
    assert _charged(counter) == pytest.approx(6 * 10 * 16 + 20 * 64)


@pytest.mark.parametrize(
    ("name", "options", "per_element"),
    [("adam", {"amsgrad": True, "weight_decay": 1e-3}, 13 + 1 + 2),
     ("adamw", {"weight_decay": 0.1}, 13 + 1), ("adam", {}, 13),
     ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}, 2 + 2 + 2), ("sgd", {}, 2),
     ("rmsprop", {"weight_decay": 1e-3}, 9 + 2)],
)  # fmt: skip
def test_optimizer_step_per_element_and_near_what_torch_runs(name, options, per_element):
    config = validate({"optim": {"name": name, "lr": 1e-3, **options}}).optim
    assert costs.optimizer_flops(config, 1000) == 1000 * per_element
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "rmsprop": torch.optim.RMSprop}[name]  # fmt: skip
    p = nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    optimizer = cls([p], lr=1e-3, foreach=False, **options)
    optimizer.step()  # the first step creates the state
    with PhaseFlopCounter() as counter:
        optimizer.step()
    # torch's single-tensor step, charged op by op (an add with alpha is one op there)
    assert 0.5 * per_element <= _charged(counter) / 1000 <= 2 * per_element


def test_svd_reset_is_counted_and_amortised_over_its_interval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                          nn.Linear(16, 4))  # fmt: skip
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    convert(model, "ldfa", rank=3, reset_svd_every=5, example_input=x)
    report = flops_report(model, x, y)
    svds = (costs.svd_flops(20, 16) + costs.svd_flops(16, 4)) / 5  # W^T of each layer
    assert svds <= report.rule.reset <= 1.2 * svds
    assert report.reference.reset == 0
    plain = flops_report(convert(nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 4)),
                                 "ldfa", rank=3, example_input=x), x, y)  # fmt: skip
    assert plain.rule.reset == 0


def test_flops_report_rows_and_what_is_omitted(capsys):
    code, out, err = run_cli(capsys, "flops", "fmnist_vit_r8", "--batch-size", "4", "--json",
                             "feedback.options.reset_svd_every_epochs=0.5")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    rows = {r["row"]: r for r in data["extra"]}
    assert rows["(feedback reset)"]["rule"] > 0 and rows["(feedback reset)"]["bp"] == 0
    assert rows["(optimizer: feedback)"]["rule"] > 0 and rows["(optimizer: feedback)"]["bp"] == 0
    assert rows["(optimizer: forward)"]["rule"] == rows["(optimizer: forward)"]["bp"] > 0
    assert rows["(elementwise fwd)"]["rule"] > 0 and rows["(elementwise bwd)"]["bp"] > 0
    total = data["products"]["rule"] + sum(r["rule"] for r in data["extra"])
    assert data["total"]["rule"] == pytest.approx(total)
    assert "not counted: data movement" in " ".join(err.split()) and data["uncounted_ops"]


def test_train_flops_per_step_is_the_whole_count_of_ldfa_flops(capsys, tmp_path):
    from ldfa_cli.engine.metrics import read_metrics
    from tests.test_flops import _tiny_recipe

    recipe = _tiny_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")[0] == 0
    step = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train")
    code, out, err = run_cli(capsys, "flops", recipe, "--batch-size", "32", "--json")
    assert code == 0, err
    counted = json.loads(out)["total"]["rule"]
    assert step["train_flops"] / step["step"] == pytest.approx(counted)
    optimizer = sum(r["rule"] for r in json.loads(out)["extra"] if "optimizer" in r["row"])
    assert optimizer > 0  # both optimizer steps are in train_flops
