"""ldfa bench --memory: the live-bytes tracker against tensors of known size, and a step's
split against what the layers' shapes and Adam's two moments say."""

import itertools
import json

import pytest
import torch

from ldfa_cli.analysis.memory import LiveBytes, measure_step
from ldfa_cli.config import validate
from ldfa_cli.engine.build import synthetic_network
from tests.helpers import run_cli

WIDTHS = [32, 16]
BATCH = 8


def _recipe(rule: str, rank: int = 4, **options):
    feedback = {"rule": rule} if rule == "bp" else {"rule": rule, "rank": rank, "options": options}
    return validate({"model": {"name": "mlp", "widths": WIDTHS}, "feedback": feedback,
                     "data": {"dataset": "digits"}, "optim": {"name": "adam", "lr": 1e-3},
                     "train": {"batch_size": BATCH, "epochs": 1}})  # fmt: skip


def test_live_bytes_follows_each_storage_until_it_is_freed():
    with LiveBytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more
        view = b[:10]  # a view: no new storage
        del a
        after_del = live.live
        c = b + 1
        del b, c
    assert after_del == 4000 and live.peak == 8000
    assert live.live == 4000  # the view keeps b's storage alive
    del view
    assert live.live == 0


def test_live_bytes_leaves_existing_storages_out_and_replays_subsets():
    w = torch.zeros(100)
    with LiveBytes(existing=[w]) as live:
        w.add_(1)  # in place on a storage that existed before
        a = torch.ones(100)
        b = torch.ones(300)
        serial_b = live.serial_of(b)
        del a
    assert live.live == 1200
    assert live.peak_of(0, len(live.log), set()) == 1600
    assert live.peak_of(0, len(live.log), {serial_b}) == 400


@pytest.mark.parametrize("rule", ["bp", "ldfa", "ldfa_local", "lowrank_fa"])
def test_step_memory_matches_the_shapes(rule):
    recipe = _recipe(rule)
    model, x, y = synthetic_network(recipe, BATCH, torch.device("cpu"))
    model.train()
    memory = measure_step(recipe, model, x, y)
    sizes = [x[0].numel(), *WIDTHS, 10]
    layers = list(itertools.pairwise(sizes))
    forward = 4 * sum(n * m + m for n, m in layers)
    converted = layers[1:]  # the first layer reads the batch: no input gradient, not converted
    factors = 0 if rule == "bp" else 4 * sum(4 * (n + m) for n, m in converted)
    oja_p = 4 * sum(4 * m for _, m in converted)  # the local rule learns P (r x m), Q is fixed
    learned = {"bp": 0, "ldfa": factors, "ldfa_local": oja_p, "lowrank_fa": 0}[rule]
    assert memory.parameters == forward
    assert memory.feedback_tensors == factors
    assert memory.gradients == forward + learned
    assert memory.optimizer_state == 2 * (forward + learned)  # Adam: two moments
    hidden_inputs = 4 * BATCH * sum(WIDTHS)  # each hidden layer's input, saved for dW
    assert memory.saved_for_backward >= hidden_inputs
    # the backward holds at least one input gradient (BATCH x width) beyond the weight grads
    assert memory.backward_transient >= 4 * BATCH * min(WIDTHS)
    static = memory.parameters + memory.feedback_tensors + memory.optimizer_state
    assert memory.peak >= static + memory.saved_for_backward
    assert memory.expected["optimizer_state"] == memory.optimizer_state


def test_the_measured_step_runs_an_update_that_is_due_every_k_steps():
    # eq. 9 every 3 steps: after 2 warm-up steps the next is not due, but its buffers and
    # the factors' gradients belong to the period's peak
    recipe = _recipe("ldfa", interval=3)
    model, x, y = synthetic_network(recipe, BATCH, torch.device("cpu"))
    model.train()
    memory = measure_step(recipe, model, x, y, warmup=2)
    assert memory.gradients == memory.parameters + memory.feedback_tensors


def test_bench_memory_command(capsys):
    code, out, err = run_cli(capsys, "bench", "quickstart", "--memory", "--ranks", "4",
                             "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [r["variant"] for r in rows] == ["bp", "ldfa_local r=4"]
    assert rows[1]["feedback_tensors"] > 0 == rows[0]["feedback_tensors"]
    assert "memory of one training step" in err and "saved" in err
