"""Each rule's own update does what its equation says."""

import copy

import pytest
import torch

from ldfa_cli.feedback import LDFAConv2d, LDFALinear, feedback_loss
from ldfa_cli.feedback.normative import factorisation_loss
from ldfa_cli.feedback.rule import FeedbackConfigError, make_rule


def _principal_cosines(P: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between P's row space and basis's columns."""
    q_p, _ = torch.linalg.qr(P.t().double())
    q_b, _ = torch.linalg.qr(basis.double())
    return torch.linalg.svdvals(q_p.t() @ q_b)


def test_oja_finds_top_eigenspace_of_fixed_error_covariance():
    """Eq. 15 alone, driven by errors of a fixed covariance with known eigenvectors, puts
    P's rows onto the top-r eigenspace and makes them orthonormal (P P^T -> I)."""
    torch.manual_seed(0)
    m, r, n = 16, 3, 5
    eigvecs, _ = torch.linalg.qr(torch.randn(m, m))
    eigvals = torch.tensor([9.0, 6.0, 4.0] + [0.5] * (m - 3))
    root = eigvecs * eigvals.sqrt()  # C = root root^T
    layer = LDFALinear(n, m, rule="ldfa_local", rank=r)
    opt = torch.optim.SGD([layer.feedback_P], lr=0.05)
    for _ in range(600):
        x = torch.randn(256, n, requires_grad=True)
        errors = torch.randn(256, m) @ root.t() + 3.0  # a mean the rule must remove
        opt.zero_grad()
        layer(x).backward(errors)
        opt.step()
    P = layer.feedback_P.detach()
    assert _principal_cosines(P, eigvecs[:, :r]).min() > 0.99
    torch.testing.assert_close(P @ P.t(), torch.eye(r), atol=0.03, rtol=0)


def _oja_reference(P, g, decay):
    gc = g - g.mean(0)
    C = gc.t() @ gc
    gamma = C.diagonal().max()
    return -(P @ (C / gamma) @ (torch.eye(P.shape[1]) - P.t() @ P)) + decay * P


def test_oja_grad_equals_equation_with_explicit_covariance():
    layer = LDFALinear(7, 9, rule="ldfa_local", rank=4, decay=0.01)
    x = torch.randn(3, 5, 7, requires_grad=True)  # tokens: samples are batch x tokens
    g = torch.randn(3, 5, 9)
    layer(x).backward(g)
    expected = _oja_reference(layer.feedback_P.detach(), g.reshape(-1, 9), 0.01)
    torch.testing.assert_close(layer.feedback_P.grad, expected)


def test_oja_uses_centred_targets_at_output_layer():
    from ldfa_cli.feedback import convert, set_feedback_targets

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    convert(model, "ldfa_local", rank=2, use_targets=True)
    assert not model[0].rule.use_targets and model[2].rule.use_targets
    y = torch.tensor([0, 1, 3, 3, 2])
    set_feedback_targets(model, y)
    x = torch.randn(5, 6, requires_grad=True)
    model(x).sum().backward()
    onehot = torch.nn.functional.one_hot(y, 4).float()
    expected = _oja_reference(model[2].feedback_P.detach(), onehot, 0.0)
    torch.testing.assert_close(model[2].feedback_P.grad, expected)


def test_oja_conv_aggregates_over_batch_and_pixels():
    layer = LDFAConv2d(3, 6, 3, padding=1, rule="ldfa_local", rank=2)
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    rows = g.permute(0, 2, 3, 1).reshape(-1, 6)
    expected = _oja_reference(layer.feedback_P.detach(), rows, 0.0)
    torch.testing.assert_close(layer.feedback_P.grad, expected)


def _local_net(conv: bool, **options) -> torch.nn.Module:
    """Three layers with P of one shape (their outputs 8 wide), one alone, and a layer run
    twice; with ``conv`` a conv first."""
    from ldfa_cli.feedback import convert

    torch.manual_seed(0)
    nn = torch.nn
    shared = nn.Linear(8, 8)
    first = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.LazyLinear(8)) if conv else (
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8)))  # fmt: skip
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), shared, nn.Tanh(),
                          shared, nn.Tanh(), nn.Linear(8, 4))  # fmt: skip
    model(torch.zeros(1, 1, 4, 4))  # (the lazy layer's shape)
    convert(model, "ldfa_local", rank=3, **options)
    return model


