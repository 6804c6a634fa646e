"""FLOP accounting: measured (PyTorch's FlopCounterMode) against analytic, per layer and
phase; compute-to-target on hand-written metrics; bench, sweep and plot end to end."""

import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ldfa_cli.analysis.flops import FVCORE_HANDLES, flops_report, fvcore_forward
from ldfa_cli.config import validate
from ldfa_cli.engine.metering import count_step
from ldfa_cli.engine.step import TrainStep
from ldfa_cli.feedback import RULES as ALL_RULES
from ldfa_cli.feedback import auxiliary_loss, convert, feedback_layers
from ldfa_cli.measure.flops import PHASES, PhaseFlopCounter, attention_formulas
from ldfa_cli.models import InputShape, build_model
from tests.helpers import analytic, press_ctrl_c_during, recipe_layers, run_cli

SHAPE = InputShape(channels=3, size=16, classes=10)


def _model(name):
    config = validate({"model": {
        "mlp": {"name": "mlp", "widths": [48, 40]},
        "vgg": {"name": "vgg", "width_multiplier": 0.125},
        "vit": {"name": "vit", "embed_dim": 32, "depth": 2, "num_heads": 4},
    }[name]}).model  # fmt: skip
    return build_model(config, SHAPE)


# every rule the package ships (a new rule file is counted here without a line of its own),
# at rank 4, and the options that change what a rule computes
SHIPPED = sorted(n for n, c in ALL_RULES.items() if c.__module__.startswith("ldfa_cli."))
CASES = {**{rule: {"rank": 4} for rule in SHIPPED},
         "ldfa interval=2": {"rank": 4, "interval": 2},
         "ldfa_local targets": {"rank": 3, "learn_q": True, "use_targets": True}}  # fmt: skip


@pytest.mark.parametrize("family", ["mlp", "vgg", "vit"])
@pytest.mark.parametrize("case", list(CASES))
def test_measured_equals_analytic_per_layer_and_phase(family, case):
    torch.manual_seed(0)
    model = _model(family)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    convert(model, case.split()[0], example_input=x, **CASES[case])
    report = flops_report(model, x, y)
    assert not report.warnings
    layers = dict(feedback_layers(model))
    assert layers, "something was converted"
    for row in report.layers:
        if row["layer"] == "(other)":
            continue
        layer = layers[row["layer"]]
        expected = analytic(layer, row["samples"], report.rule.batches[row["layer"]])
        for phase in PHASES:
            assert row[phase] == expected[phase], (row["layer"], phase)
        if layer.dense_twin() is None:  # an SVD-form layer's forward is its factors'
            assert row["bp_input_grad"] == row["bp_forward"] == row["bp_weight_grad"]
    if auxiliary_loss(model) is None:  # (a rule's own loss term is counted outside layers)
        other = next(r for r in report.layers if r["layer"] == "(other)")
        assert other["forward"] == other["bp_forward"]
        assert other["backward"] == other["bp_backward"]


@pytest.mark.parametrize("family", ["mlp", "vgg", "vit"])
def test_backprop_reference_counts_what_autograd_counts(family):
    """Backprop measured inside the feedback Function costs exactly autograd's backprop."""
    torch.manual_seed(0)
    plain = _model(family)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(plain(x), y).backward()
    plain.zero_grad(set_to_none=True)  # (accumulating into .grad would add elementwise work)
    with PhaseFlopCounter() as ours:  # the same step, elementwise work charged as well
        nn.functional.cross_entropy(plain(x), y).backward()
    converted = convert(plain, "bp", example_input=x)
    reference = flops_report(converted, x, y).reference
    assert reference.products == counter.get_total_flops()
    assert reference.elementwise == {
        p: ours.counts[("(elementwise)", p)] for p in ("forward", "backward")
    }


def test_low_rank_saves_input_gradient_flops_and_interval_amortises():
    model = _model("mlp")
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    convert(model, "ldfa", rank=4, interval=4, example_input=x)
    report = flops_report(model, x, y)
    fc2 = next(r for r in report.layers if r["layer"] == "fc2")
    assert fc2["input_grad"] == 2 * 32 * 4 * (48 + 40) < fc2["bp_input_grad"] == 2 * 32 * 48 * 40
    per_update = 4 * 40 * 48 * 4 + 4 * 16 * 48 + 4 * 16 * 40
    assert fc2["feedback_update"] == per_update / 4
    assert report.rule.total < report.reference.total


