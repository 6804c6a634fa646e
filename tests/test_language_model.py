"""Language models: text data (tokenizers, splits, windows, errors), the GPT and its
conversion under every rule, bits per character, sampling, compute to a bpc target, and an
exact resume. Every test writes its own text."""

import json

import pytest
import torch
import yaml

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.config import validate
from ldfa_cli.data import dataset_shape, load_data, steps_per_epoch
from ldfa_cli.data.text import UNKNOWN, Tokenizer
from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.engine.metrics import read_metrics
from ldfa_cli.feedback import RULES, conversion_report, convert, feedback_layers
from ldfa_cli.measure.flops import PHASES
from ldfa_cli.models import build_model
from tests.helpers import analytic, eval_losses, run_cli, train_one_epoch_then_resume

TEXT = "".join(f"The {w} of line {i} is here; and it goes on.\n" for i in range(400)
               for w in ("first", "second")) + "Zebra!"  # fmt: skip
TINY = {"name": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16}


def corpus(tmp_path, text=TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def data_config(tmp_path, **extra):
    return {"dataset": "text", "root": str(corpus(tmp_path)), "block_size": 16, **extra}


def recipe(tmp_path, feedback=None, **train):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "description": "tiny language model", "model": TINY,
        "feedback": feedback or {"rule": "ldfa", "rank": 4},
        "data": data_config(tmp_path), "optim": {"name": "adamw", "lr": 3e-3},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 5, "eval_every_steps": 20,
                  **train},
    }))  # fmt: skip
    return path


def test_text_splits_tokenizes_and_draws_windows_that_a_resume_draws_again(tmp_path):
    config = validate({"data": data_config(tmp_path)}).data
    data = load_data(config)
    n = len(TEXT)
    assert len(data.train) + len(data.val) + len(data.test) == n
    assert len(data.test) == round(0.1 * n) and len(data.val) == round(0.1 * n)
    vocab = data.tokenizer.vocab
    assert vocab[-1] == UNKNOWN and "Z" not in vocab  # only in the test split: unknown
    assert data.tokenizer.decode(data.test[-6:].tolist()) == "?e?ra?".replace("?", UNKNOWN)
    assert dataset_shape(config).classes == len(vocab) and dataset_shape(config).tokens
    assert steps_per_epoch(config, 16) == data.steps_per_epoch(16)
    batches = list(data.train_batches(1, 16, seed=3))
    x, y = batches[2]
    assert x.shape == y.shape == (16, 16) and torch.equal(x[:, 1:], y[:, :-1])
    resumed = list(data.train_batches(1, 16, seed=3, start=2))
    assert torch.equal(resumed[0][0], x)  # the same windows from the same step on
    byte = load_data(config.model_copy(update={"tokenizer": "byte"}))
    assert byte.classes == 256 and byte.tokenizer.decode(byte.train[:8].tolist()) == TEXT[:8]
    evals = list(data.eval_batches(8, split="val"))
    assert sum(len(x) for x, _ in evals) == (len(data.val) - 1) // 16


@pytest.mark.parametrize(("text", "words"), [
    (None, ["neither a text file nor a folder"]),
    ("", ["holds no text"]),
    ("abc" * 5, ["fewer than two windows"]),
    (b"\xff\xfe not utf-8", ["is not UTF-8"]),
])  # fmt: skip
def test_a_corpus_that_cannot_be_used_is_a_one_line_error(capsys, tmp_path, text, words):
    path = tmp_path / "corpus.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": TINY, "data": {
        "dataset": "text", "root": str(path), "block_size": 16}}))  # fmt: skip
    code, _, err = run_cli(capsys, "train", tmp_path / "r.yaml", "--out", tmp_path / "run")
    line = err.strip()
    assert code == 2 and "\n" not in line and all(w in line for w in words), line
    assert not (tmp_path / "run").exists()