@pytest.mark.parametrize(("conv", "options"), [
    (False, {}), (True, {"decay": 0.01, "use_targets": True}),
    (False, {"normalise": "std", "learn_q": True, "q_decay": 0.1})])  # fmt: skip
def test_oja_finished_after_the_backward_equals_oja_finished_in_it(conv, options):
    """The training step's backward keeps each layer's (P C, diag C) and finishes eq. 15
    after it, batched over layers whose P has one shape; every gradient equals the one
    that each layer's backward finishes itself (``.backward()`` alone)."""
    from ldfa_cli.feedback import backward_with_rules, set_feedback_targets

    model = _local_net(conv, **options)
    twin = copy.deepcopy(model)
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 4, (10,))
    for net in (model, twin):
        set_feedback_targets(net, y)
    backward_with_rules(model, torch.nn.functional.cross_entropy(model(x), y))
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    pairs = zip(model.named_parameters(), twin.parameters(), strict=True)
    for (name, p), q in pairs:
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_the_step_s_backward_keeps_oja_s_statistics_and_no_p_gradient():
    """Within :func:`~ldfa_cli.feedback.deferred.collecting`, a layer's backward leaves P
    without a gradient and keeps (P C, diag C, samples) of its centred error, C never
    divided by the samples; a statistic no after-backward work takes is an error."""
    from ldfa_cli.feedback import deferred

    layer = LDFALinear(7, 9, rule="ldfa_local", rank=4)
    x, g = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 9)
    with pytest.raises(RuntimeError, match="update was lost"), deferred.collecting():
        layer(x).backward(g)
        assert layer.feedback_P.grad is None
        ((pc, diag, samples),) = deferred.take(layer)
        layer(x).backward(g)  # kept again, and left
    rows = g.reshape(-1, 9)
    centred = rows - rows.mean(0)
    torch.testing.assert_close(pc, layer.feedback_P.detach() @ centred.t() @ centred)
    torch.testing.assert_close(diag, (centred * centred).sum(0))
    assert samples == 15
    assert deferred.take(layer) == []  # outside the block nothing is kept


def test_hebbian_q_equals_h_transpose_g_p_summed_over_batch():
    """Eq. 18: Q.grad = h^T (g P^T) + lambda Q."""
    layer = LDFALinear(7, 9, rule="ldfa_local", rank=3, learn_q=True, q_decay=0.1)
    x = torch.randn(11, 7, requires_grad=True)
    g = torch.randn(11, 9)
    layer(x).backward(g)
    Q, P = layer.feedback_Q.detach(), layer.feedback_P.detach()
    expected = x.detach().t() @ (g @ P.t()) + 0.1 * Q
    torch.testing.assert_close(layer.feedback_Q.grad, expected)


def test_hebbian_q_conv_is_the_conv_weight_gradient_of_the_projected_error():
    layer = LDFAConv2d(3, 6, 3, stride=2, padding=1, rule="ldfa_local", rank=2, learn_q=True)
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    z = torch.nn.functional.conv2d(g, layer.feedback_P.detach()[:, :, None, None])
    expected = torch.nn.grad.conv2d_weight(
        x.detach(), layer.feedback_Q.shape, z, stride=2, padding=1
    )
    torch.testing.assert_close(layer.feedback_Q.grad, expected)


def test_fixed_rules_learn_nothing():
    for rule in ("fa", "lowrank_fa"):
        layer = LDFALinear(5, 4, rule=rule, rank=2)
        assert not any(n.startswith("feedback_") for n, _ in layer.named_parameters())
        assert any(n.startswith("feedback_") for n, _ in layer.named_buffers())


def test_kp_grad_is_weight_grad_plus_decay():
    layer = LDFALinear(5, 4, rule="kp", decay=0.3)
    x = torch.randn(6, 5, requires_grad=True)
    layer(x).backward(torch.randn(6, 4))
    B = layer.feedback_B.detach()
    torch.testing.assert_close(layer.feedback_B.grad, layer.weight.grad + 0.3 * B)