def test_the_feedback_optimizer_is_counted_in_the_steps_in_which_the_factors_learn():
    # eq. 9 every 3 steps: Q and P have a gradient, so AdamW moves them, one step in 3
    from ldfa_cli.engine.optim import build_optimizers
    from ldfa_cli.feedback import backward_with_rules, feedback_parameters

    recipe = validate(
        {
            "model": {"name": "mlp", "widths": [48, 40]},
            "feedback": {"rule": "ldfa", "rank": 4, "options": {"interval": 3}},
        }
    )
    model = build_model(recipe.model, SHAPE)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    convert(model, "ldfa", rank=4, interval=3, example_input=x)
    optimizers = build_optimizers(recipe, model, steps_per_epoch=10)
    factors = feedback_parameters(model)
    moved = []
    for step in range(6):
        optimizers.zero_grad()
        before = [p.detach().clone() for p in factors]
        backward_with_rules(model, F.cross_entropy(model(x), y), step)
        optimizers.step()
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, factors, strict=True)))
    assert moved == [True, False, False, True, False, False]
    rule_plan = optimizers.flop_plan(model)
    assert dict((label, n) for label, _, n in rule_plan)["feedback"] == pytest.approx(
        sum(p.numel() for p in factors) / 3
    )


def test_counting_does_not_change_the_model_or_the_rng():
    model = convert(_model("vgg"), "ldfa_local", rank=2, learn_q=True)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    count_step(TrainStep(model), x, y)
    after_rng = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after_rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class _OtherOpElements(TorchDispatchMode):
    """The largest tensor (read or written) of every op that has no FLOP formula (norms,
    activations, adds, pooling, copies), summed: fvcore charges those at most 5 multiply-adds
    per element (a norm with affine), so they bound what it adds to the products."""

    def __init__(self):
        super().__init__()
        self.formulas = {**flop_counter.flop_registry, **attention_formulas()}
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in self.formulas:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, Tensor)]
            self.elements += max((t.numel() for t in tensors), default=0)
        return out


def _tiny_timm_vit():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=4
    )
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
    return convert(model, "ldfa", rank=4, example_input=x), x, y


def test_fvcore_sees_every_product_and_only_a_bounded_extra():
    """Properties that hold whatever fvcore, timm and torch version: fvcore (with its two
    handles) counts at least every matmul, conv and attention product that PyTorch's
    counter measures, and at most 5 more per element of the other ops; without either
    handle it is low."""
    model, x, y = _tiny_timm_vit()
    products = flops_report(model, x, y).to_dict()["forward_measured_flops"] / 2  # MACs
    with torch.no_grad(), _OtherOpElements() as other:
        model(x)
    counted, _ = fvcore_forward(model, x)
    assert products <= counted <= products + 5 * other.elements
    for missing in FVCORE_HANDLES:
        kept = tuple(h for h in FVCORE_HANDLES if h != missing)
        assert fvcore_forward(model, x, handles=kept)[0] < products, missing


