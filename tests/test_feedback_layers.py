"""Layer plumbing: FLOPs, shapes, autocast, torch.compile, state_dict, conversion, errors."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldfa_cli.feedback import (
    RULES,
    FeedbackConfigError,
    LDFAConv2d,
    LDFALinear,
    alignment_diagnostics,
    conversion_report,
    convert,
    feedback_parameters,
    forward_parameters,
)


def _backward_flops(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.randn_like(out)
    with FlopCounterMode(display=False) as counter:
        out.backward(g)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [(64, 48), (4, 16, 48)])
def test_linear_backward_flops_are_weight_grad_plus_thin_feedback(shape):
    n, m, r = 48, 40, 6
    layer = LDFALinear(n, m, rule="ldfa", rank=r)
    T = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    assert _backward_flops(layer, torch.randn(*shape)) == 2 * T * n * m + 2 * T * r * (n + m)


def test_linear_backprop_flops_for_comparison():
    n, m, T = 48, 40, 64
    assert _backward_flops(nn.Linear(n, m), torch.randn(T, n)) == 2 * 2 * T * n * m


def test_oja_and_hebbian_flops():
    n, m, r, T = 48, 40, 6, 64
    layer = LDFALinear(n, m, rule="ldfa_local", rank=r, learn_q=True)
    oja = 2 * T * r * m + 2 * 2 * r * r * m  # z_c^T g, then (PC P^T) P
    hebbian = 2 * T * n * r
    expected = 2 * T * n * m + 2 * T * r * (n + m) + oja + hebbian
    assert _backward_flops(layer, torch.randn(T, n)) == expected


def test_conv_backward_flops_are_weight_grad_plus_factorised_feedback():
    n, m, k, r = 8, 12, 3, 4
    layer = LDFAConv2d(n, m, k, stride=2, padding=1, rule="ldfa", rank=r)
    x = torch.randn(2, n, 16, 16)
    pixels = 2 * 8 * 8  # batch x output pixels
    expected = 2 * pixels * m * n * k * k + 2 * pixels * (r * m + r * n * k * k)
    assert _backward_flops(layer, x) == expected


def test_bias_false_and_token_inputs():
    layer = LDFALinear(8, 5, bias=False, rule="ldfa_local", rank=2)
    x = torch.randn(3, 7, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, 7, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.bias is None
    assert layer.feedback_P.grad is not None


@pytest.mark.parametrize("rule", ["fa", "ldfa", "ldfa_local"])
def test_bf16_autocast_on_cpu(rule):
    model = nn.Sequential(
        LDFAConv2d(3, 6, 3, padding=1, rule=rule, rank=2),
        nn.ReLU(),
        nn.Flatten(),
        LDFALinear(6 * 8 * 8, 5, rule=rule, rank=3),
    )
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    target = torch.randn(4, 5)  # a varying error, so Oja's centred covariance is not zero
    (out.float() * target).sum().backward()
    (ref(x.detach().requires_grad_(True)) * target).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if rule == "ldfa" and "feedback_" in name:
            continue  # the normative factors learn from feedback_loss, not from backward
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0) > 0.98


def test_channels_last_input():
    layer = LDFAConv2d(4, 6, 3, padding=1, rule="ldfa_local", rank=2, learn_q=True)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 4, 7, 7)
    xs = [x.clone().requires_grad_(True), x.to(memory_format=torch.channels_last)]
    xs[1].requires_grad_(True)
    layer(xs[1]).sum().backward()
    ref(xs[0]).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for a, b in zip(layer.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_on_cpu_matches_eager():
    torch.manual_seed(0)
    model = convert(
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)),
        "ldfa_local",
        rank=4,
        learn_q=True,
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x = torch.randn(8, 6)
    compiled(x).pow(2).sum().backward()
    eager(x).pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_round_trip_keeps_standard_keys():
    model = convert(
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), "ldfa_local", rank=2
    )
    state = model.state_dict()
    assert {"0.weight", "0.bias", "2.weight", "2.bias", "2.feedback_P", "2.feedback_Q"} <= set(
        state
    )
    fresh = convert(
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), "ldfa_local", rank=2
    )
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert isinstance(fresh[2], nn.Linear)


def test_conversion_report_contents_and_parameter_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    x = torch.randn(2, 3, 6, 6)
    convert(model, "ldfa", rank=0.25, ranks={"4": 3}, example_input=x)
    rows = {r.name: r for r in conversion_report(model).rows}
    assert rows["0"].note == "kept: its input needs no gradient" and rows["0"].rule == "bp"
    assert (rows["2"].rule, rows["2"].n, rows["2"].m, rows["2"].rank) == ("ldfa", 8, 16, 4)
    assert (rows["4"].kind, rows["4"].rank, rows["4"].full_rank) == ("Linear", 3, 10)
    assert len(conversion_report(model).converted) == 2
    fb = feedback_parameters(model)
    assert len(fb) == 4
    assert {id(p) for p in fb}.isdisjoint(id(p) for p in forward_parameters(model))
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(conversion_report(model).table())
    assert "kept: its input needs no gradient" in console.export_text()


def test_include_exclude_and_per_layer_rank():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    convert(model, "lowrank_fa", rank=5, include=["1", "2"], exclude=["2"])
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert model[1].rank == 5 and model[1].rule.name == "lowrank_fa"


def test_rank_clipped_to_full_rank_and_fraction():
    assert LDFALinear(32, 10, rule="ldfa", rank=24).rank == 10
    assert LDFALinear(32, 64, rule="ldfa", rank=0.125).rank == 8
    assert LDFAConv2d(2, 64, 3, rule="ldfa", rank=64).rank == 18  # min(m, n k^2)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: convert(nn.Linear(3, 3), "dfaa"), ["unknown rule 'dfaa'", "ldfa_local"]),
        (lambda: convert(nn.Sequential(nn.Linear(3, 9)), "ldfa", rank=0), ["'0'", "m=9", ">= 1"]),
        (lambda: convert(nn.Sequential(nn.Linear(3, 9)), "ldfa", rank=1.5), ["'0'", "(0, 1]"]),
        (lambda: convert(nn.Linear(3, 3), "ldfa", init="nope"), ["init must be one of", "svd"]),
        (lambda: convert(nn.Linear(3, 3), "ldfa", warmup=3), ["no option 'warmup'", "interval"]),
        (lambda: convert(nn.Linear(3, 3), "ldfa", include=["nothing"]), ["no Linear"]),
        (lambda: LDFALinear(3, 3, rule="kp", decay=-1.0), ["decay must be >= 0"]),
    ],
)
def test_bad_input_gets_one_line_errors(call, words):
    with pytest.raises(FeedbackConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_every_rule_is_registered():
    assert set(RULES) >= {"bp", "fa", "kp", "lowrank_fa", "ldfa", "ldfa_local"}


def test_diagnostics_exact_for_full_rank_svd_and_not_for_fa():
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)
    )
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    exact = convert(copy.deepcopy(base), "ldfa", init="svd", example_input=x)
    rows = alignment_diagnostics(exact, x, y)
    assert [r["name"] for r in rows] == ["2", "4"]
    for r in rows:
        assert r["rel_error"] < 1e-5 and r["angle_deg"] < 0.1
        assert r["grad_cosine"] == pytest.approx(1.0, abs=1e-5)
    fa = convert(copy.deepcopy(base), "fa", example_input=x)
    rows = alignment_diagnostics(fa, x, y)
    assert all(r["grad_cosine"] < 0.9 and r["angle_deg"] > 30 for r in rows)
    assert all(p.grad is None for p in fa.parameters())