def test_kp_feedback_approaches_weight_transpose_under_decay():
    """Eq. 2: with the same step and decay, B - W^T shrinks by (1 - eta lambda) per step."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        LDFALinear(6, 8, rule="kp", decay=0.1),
        torch.nn.Tanh(),
        LDFALinear(8, 3, rule="kp", decay=0.1),
    )
    lr, lam = 0.05, 0.1
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    others = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": lam}, {"params": others}], lr=lr)
    layer = model[2]
    start = (layer.feedback_B - layer.weight).norm().item()
    steps = 200
    for _ in range(steps):
        x = torch.randn(16, 6, requires_grad=True)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = (layer.feedback_B - layer.weight).norm().item()
    assert end == pytest.approx(start * (1 - lr * lam) ** steps, rel=1e-3)
    assert end < 0.4 * start


def test_factorisation_loss_matches_autograd_of_the_plain_formula():
    for layer in (LDFALinear(9, 7, rule="ldfa", rank=3), LDFAConv2d(4, 6, 3, rule="ldfa", rank=5)):
        loss = factorisation_loss(layer)
        loss.backward()
        got = (layer.feedback_Q.grad.clone(), layer.feedback_P.grad.clone())
        layer.zero_grad()
        Qm = layer.ops.q_rows(layer.feedback_Q).t()  # N x r
        w_transpose = layer.weight.detach().reshape(layer.fan_out, -1).t()
        plain = 0.5 * (Qm @ layer.feedback_P - w_transpose).pow(2).sum()
        plain.backward()
        torch.testing.assert_close(loss, plain.detach())
        torch.testing.assert_close(got[0], layer.feedback_Q.grad)
        torch.testing.assert_close(got[1], layer.feedback_P.grad)
        assert layer.weight.grad is None  # W is detached in eq. 8


def test_normative_descent_is_eq_9():
    """-P.grad = Q^T (W^T - QP) and -Q.grad = (W^T - QP) P^T."""
    layer = LDFALinear(6, 5, rule="ldfa", rank=2)
    feedback_loss(layer).backward()
    Q, P, W = layer.feedback_Q.detach(), layer.feedback_P.detach(), layer.weight.detach()
    E = W.t() - Q @ P
    torch.testing.assert_close(-layer.feedback_P.grad, Q.t() @ E)
    torch.testing.assert_close(-layer.feedback_Q.grad, E @ P.t())


@pytest.mark.parametrize(
    "make",
    [
        lambda: LDFALinear(20, 14, rule="ldfa", rank=4),
        lambda: LDFAConv2d(3, 10, 3, rule="ldfa", rank=4),
    ],
)
def test_normative_updates_reach_best_rank_r_approximation(make):
    """Eckart-Young: ||QP - W^T|| tends to sqrt(sum of the discarded sigma_i^2)."""
    torch.manual_seed(5)
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    w_rows = layer.weight.detach().reshape(layer.fan_out, -1)
    s = torch.linalg.svdvals(w_rows)
    optimum = s[layer.rank :].pow(2).sum().sqrt()
    opt = torch.optim.Adam([layer.feedback_Q, layer.feedback_P], lr=0.01)
    for _ in range(3000):
        opt.zero_grad()
        feedback_loss(layer).backward()
        opt.step()
    Qm = layer.ops.q_rows(layer.feedback_Q).t().detach()
    residual = (Qm @ layer.feedback_P.detach() - w_rows.t()).norm()
    assert residual <= optimum * 1.01


@pytest.mark.parametrize(
    "make",
    [
        lambda: LDFALinear(9, 7, rule="ldfa", rank=3),
        lambda: LDFALinear(9, 7, rule="ldfa", rank=3, bias=False),
        lambda: LDFAConv2d(4, 6, 3, rule="ldfa", rank=5),
        lambda: LDFAConv2d(4, 6, 3, groups=2, rule="ldfa", rank=2),
    ],
)
def test_normative_update_equals_autograd_through_the_loss(make):
    """The training loop's eq.-9 update, written into .grad directly, is exactly the
    gradient of eq. 8 by autograd, added to what .grad already holds."""
    from ldfa_cli.feedback.normative import normative_update

    torch.manual_seed(3)
    layer = make().double()
    feedback_loss(layer).backward()
    expected = [layer.feedback_Q.grad.clone(), layer.feedback_P.grad.clone()]
    layer.zero_grad(set_to_none=True)
    assert normative_update(layer) == 1
    for factor, want in zip((layer.feedback_Q, layer.feedback_P), expected, strict=True):
        torch.testing.assert_close(factor.grad, want, rtol=1e-12, atol=1e-12)
        assert factor.grad.shape == factor.shape and factor.grad.is_contiguous()
    normative_update(layer)  # accumulates, like a second backward
    torch.testing.assert_close(layer.feedback_P.grad, 2 * expected[1], rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None


@pytest.mark.parametrize("batched", [False, True])
def test_sqrt_rank_divides_eq_9_by_the_root_of_the_layer_s_rank(batched):
    """The authors' newest LDFA_Linear: both factors' gradients over sqrt(r), on every path
    (layer by layer, batched, and autograd through eq. 8)."""
    from ldfa_cli.feedback.normative import normative_update

    torch.manual_seed(3)
    plain = torch.nn.Sequential(*(LDFALinear(9, 9, rule="ldfa", rank=4) for _ in range(2)))
    plain = plain.double()
    scaled = copy.deepcopy(plain)
    for layer in scaled:
        layer.rule = make_rule(layer.rule, sqrt_rank=True)
    normative_update(plain, batched=batched)
    normative_update(scaled, batched=batched)
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(b.feedback_Q.grad, a.feedback_Q.grad / 2.0)  # sqrt(4)
        torch.testing.assert_close(b.feedback_P.grad, a.feedback_P.grad / 2.0)
        expected = b.feedback_P.grad.clone()
        b.zero_grad(set_to_none=True)
        feedback_loss(b).backward()
        torch.testing.assert_close(b.feedback_P.grad, expected)


def test_normative_update_gives_each_factor_a_grad_in_its_own_layout():
    """A channels_last model's Q is channels_last: its eq.-9 grad must be too, or the fused
    AdamW the optimizers use (which steps param and grad memory in lockstep) moves the
    wrong elements. The fused step must equal the plain for-loop AdamW's."""
    from ldfa_cli.feedback.normative import normative_update

    torch.manual_seed(4)
    model = torch.nn.Sequential(LDFAConv2d(3, 8, 3, rule="ldfa", rank=2),
                                LDFAConv2d(8, 6, 3, rule="ldfa", rank=3))  # fmt: skip
    model = model.to(memory_format=torch.channels_last)
    factors = {}
    for fused in (True, False):
        twin = copy.deepcopy(model)
        params = [p for n, p in twin.named_parameters() if "feedback" in n]
        assert not params[0].is_contiguous()  # Q is channels_last
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused, foreach=False)
        normative_update(twin)
        assert all(p.grad.stride() == p.stride() for p in params)
        optimizer.step()
        factors[fused] = params
    for a, b in zip(factors[True], factors[False], strict=True):
        torch.testing.assert_close(a, b)


