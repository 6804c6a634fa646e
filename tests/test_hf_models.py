"""Hugging Face causal language models built from a config (model: {name: hf}): tiny Llama
and GPT-2 configurations train a step under every shipped rule, GPT-2's Conv1D becomes the
nn.Linear it is, and a run trains, resumes and samples from the command line."""

from __future__ import annotations

import builtins

import pytest
import torch
import yaml

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.config import validate
from ldfa_cli.data import dataset_shape
from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.feedback import RULES, conversion_report, convert
from ldfa_cli.models import build_model
from tests.helpers import eval_losses, run_cli, train_one_epoch_then_resume
from tests.test_language_model import data_config

pytest.importorskip("transformers")

LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 32}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 32}
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}
SHIPPED = sorted(n for n, c in RULES.items() if c.__module__.startswith("ldfa_cli."))


def hf_recipe(tmp_path, config, feedback=None) -> dict:
    return {"model": {"name": "hf", "config": config}, "data": data_config(tmp_path),
            "feedback": feedback or {"rule": "ldfa", "rank": 4}}  # fmt: skip


@pytest.mark.parametrize("rule", SHIPPED)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_rule_trains_a_step_of_tiny_llama_and_gpt2(tmp_path, family, rule):
    config = validate(hf_recipe(tmp_path, CONFIGS[family], {"rule": rule, "rank": 4}))
    model, x, y = synthetic_network(config, 4, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = flops_report(model, x, y)  # one training step, counted, against backprop's
    assert not report.warnings and report.rule.total > 0
    rows = conversion_report(model).rows
    converted = [r for r in rows if r.note == "converted"]
    assert converted or rule == "bp"
    assert all(r.rule == rule for r in converted)
    if family == "gpt2":  # every Conv1D is a Linear now, converted or kept
        assert not [r for r in rows if r.kind == "Conv1D"]
        assert all(r.kind == "Linear (was Conv1D)" for r in converted if ".h." in r.name)
    logits = model(x)
    assert logits.shape == (*x.shape, dataset_shape(config.data).classes)
    assert torch.isfinite(logits).all()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # a copy ran


def test_gpt2_conv1d_becomes_the_linear_layer_it_is(tmp_path):
    """Same logits and, under bp, the same gradients (transposed) as the Conv1D model."""
    torch.manual_seed(0)
    config = validate(hf_recipe(tmp_path, GPT2))
    shape = dataset_shape(config.data)
    model = build_model(config.model, shape).eval()  # GPT-2's dropout off
    x = torch.randint(0, shape.classes, (2, 16))
    reference = model(x)
    reference.square().mean().backward()
    conv = model.lm.transformer.h[0].attn.c_attn
    conv_grad = conv.weight.grad.clone()
    convert(model, "bp", example_input=x)
    model.zero_grad()
    linear = model.lm.transformer.h[0].attn.c_attn
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (48, 16)
    out = model(x)
    torch.testing.assert_close(out, reference)
    out.square().mean().backward()
    torch.testing.assert_close(linear.weight.grad, conv_grad.t())


@pytest.mark.parametrize(("config", "words"), [
    ({"hidden_size": 16}, "needs model_type"),
    ({**LLAMA, "vocab_size": 50}, "must be the data's vocabulary"),
    ({**LLAMA, "max_position_embeddings": 8}, "allows 8 positions"),
    ({"model_type": "no_such_model"}, "model.config:"),
    ({**LLAMA, "hidden_size": 18}, "model.config:"),  # 18 not divisible by 4 heads
    ({**GPT2, "n_embd": 18}, "model.config:"),
])  # fmt: skip
def test_a_config_that_cannot_be_built_is_a_one_line_error(capsys, tmp_path, config, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(hf_recipe(tmp_path, config)))
    code, _, err = run_cli(capsys, "train", path, "--out", tmp_path / "run", "--dry-run")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_without_transformers_the_error_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(hf_recipe(tmp_path, LLAMA)))
    code, _, err = run_cli(capsys, "train", path, "--out", tmp_path / "run", "--dry-run")
    assert code == 2 and 'pip install -e ".[hf]"' in err, err


def test_a_tiny_llama_trains_resumes_exactly_and_samples(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    recipe = hf_recipe(tmp_path, LLAMA, {"rule": "dfa", "options": {"points": "blocks"}})
    recipe |= {"optim": {"name": "adamw", "lr": 3e-3},
               "train": {"epochs": 2, "batch_size": 32, "log_every": 5, "eval_every_steps": 20,
                         "deterministic": True, "checkpoint_every_steps": 7}}  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    code, _, err = run_cli(capsys, "train", path, "--out", whole, "--device", "cpu")
    assert code == 0 and "test bpc" in err, err
    train_one_epoch_then_resume(capsys, path, broken)
    evals = eval_losses(whole)
    assert eval_losses(broken) == evals and evals[-1][1] < evals[0][1]
    code, out, err = run_cli(capsys, "sample", whole, "--prompt", "The", "--tokens", "12")
    assert code == 0 and out.startswith("The"), err