def test_attention_is_counted_whatever_kernel_torch_picks():
    """F.scaled_dot_product_attention (a fused kernel, chosen per device and version) costs
    what the same attention written as two matmuls costs under the same counter; its
    backward at least the matmuls' backward, at most that plus recomputing the scores."""
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))

    def fused():
        return F.scaled_dot_product_attention(q, k, v)

    def by_hand():
        return (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v

    def products(counter):  # the elementwise work (softmax, scaling) is another row
        return sum(v for (row, _), v in counter.counts.items() if row != "(elementwise)")

    counts = {}
    for name, attention in (("fused", fused), ("by_hand", by_hand)):
        with PhaseFlopCounter() as counter:
            out = attention()
            forward = products(counter)
            out.sum().backward()
        counts[name] = (forward, products(counter) - forward)
    scores = 2 * 2 * 3 * 5 * 5 * 4  # q k^T
    assert counts["fused"][0] == counts["by_hand"][0] == 2 * scores
    assert counts["by_hand"][1] <= counts["fused"][1] <= counts["by_hand"][1] + scores


def test_flops_command_on_a_recipe(capsys):
    code, out, err = run_cli(capsys, "flops", "fmnist_vit_r8", "--batch-size", "4", "--json")
    assert code == 0, err
    data = json.loads(out)
    converted = [name for name, note in recipe_layers("fmnist_vit_r8").items()
                 if note == "converted"]  # fmt: skip
    assert data["total"]["ratio"] < 1.0 and converted[0] in err
    assert {r["layer"] for r in data["layers"]} == {*converted, "(other)"}


def _fake_run(root, name, rule, rank, seed, accs, step_flops=1e12, step_time=10.0):
    run = root / name
    run.mkdir(parents=True)
    config = {"feedback": {"rule": rule, "rank": rank}, "train": {"seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "env.json").write_text(json.dumps({"recipe": "toy"}))
    events = [{"event": "eval", "epoch": i + 1, "step": 10 * (i + 1), "acc": acc, "loss": 1.0,
               "train_flops": step_flops * (i + 1), "time_s": step_time * (i + 1)}
              for i, acc in enumerate(accs)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_compute_to_target_on_hand_written_metrics(capsys, tmp_path):
    runs = [
        _fake_run(tmp_path, "bp0", "bp", None, 0, [0.50, 0.80, 0.90, 0.90, 0.90]),
        _fake_run(tmp_path, "bp1", "bp", None, 1, [0.60, 0.85, 0.88, 0.90, 0.92]),
        _fake_run(
            tmp_path, "r8", "ldfa", 8, 0, [0.40, 0.70, 0.80, 0.85, 0.90], step_flops=0.5e12
        ),  # fmt: skip
    ]
    code, out, err = run_cli(capsys, "flops", *runs, "--target", "0.9", "--json",
                             "--plot", tmp_path / "u.png")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in data["runs"]}
    # bp0: final = 0.9, target 0.81 first reached at eval 3 -> 3 TFLOPs, 30 s
    assert by_name["bp0"]["final"] == pytest.approx(0.9)
    assert by_name["bp0"]["flops_to_target"] == 3e12 and by_name["bp0"]["time_to_target"] == 30
    # bp1: final = 0.9, target 0.81 reached at eval 2 -> 2 TFLOPs
    assert by_name["bp1"]["flops_to_target"] == 2e12
    # r8: final = 0.85, target 0.765 reached at eval 3 -> 1.5 TFLOPs
    assert by_name["r8"]["flops_to_target"] == pytest.approx(1.5e12)
    # common target: 0.9 x BP's mean final 0.9 = 0.81 -> r8 reaches it at eval 4 -> 2 TFLOPs
    assert data["bp_target_acc"] == pytest.approx(0.81)
    assert by_name["r8"]["flops_to_common"] == pytest.approx(2e12)
    # BP's mean final itself, 0.9: bp0 at eval 3, bp1 at eval 4, r8 at eval 5 (2.5 TFLOPs)
    assert [by_name[n]["flops_to_bp_final"] for n in ("bp0", "bp1")] == [3e12, 4e12]
    assert by_name["r8"]["flops_to_bp_final"] == pytest.approx(2.5e12)
    bp_group = next(g for g in data["groups"] if g["rule"] == "bp")
    assert bp_group["seeds"] == 2 and bp_group["flops_to_target"] == 2.5e12
    assert bp_group["flops_to_target_se"] == pytest.approx(0.5e12)
    assert (tmp_path / "u.png").stat().st_size > 1000
    assert not any("backprop runs of" in w for w in data["warnings"])  # one BP setting


def test_the_compute_table_goes_to_stdout_and_its_notes_to_stderr(capsys, tmp_path):
    runs = [_fake_run(tmp_path, "bp", "bp", None, 0, [0.5, 0.9, 0.9]),
            _fake_run(tmp_path, "r8", "ldfa", 8, 0, [0.5, 0.8, 0.8])]  # fmt: skip
    code, out, err = run_cli(capsys, "flops", *runs)
    assert code == 0, err
    assert "compute to 90% of final acc" in out and "ldfa" in out  # the table pipes
    assert "compute to" not in err and "BP target: 90%" in err  # what it counted: a note


def test_backprop_runs_of_two_settings_are_named_as_the_mean_they_make(capsys, tmp_path):
    runs = [_fake_run(tmp_path, "bp", "bp", None, 0, [0.5, 0.9, 0.9, 0.9]),
            _fake_run(tmp_path, "bp_short", "bp", None, 0, [0.5, 0.7, 0.7, 0.7]),
            _fake_run(tmp_path, "r8", "ldfa", 8, 0, [0.5, 0.8, 0.8, 0.8])]  # fmt: skip
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    config["train"]["epochs"] = 2
    (runs[1] / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "flops", *runs, "--json")
    assert code == 0, err
    data = json.loads(out)
    # BP's final is the mean of both settings' runs (0.8): said, not silently compared with
    assert data["bp_target_acc"] == pytest.approx(0.9 * 0.8)
    (warning,) = [w for w in data["warnings"] if "backprop runs of 2 settings" in w]
    assert "epochs=2: 1 run" in warning and "backprop runs of 2 settings" in " ".join(err.split())


def _tiny_recipe(path):
    path.write_text(yaml.safe_dump({
        "description": "tiny", "model": {"name": "mlp", "widths": [16]},
        "feedback": {"rule": "ldfa", "rank": 4},
        "data": {"dataset": "digits", "subset": 64, "val_fraction": 0},  # two whole batches
        "train": {"epochs": 2, "batch_size": 32, "log_every": 1},
    }))  # fmt: skip
    return path


def test_train_records_cumulative_flops(capsys, tmp_path):
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    assert run_cli(capsys, "train", recipe, "train.eval_every_steps=1", "--out",
                   tmp_path / "run", "--device", "cpu")[0] == 0  # fmt: skip
    from ldfa_cli.engine.metrics import read_metrics

    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [0.5, 1.0, 1.5, 2.0]  # 2 steps an epoch
    trains = [e for e in events if e["event"] == "train"]
    per_step = trains[0]["train_flops"] / trains[0]["step"]
    assert per_step > 0
    for event in events:
        assert event["train_flops"] == pytest.approx(per_step * event["step"])


def test_sweep_print_and_run_then_flops_reads_the_folder(capsys, tmp_path):
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    code, out, _ = run_cli(capsys, "sweep", recipe, "feedback.rank=2,4", "train.seed=0,1",
                           "--print", "--out", tmp_path / "s")  # fmt: skip
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].startswith("ldfa train ") and "feedback.rank=2 train.seed=0" in lines[0]
    assert all("--device" not in line for line in lines)  # auto: the default, left out
    assert not (tmp_path / "s").exists()
    code, out, _ = run_cli(capsys, "sweep", recipe, "feedback.rank=2", "--print", "--out",
                           tmp_path / "s", "--device", "cpu")  # fmt: skip
    assert code == 0 and out.strip().endswith("--device cpu")  # as the sweep would run it
    code, _, err = run_cli(capsys, "sweep", recipe, "feedback.rank=2,4", "--out",
                           tmp_path / "s", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    folders = sorted((tmp_path / "s").iterdir())
    assert [f.name for f in folders] == ["rank=2", "rank=4"]
    code, _, err = run_cli(capsys, "sweep", recipe, "feedback.rank=2,4", "--out", tmp_path / "s")
    assert code == 0 and err.count("finished, skipped") == 2
    code, out, err = run_cli(capsys, "flops", *folders, "--json")
    assert code == 0, err
    assert {g["rank"] for g in json.loads(out)["groups"]} == {2, 4}
    code, _, err = run_cli(capsys, "plot", *folders, "--x", "flops", "--out", tmp_path / "c.png")
    assert code == 0, err
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_sweep_with_jobs_runs_points_in_parallel_processes(capsys, tmp_path):
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    command = ["sweep", recipe, "feedback.rank=2,4", "--out", tmp_path / "s", "--device", "cpu",
               "--jobs", "2"]  # fmt: skip
    code, _, err = run_cli(capsys, *command)
    assert code == 0, err
    for name in ("rank=2", "rank=4"):
        assert (tmp_path / "s" / name / "checkpoints" / "last.pt").is_file()
        assert "epoch 2" in (tmp_path / "s" / f"{name}.log").read_text()
    code, _, err = run_cli(capsys, *command)
    assert code == 0 and err.count("finished, skipped") == 2
    code, _, err = run_cli(capsys, "sweep", recipe, "feedback.rank=2,4", "data.dataset=mnist",
                           f"data.root={tmp_path / 'none'}", "data.download=false",
                           "--out", tmp_path / "b", "--jobs", "2")  # fmt: skip
    assert code == 1 and "2 sweep point(s) failed" in " ".join(err.split()) and ".log" in err


def test_ctrl_c_in_a_sweep_exits_130_and_the_same_command_resumes(capsys, tmp_path, monkeypatch):
    press_ctrl_c_during(monkeypatch, "backward_with_rules", 1)
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    command = ["sweep", recipe, "feedback.rank=2,4", "--out", tmp_path / "s", "--device", "cpu"]
    code, _, err = run_cli(capsys, *command)
    assert code == 130 and "sweep interrupted at rank=2" in err
    assert not (tmp_path / "s" / "rank=4").exists()
    code, _, err = run_cli(capsys, *command)
    assert code == 0 and "rank=2: resuming" in err and "rank=4: training" in err


def test_bench_times_whole_periods_of_an_update_that_runs_every_k_steps():
    # eq. 9 every 4 steps: the median of single steps would be a step without it, while
    # the FLOPs count a quarter of it in every step
    import dataclasses

    from ldfa_cli.analysis.bench import Variant, time_periods
    from ldfa_cli.feedback.model import update_period

    x = torch.randn(2, 3, 16, 16)
    model = convert(_model("mlp"), "ldfa", rank=4, interval=4, example_input=x)
    assert update_period(model) == 4
    assert update_period(convert(_model("mlp"), "lowrank_fa", rank=4, example_input=x)) == 1
    calls = []

    def timed(fn):  # a clock on which the steps with eq. 9 (every 4th) take 4 s, others 0
        start = len(calls)
        fn()
        return sum(4.0 for i in range(start, len(calls)) if i % 4 == 0)

    variant = Variant("ldfa", model, lambda: calls.append(1), None, [], period=4)
    time_periods([variant], 5, timed)
    assert variant.times == [1.0] * 5
    first = next(layer for _, layer in feedback_layers(model))
    first.rule = dataclasses.replace(first.rule, interval=3)
    assert update_period(model) == 12


def test_bench_output_on_a_cpu_is_free_of_the_profilers_own_log(tmp_path):
    # Kineto writes to the process's stderr from C++ (its start and stop, and on a CUDA
    # build without a GPU an "ERROR"): a fresh process, where the bench is its first use
    import subprocess
    import sys

    recipe = _tiny_recipe(tmp_path / "r.yaml")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "ldfa_cli", "bench", recipe, "--ranks", "2",
                           "--steps", "2", "--warmup", "0", "--device", "cpu"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "where the time goes" in done.stderr
    assert "profiler_start" not in done.stderr and "ERROR:" not in done.stderr


def test_bench_on_a_tiny_model(capsys, tmp_path):
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    code, out, err = run_cli(capsys, "bench", recipe, "--ranks", "2,4", "--steps", "3",
                             "--warmup", "1", "--device", "cpu", "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert [r["variant"] for r in data["rows"]] == ["bp", "ldfa r=2", "ldfa r=4"]
    assert data["rows"][0]["time_ratio"] == 1.0 and data["rows"][1]["flop_ratio"] < 1.0
    assert data["profile"]["bp"] and "where the time goes" in err
    bp, ldfa = data["phases_ms"]["bp"], data["phases_ms"]["ldfa r=2"]
    # backprop timed and counted on its split twin: input and weight gradients apart
    assert {"forward", "input_grad", "weight_grad", "optimizer"} <= set(bp)
    assert {"forward", "input_grad", "weight_grad", "feedback_update", "optimizer"} <= set(ldfa)
    for label, row in zip(("bp", "ldfa r=2"), data["rows"][:2], strict=True):
        # the time rows add up to the median step, the FLOP rows to the step's FLOPs
        assert sum(data["phases_ms"][label].values()) == pytest.approx(row["median_ms"])
        assert sum(data["phases_gflops"][label].values()) == pytest.approx(row["gflops_per_step"])
    flops_bp, flops_ldfa = data["phases_gflops"]["bp"], data["phases_gflops"]["ldfa r=2"]
    assert flops_ldfa["input_grad"] < flops_bp["input_grad"]  # Q (P g) against W^T g
    assert flops_ldfa["weight_grad"] == pytest.approx(flops_bp["weight_grad"])
    gap = data["rows"][1]["gap"]
    assert gap == pytest.approx(data["rows"][1]["time_ratio"] - data["rows"][1]["flop_ratio"])
    assert sum(data["gap_by_phase"]["ldfa r=2"].values()) == pytest.approx(gap)
    assert "by phase" in err and "share of the gap" in " ".join(err.split())
    assert "kernel_ms" not in data["rows"][0] and "kernel ms" not in err  # a GPU's column
    assert "gap_floor" not in data["rows"][0] and "floor: the gap if" in " ".join(err.split())
    assert data["rows"][1]["gap_floor"] == pytest.approx(
        1 - bp["input_grad"] / data["rows"][0]["median_ms"] - data["rows"][1]["flop_ratio"]
    )
    # dispatches: ATen ops of one eager step; the rule adds its eq. 9 products and the
    # second optimizer's step, so it dispatches more, the difference per converted layer
    rows = {r["variant"]: r for r in data["rows"]}
    bp_ops, rule_ops = rows["bp"]["dispatches"], rows["ldfa r=2"]["dispatches"]
    assert rule_ops > bp_ops > 0 and "dispatches_per_layer" not in rows["bp"]
    layers = 1  # the tiny MLP's output layer (the first one's input needs no gradient)
    assert rows["ldfa r=2"]["dispatches_per_layer"] == pytest.approx((rule_ops - bp_ops) / layers)
    by_phase = data["dispatches_by_phase"]["ldfa r=2"]
    assert sum(by_phase.values()) == rule_ops and by_phase["feedback_update"] > 0
    assert "dispatches: the ATen ops of one eager step" in " ".join(err.split())


def test_gap_floor_is_backprop_without_its_input_gradient_against_the_flops():
    from ldfa_cli.analysis.bench import gap_floor

    # backprop's input gradient: 20% of its time; a rule at 0.7x its FLOPs can at best take
    # 0.8x its time, so no work on the rule's own ops brings the gap below +0.1
    bp_ms = {"forward": 6.0, "input_grad": 2.0, "weight_grad": 2.0}
    assert gap_floor(bp_ms, flop_ratio=0.7) == pytest.approx(0.1)
    # W^T g at the step's average rate (20% of the time for 20% of the FLOPs removed, and
    # nothing added): the floor is 0
    assert gap_floor(bp_ms, flop_ratio=0.8) == pytest.approx(0.0)


def test_bench_times_compiled_steps_when_the_recipe_compiles(capsys, tmp_path, monkeypatch):
    # what the loop runs under train.compile=true; the phase table is left out, since the
    # phase timer cannot see inside a compiled graph (torch.compile itself is stood in for:
    # the Function's compilation has its own test)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    recipe = _tiny_recipe(tmp_path / "r.yaml")
    command = ["bench", recipe, "train.compile=reduce-overhead", "--ranks", "2", "--steps", "2",
               "--warmup", "0", "--device", "cpu", "--json"]  # fmt: skip
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    data = json.loads(out)
    assert data["compiled"] == "reduce-overhead"
    assert modes == ["reduce-overhead"] * 2  # backprop and r=2, not the twin
    assert "compiled (reduce-overhead)" in " ".join(err.split())
    assert data["phases_ms"] is None and data["gap_by_phase"] is None
    assert [r["variant"] for r in data["rows"]] == ["bp", "ldfa r=2"]
    assert "not measured for compiled steps" in " ".join(err.split())


def test_device_busy_time_counts_device_events_once():
    """The launching CPU op carries its kernel's device time too: only device events count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.profiler import profile

    from ldfa_cli.analysis.bench import device_busy_ms

    def event(device, ms):
        return SimpleNamespace(device_type=device, self_device_time_total=ms * 1e3)

    events = [event(DeviceType.CPU, 3.0), event(DeviceType.CUDA, 2.0),
              event(DeviceType.CUDA, 1.0), event(DeviceType.CPU, 0.0)]  # fmt: skip
    assert device_busy_ms(events, steps=2) == pytest.approx(1.5)
    with profile() as prof:  # a CPU-only profile: nothing ran on a device
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert device_busy_ms(prof.key_averages(), steps=1) == 0.0


def test_bench_steps_in_the_recipes_precision(tmp_path):
    # a GPU user's step runs under bf16 autocast: bench must time that step, not fp32's
    from ldfa_cli.analysis.bench import RepeatedStep, recipe_step
    from ldfa_cli.config import load_recipe
    from ldfa_cli.engine.build import synthetic_network
    from ldfa_cli.engine.optim import build_optimizers

    for precision, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        recipe, _ = load_recipe(str(_tiny_recipe(tmp_path / "r.yaml")),
                                [f"train.precision={precision}"])  # fmt: skip
        model, x, y = synthetic_network(recipe, 8, torch.device("cpu"))
        seen: list[torch.dtype] = []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        RepeatedStep(recipe_step(recipe, model, build_optimizers(recipe, model, 1)), x, y)()
        assert seen and set(seen) == {expected}


def test_phase_timer_files_each_op_under_its_phase():
    from ldfa_cli.analysis.bench import PhaseTimer
    from ldfa_cli.feedback import accounting

    timer = PhaseTimer(torch.device("cpu"))
    a = torch.ones(64, 64)
    with timer:
        a @ a  # outside any layer: the forward of '(other)'
        previous = accounting.enter("fc", "weight_grad")
        a @ a
        accounting.leave(previous)
        previous = accounting.enter("(optimizer)", "optimizer")
        a.add_(1)
        accounting.leave(previous)
        a.clone()  # no FLOPs: data movement
        previous = accounting.enter("fc", "input_grad")
        a.mul(a)  # charged as elementwise by the counter, and so by the timer
        accounting.leave(previous)
    assert set(timer.seconds) == {"forward", "weight_grad", "optimizer", "data movement",
                                  "elementwise (backward)"}  # fmt: skip
    assert not accounting.ACTIVE  # the markers are off again outside the timer


def test_u_curve_series_group_a_family_whatever_rank_its_recipe_is_named_for():
    from ldfa_cli.analysis.compute import series_of

    assert series_of("fmnist_vit_bp") == series_of("fmnist_vit_r8") == "fmnist_vit"
    assert series_of("fmnist_vit_r16") == "fmnist_vit"
    assert series_of("fmnist_vit_r16_authors") == series_of("fmnist_vit_bp_authors")
    assert series_of("fmnist_vit_r16_authors") == "fmnist_vit_authors"
    assert series_of("mlp_cifar10_bpx") == "mlp_cifar10_bpx"  # only whole name parts


def test_sweep_point_names_keep_dotted_values_whole():
    from ldfa_cli.cli.sweep_cmd import grid, point_name

    names = [point_name(p) for p in grid(["optimizer.lr=0.1,1.1", "schedule.milestones=[5,7.5]"])]
    assert names == ["lr=0.1_milestones=-5-7.5-", "lr=1.1_milestones=-5-7.5-"]
    assert point_name([]) == "base"


def test_runs_of_two_datasets_or_unreadable_runs_are_not_compared(capsys, tmp_path):
    bp = _fake_run(tmp_path, "bp", "bp", None, 0, [0.5, 0.8, 0.9])
    other = _fake_run(tmp_path, "other", "ldfa", 8, 0, [0.4, 0.7, 0.8])
    config = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"dataset": "text"}}))
    code, _, err = run_cli(capsys, "flops", bp, other)
    assert code == 2 and "2 datasets" in err and "give each its own command" in err
    (other / "env.json").write_text("{bad")  # only a label: the run is still read
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    assert run_cli(capsys, "flops", bp, other)[0] == 0
    (bp / "metrics.jsonl").write_bytes(b"\xff\xfe\n" + (bp / "metrics.jsonl").read_bytes())
    code, _, err = run_cli(capsys, "flops", bp)  # not UTF-8, before good lines: damaged
    assert code == 2 and "line 1 is not JSON" in err and "can be used" in err


@pytest.mark.parametrize(("args", "words"), [
    (["quickstart", "--plot", "c.png"], ["--plot", "run folders only"]),
    (["quickstart", "--metric", "bpc", "--target", "2"], ["--target, --metric"]),
    (["RUN", "--batch-size", "8"], ["--batch-size", "a recipe only"]),
])  # fmt: skip
def test_flops_refuses_options_of_the_other_mode(capsys, tmp_path, args, words):
    run = _fake_run(tmp_path, "run", "bp", None, 0, [0.5, 0.8, 0.9])
    args = [run if a == "RUN" else a for a in args]
    code, _, err = run_cli(capsys, "flops", *args)
    assert code == 2 and all(w in err for w in words), err


def test_plot_of_runs_without_evaluations_draws_nothing(capsys, tmp_path):
    run = _fake_run(tmp_path, "run", "bp", None, 0, [])
    code, _, err = run_cli(capsys, "plot", run, "--out", tmp_path / "c.png")
    assert code == 2 and "no" in err and "evaluation" in err
    assert not (tmp_path / "c.png").exists()