def test_normative_update_respects_interval():
    from ldfa_cli.feedback.normative import normative_update

    model = torch.nn.Sequential(
        LDFALinear(4, 4, rule="ldfa", rank=2, interval=3),
        LDFALinear(4, 4, rule="ldfa", rank=2, interval=2),
    )
    assert normative_update(model, step=1) == 0
    assert all(p.grad is None for n, p in model.named_parameters() if "feedback" in n)
    assert normative_update(model, step=3) == 1
    assert model[0].feedback_P.grad is not None and model[1].feedback_P.grad is None
    assert normative_update(model, step=6) == 2


def _alike_model():
    """Layers that batch (three 6->6 Linears, two 3x3 convs) beside ones that cannot (a
    Linear of its own shape, a grouped conv)."""
    return torch.nn.ModuleDict({
        "a": LDFALinear(6, 6, rule="ldfa", rank=2), "b": LDFALinear(6, 6, rule="ldfa", rank=2),
        "c": LDFALinear(6, 6, rule="ldfa", rank=2), "d": LDFALinear(6, 5, rule="ldfa", rank=2),
        "e": LDFAConv2d(4, 6, 3, rule="ldfa", rank=3),
        "f": LDFAConv2d(4, 6, 3, rule="ldfa", rank=3),
        "g": LDFAConv2d(4, 6, 3, groups=2, rule="ldfa", rank=2),
    })  # fmt: skip