def test_the_gpt_converts_its_linear_layers_and_says_why_it_keeps_the_embeddings(tmp_path):
    shape = dataset_shape(validate({"data": data_config(tmp_path)}).data)
    model = build_model(validate({"model": TINY}).model, shape)
    x = shape.blank()
    convert(model, "ldfa", rank=4, rank_scale={"*.qkv": 3}, example_input=x)
    rows = {row.name: row for row in conversion_report(model).rows}
    assert {n for n, r in rows.items() if r.note == "converted"} == {
        f"blocks.{i}.{layer}" for i in (0, 1)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")} | {"head"}  # fmt: skip
    assert rows["blocks.0.attn.qkv"].rank == 12 and rows["blocks.0.mlp.fc"].rank == 4
    assert rows["wte"].kind == "Embedding" and "looked up by token id" in rows["wte"].note
    assert rows["head"].tied_to == "wte"
    assert model.head.weight is model.wte.weight  # still tied after the swap
    assert model(x).shape == (2, 16, shape.classes)


SHIPPED = sorted(n for n, c in RULES.items() if c.__module__.startswith("ldfa_cli."))


@pytest.mark.parametrize("rule", SHIPPED)
def test_every_rule_trains_the_gpt_and_its_count_is_its_analytic_one(tmp_path, rule):
    config = validate({"model": TINY, "data": data_config(tmp_path),
                       "feedback": {"rule": rule, "rank": 4}})  # fmt: skip
    model, x, y = synthetic_network(config, 4, torch.device("cpu"))
    report = flops_report(model, x, y)
    assert not report.warnings
    layers = dict(feedback_layers(model))
    assert layers or rule == "bp"
    for row in report.layers:
        if row["layer"] in layers:
            expected = analytic(layers[row["layer"]], row["samples"],
                                report.rule.batches[row["layer"]])  # fmt: skip
            assert all(row[p] == expected[p] for p in PHASES), row["layer"]


def test_a_language_model_trains_logs_bpc_samples_and_counts_compute_to_bp(capsys, tmp_path):
    runs = tmp_path / "runs"
    for rule in ("bp", "ldfa"):
        code, _, err = run_cli(capsys, "train", recipe(tmp_path), f"feedback.rule={rule}",
                               "--out", runs / rule, "--device", "cpu")  # fmt: skip
        assert code == 0 and "test bpc" in err, err
    evals = [e for e in read_metrics(runs / "ldfa" / "metrics.jsonl") if e["event"] == "eval"]
    assert all({"bpc", "ppl", "val_bpc", "val_loss"} <= set(e) for e in evals)
    assert evals[-1]["bpc"] == pytest.approx(evals[-1]["loss"] / 0.6931471805599453)
    assert evals[-1]["bpc"] < evals[0]["bpc"]  # it learns
    best = min(evals, key=lambda e: e["val_loss"])
    saved = torch.load(runs / "ldfa" / "checkpoints" / "best.pt", weights_only=True)
    assert saved["progress"]["step"] == best["step"]  # best.pt on the validation loss
    tokenizer = Tokenizer.from_json((runs / "ldfa" / "tokenizer.json").read_text())

    code, out, err = run_cli(capsys, "sample", runs / "ldfa", "--prompt", "The first",
                             "--tokens", "30", "--seed", "1")  # fmt: skip
    assert code == 0, err
    assert out.startswith("The first") and len(tokenizer.encode(out.rstrip("\n"))) == 39
    again = run_cli(capsys, "sample", runs / "ldfa", "--prompt", "The first", "--tokens",
                    "30", "--seed", "1")[1]  # fmt: skip
    assert again == out  # the seed fixes the draws
    vocabulary = runs / "ldfa" / "tokenizer.json"
    kept = vocabulary.read_text(encoding="utf-8")
    for damaged in ("{bad", "[1, 2]", '{"kind": "char"}'):
        vocabulary.write_text(damaged)
        code, _, err = run_cli(capsys, "sample", runs / "ldfa", "--prompt", "The")
        assert code == 2 and "tokenizer.json is damaged" in err and "\n" not in err.strip()
    vocabulary.write_text(kept, encoding="utf-8")

    code, out, err = run_cli(capsys, "eval", runs / "ldfa", "--json", "--device", "cpu")
    assert code == 0, err  # the diagnostics take every token's loss
    report = json.loads(out)
    assert report["bpc"] == pytest.approx(report["loss"] / 0.6931471805599453)
    cosines = [d["grad_cosine"] for d in report["diagnostics"]]
    assert len(cosines) == 9 and all(-1 <= c <= 1 for c in cosines if c == c)
    code, out, err = run_cli(capsys, "eval", runs / "bp", "--device", "cpu")
    assert code == 0, err  # a backprop run: no feedback layer to diagnose
    assert "bpc" in out

    code, out, err = run_cli(capsys, "flops", runs, "--metric", "bpc", "--json")
    assert code == 0, err
    groups = {g["rule"]: g for g in json.loads(out)["groups"]}
    assert json.loads(out)["bp_target_acc"] == pytest.approx(groups["bp"]["final"])
    assert groups["bp"]["flops_to_target"] is not None  # it reaches its own final value


def test_plot_draws_the_validation_split_where_asked(capsys, tmp_path, monkeypatch):
    from ldfa_cli.cli import plot_cmd

    code, _, err = run_cli(capsys, "train", recipe(tmp_path), "--out", tmp_path / "run",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    evals = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["event"] == "eval"]
    drawn = {}
    monkeypatch.setattr(plot_cmd, "save_figure",
                        lambda fig, out, fmt: drawn.__setitem__(out.stem, fig) or out)  # fmt: skip
    for split in ("test", "val"):
        code, _, err = run_cli(capsys, "plot", tmp_path / "run", "--split", split, "--out",
                               tmp_path / f"{split}.png")  # fmt: skip
        assert code == 0, err
    for split, key in (("test", "bpc"), ("val", "val_bpc")):
        curve, losses = (ax.get_lines()[0] for ax in drawn[split].axes)
        assert list(curve.get_ydata()) == pytest.approx([e[key] for e in evals])
        assert drawn[split].axes[0].get_ylabel() == f"{split} bpc"
        assert drawn[split].axes[0].get_title() == f"text corpus.txt: {split} bits per character"
    code, _, err = run_cli(capsys, "plot", tmp_path / "run", "--split", "train")
    assert code == 2 and "--split must be test or val" in err


def test_sample_refuses_a_run_that_is_not_a_language_model(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    code, _, err = run_cli(capsys, "sample", tmp_path / "run")
    assert code == 2 and "not a language model's run folder" in err


def test_a_language_model_resumes_mid_epoch_exactly(capsys, tmp_path):
    path = recipe(tmp_path, deterministic=True, checkpoint_every_steps=7)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(capsys, "train", path, "--out", whole, "--device", "cpu")[0] == 0
    train_one_epoch_then_resume(capsys, path, broken)
    assert eval_losses(broken) == eval_losses(whole)


@pytest.mark.parametrize("source", ["output", "ln_f"])
def test_dfa_at_the_blocks_sends_b_e_to_each_block_and_backprop_inside(tmp_path, source):
    """Launay et al.'s transformer DFA: block l's output gradient is B_l e (e = dL/dlogits,
    or dL/d ln_f's output as in their code, at each position), the gradient from above
    dropped; the block's weights get backprop of that signal; the head (and ln_f after the
    source) get the true gradient."""
    torch.manual_seed(0)
    shape = dataset_shape(validate({"data": data_config(tmp_path)}).data)
    model = build_model(validate({"model": {**TINY, "tie_weights": False}}).model, shape)
    x = torch.randint(0, shape.classes, (3, 16))
    y = torch.randint(0, shape.classes, (3, 16))
    convert(model, "dfa", points="blocks", source=source, example_input=x[:2])
    rows = {row.name: row for row in conversion_report(model).rows}
    assert [n for n, r in rows.items() if r.note == "converted"] == ["blocks.0", "blocks.1"]
    assert "inside block 'blocks.1'" in rows["blocks.1.mlp.fc"].note
    assert ("after the broadcast source" in rows["head"].note) == (source == "ln_f")
    inputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
    top = {}
    model.ln_f.register_forward_hook(lambda m, a, out: top.setdefault("out", out))
    logits = model(x)
    logits.retain_grad()
    top["out"].retain_grad()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    e = logits.grad if source == "output" else top["out"].grad
    assert e.shape[-1] == (shape.classes if source == "output" else TINY["n_embd"])
    head_ref = torch.einsum("btv,btn->vn", logits.grad, top["out"].detach())
    torch.testing.assert_close(model.head.weight.grad, head_ref, rtol=1e-5, atol=1e-7)
    for i, block in enumerate(model.blocks):
        block.broadcast_point.enabled = False
        params = [p for n, p in block.named_parameters() if "broadcast" not in n]
        signal = e @ block.broadcast_point.feedback_B.t()  # B_l e at every position
        ref = torch.autograd.grad(block(inputs[i]), params, signal)
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)


def test_dfa_at_the_blocks_counts_its_broadcast_and_has_backprop_as_reference(tmp_path):
    config = validate({"model": TINY, "data": data_config(tmp_path),
                       "feedback": {"rule": "dfa", "options": {"points": "blocks"}}})  # fmt: skip
    model, x, y = synthetic_network(config, 4, torch.device("cpu"))
    report = flops_report(model, x, y)
    rows = {row["layer"]: row for row in report.layers}
    n, t, v = 16, x.shape[1], dataset_shape(config.data).classes
    for block in ("blocks.0", "blocks.1"):
        assert rows[block]["broadcast"] == 2 * len(x) * t * v * n
        assert rows[block]["bp_broadcast"] == 0
    bp = flops_report(*synthetic_network(validate({**config.model_dump(), "feedback": {
        "rule": "bp"}}), 4, torch.device("cpu")))  # fmt: skip
    assert report.reference.total == pytest.approx(bp.rule.total, rel=1e-9)


def test_flops_counts_compute_to_a_target_on_the_validation_split(capsys, tmp_path, drawn):
    runs = tmp_path / "runs"
    for rule in ("bp", "ldfa"):
        code, _, err = run_cli(capsys, "train", recipe(tmp_path), f"feedback.rule={rule}",
                               "--out", runs / rule, "--device", "cpu")  # fmt: skip
        assert code == 0, err
    evals = {rule: [e for e in read_metrics(runs / rule / "metrics.jsonl") if e["event"] == "eval"]
             for rule in ("bp", "ldfa")}  # fmt: skip
    target = evals["ldfa"][-1]["val_bpc"]
    first = next(e for e in evals["bp"] if e["val_bpc"] <= target)  # written out by hand
    code, out, err = run_cli(capsys, "flops", runs / "bp", runs / "ldfa", "--metric", "bpc",
                             "--split", "val", "--target", str(target), "--json", "--plot",
                             tmp_path / "c.png")  # fmt: skip
    assert code == 0, err
    assert "val bpc <=" in err
    bars, twin = drawn["c.png"].axes  # the figure names the split its values come from
    assert bars.get_ylabel() == "val bits per character (lower is better)"  # as ldfa plot
    assert twin.get_ylabel().endswith(f"to val bpc <= {target:g}")
    found = {r["rule"]: r for r in json.loads(out)["runs"]}
    assert "evaluations" not in found["bp"]  # a summary, not the records again
    assert found["bp"]["flops_to_target"] == first["train_flops"]
    assert found["ldfa"]["final"] == pytest.approx(
        sum(e["val_bpc"] for e in evals["ldfa"][-3:]) / 3
    )  # not the test split's
    assert found["ldfa"]["final"] != pytest.approx(sum(e["bpc"] for e in evals["ldfa"][-3:]) / 3)
    code, _, err = run_cli(capsys, "flops", runs / "bp", "--metric", "bpc", "--split", "train")
    assert code == 2 and "--split must be test or val" in err
