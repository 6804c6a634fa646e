"""``train.compile_scope: step``: the forward, the backward through the rules' Functions and
their after-backward work (eq. 9) compile as one graph, with no break, and train exactly as
the eager step does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldfa_cli.engine.step import TrainStep, _tracing_autograd
from ldfa_cli.feedback import LDFALinear

RULES = ["ldfa", "ldfa_local", "lowrank_fa", "fa", "kp", "bp"]


def _model(rule: str) -> nn.Module:
    options = {"rank": 2} if rule.startswith(("ldfa", "lowrank")) else {}
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), LDFALinear(12, 8, rule=rule, **options), nn.GELU(),
                         LDFALinear(8, 8, rule=rule, **options), nn.ReLU(),
                         LDFALinear(8, 3, rule=rule, **options))  # fmt: skip


def _optimizers(model: nn.Module):
    from types import SimpleNamespace

    from ldfa_cli.engine.optim import Optimizers, make_schedule

    config = SimpleNamespace(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.0,
                             grad_clip=None, grad_clip_value=None)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    schedule_config = SimpleNamespace(warmup_epochs=0, name="constant")
    return Optimizers(optimizer, make_schedule(schedule_config, optimizer, 1, 1), config)


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(6, 3, 4, generator=generator), torch.randint(0, 3, (6,), generator=generator)


@pytest.mark.parametrize(("rule", "precision"), [("ldfa", "fp32"), ("ldfa_local", "fp32"),
                                                ("lowrank_fa", "fp32"), ("kp", "fp32"),
                                                ("ldfa", "bf16")])  # fmt: skip
def test_the_step_s_forward_and_backward_compile_with_no_graph_break(rule, precision):
    model = _model(rule)
    step = TrainStep(model, _optimizers(model), precision=precision)
    x, y = _batch(0)
    step(x, y, 0)  # eager first: the optimizers' state exists, as in training
    with _tracing_autograd():
        explanation = torch._dynamo.explain(step.compute)(x, y, 1)
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("rule", RULES)
def test_the_compiled_step_trains_as_the_eager_one(rule):
    eager_model = _model(rule)
    compiled_model = copy.deepcopy(eager_model)
    eager = TrainStep(eager_model, _optimizers(eager_model))
    compiled = TrainStep(compiled_model, _optimizers(compiled_model), compiled_step="default")
    for index in range(4):
        x, y = _batch(index)
        a, b = eager(x, y, index), compiled(x, y, index)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    pairs = zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True)
    for (name, p), q in pairs:
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    if rule in ("ldfa", "ldfa_local", "kp"):  # the feedback learned in the compiled step
        initial = dict(_model(rule).named_parameters())
        learned = [
            not torch.equal(initial[name], p)
            for name, p in compiled_model.named_parameters()
            if "feedback" in name
        ]
        assert any(learned)


def test_a_compiled_model_s_oja_update_is_kept_in_its_backward_and_trains_as_eager():
    """``compile_scope: model``: the layers' backward is compiled, where no statistic can
    be kept for after the backward (:mod:`~ldfa_cli.feedback.deferred`); the eager step,
    which keeps them, and the compiled model learn the same P."""
    eager_model = _model("ldfa_local")
    compiled_model = copy.deepcopy(eager_model)
    eager = TrainStep(eager_model, _optimizers(eager_model))
    compiled = TrainStep(compiled_model, _optimizers(compiled_model),
                         net=torch.compile(compiled_model))  # fmt: skip
    for index in range(3):
        x, y = _batch(index)
        a, b = eager(x, y, index), compiled(x, y, index)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    initial = _model("ldfa_local")
    for (name, p), q, p0 in zip(eager_model.named_parameters(), compiled_model.parameters(),
                                initial.parameters(), strict=True):  # fmt: skip
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
        if name in ("3.feedback_P", "5.feedback_P"):  # (the first layer sends no error)
            assert not torch.equal(q, p0), name


def test_eq_9_every_other_step_compiles_at_most_once_per_outcome():
    model = nn.Sequential(LDFALinear(12, 8, rule="ldfa", rank=2, interval=2), nn.ReLU(),
                          LDFALinear(8, 3, rule="ldfa", rank=2, interval=2))  # fmt: skip
    step = TrainStep(model, _optimizers(model), compiled_step="default")
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    for index in range(6):
        x, y = _batch(index)
        step(x.flatten(1), y, index)
    assert counts["stats"]["unique_graphs"] <= 3  # due, not due, and one dynamic index


def test_compile_scope_is_checked_and_defaults_to_the_model():
    from pydantic import ValidationError

    from ldfa_cli.config.schema import TrainConfig

    assert TrainConfig().compile_scope == "model"
    assert TrainConfig(compile=True, compile_scope="step").compile_scope == "step"
    with pytest.raises(ValidationError):
        TrainConfig(compile_scope="everything")


def test_ldfa_train_with_the_whole_step_compiled_ends_where_the_eager_run_does(capsys, tmp_path):
    from ldfa_cli.engine.metrics import read_metrics
    from tests.helpers import run_cli
    from tests.test_train import write_recipe

    losses = {}
    for scope, compile_ in (("model", False), ("step", True)):
        recipe = write_recipe(tmp_path / f"{scope}.yaml", {"name": "mlp", "widths": [16, 16]},
                              {"rule": "ldfa", "rank": 4},
                              train={"compile": compile_, "compile_scope": scope})  # fmt: skip
        run = tmp_path / scope
        code, _, err = run_cli(capsys, "train", recipe, "--out", run, "--device", "cpu")
        assert code == 0, err
        losses[scope] = [e["loss"] for e in read_metrics(run / "metrics.jsonl")]
    assert losses["step"] == pytest.approx(losses["model"], rel=1e-4)