def test_batched_normative_update_equals_the_layer_by_layer_one():
    """The GPU path (layers of one shape stacked into batched products) gives each layer
    exactly the gradient of its own eq. 8, and accumulates like the per-layer path."""
    from ldfa_cli.feedback.normative import _alike_layers, normative_layers, normative_update

    torch.manual_seed(5)
    model = _alike_model().double()
    runs = _alike_layers(list(normative_layers(model)))
    assert sorted(len(run) for run in runs) == [1, 1, 2, 3]  # a-c, e-f; d and g alone
    feedback_loss(model).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if "feedback" in n}
    model.zero_grad(set_to_none=True)
    assert normative_update(model, batched=True) == 7
    for name, param in model.named_parameters():
        if "feedback" in name:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-12, atol=1e-12)
            assert param.grad.shape == param.shape and param.grad.is_contiguous()
        else:
            assert param.grad is None
    normative_update(model, batched=True)
    torch.testing.assert_close(model["b"].feedback_Q.grad, 2 * expected["b.feedback_Q"])


def test_normative_update_batches_where_asked_or_where_it_pays(monkeypatch):
    from ldfa_cli.feedback import normative

    calls = []
    monkeypatch.setattr(normative, "_update_alike", lambda layers: calls.append(len(layers)))
    model = _alike_model()
    assert normative.normative_update(model, batched=False) == 7 and calls == []
    assert normative.normative_update(model) == 7 and sorted(calls) == [2, 3]  # small Ws
    calls.clear()
    monkeypatch.setattr(normative, "_worth_batching", lambda layer: False)  # as for large
    assert normative.normative_update(model) == 7 and calls == []
    assert normative.normative_update(model, step=0, batched=True) == 7
    assert sorted(calls) == [2, 3]
    model["b"] = LDFALinear(6, 6, rule="ldfa", rank=2, interval=2)
    calls.clear()
    assert normative.normative_update(model, step=1, batched=True) == 6
    assert sorted(calls) == [2, 2]  # b not due: a and c still batch


def test_the_rule_s_batched_option_decides_where_the_call_does_not(monkeypatch):
    from ldfa_cli.feedback import normative

    calls = []
    monkeypatch.setattr(normative, "_update_alike", lambda layers: calls.append(len(layers)))
    model = torch.nn.ModuleDict({name: LDFALinear(6, 6, rule="ldfa", rank=2, batched=True)
                                 for name in "abc"})  # fmt: skip
    assert normative.normative_update(model) == 3 and calls == [3]  # on the CPU
    assert normative.normative_update(model, batched=False) == 3 and calls == [3]
    with pytest.raises(FeedbackConfigError):
        LDFALinear(6, 6, rule="ldfa", rank=2, batched="yes")


def test_normative_update_batches_by_default_off_the_cpu_and_small_weights_on_it():
    from types import SimpleNamespace

    from ldfa_cli.feedback.normative import CPU_BATCHED_MAX_ELEMENTS, _worth_batching

    def on(device, rows):
        return SimpleNamespace(weight=torch.empty(rows, 256, device=device))

    assert CPU_BATCHED_MAX_ELEMENTS == 256 * 256
    assert _worth_batching(on("meta", 4096)) and _worth_batching(on("cpu", 256))
    assert not _worth_batching(on("cpu", 257))


def test_batched_normative_update_counts_the_same_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from ldfa_cli.feedback.normative import normative_update

    totals = []
    for batched in (False, True):
        with FlopCounterMode(display=False) as counter:
            normative_update(_alike_model(), batched=batched)
        totals.append(counter.get_total_flops())
    assert totals[0] > 0 and totals[0] == totals[1]


def test_feedback_loss_respects_interval():
    model = torch.nn.Sequential(
        LDFALinear(4, 4, rule="ldfa", rank=2, interval=3),
        LDFALinear(4, 4, rule="ldfa", rank=2, interval=2),
    )
    assert feedback_loss(model, step=1) is None
    single = feedback_loss(model[0]).detach()
    torch.testing.assert_close(feedback_loss(model, step=3).detach(), single)
    both = feedback_loss(model[0]).detach() + feedback_loss(model[1]).detach()
    torch.testing.assert_close(feedback_loss(model, step=6).detach(), both)


def test_svd_reset_only_when_asked():
    from ldfa_cli.feedback import reset_due

    layer = LDFALinear(6, 5, rule="ldfa", rank=5, reset_svd_every=4)
    assert reset_due(layer, step=3) == 0
    assert reset_due(layer, step=4) == 1
    torch.testing.assert_close(
        layer.feedback_Q @ layer.feedback_P, layer.weight.t(), atol=1e-5, rtol=1e-5
    )
    assert reset_due(LDFALinear(6, 5, rule="ldfa", rank=2), step=4) == 0
