"""Grouped and depthwise convolutions and Conv1d in every rule with a feedback pathway:
exact at full rank, each per-group update equal to its equation per group, FLOPs per group."""

import copy

import pytest
import torch
from torch import nn

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.feedback import conversion_report, convert, feedback_layers, feedback_loss
from ldfa_cli.feedback.layers import LDFAConv1d, LDFAConv2d
from ldfa_cli.measure.flops import PHASES
from tests.helpers import analytic
from tests.test_feedback_exactness import _assert_same_grads
from tests.test_feedback_rules import _oja_reference


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _grouped_net(groups=2, dims=2, bias=True):
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.Tanh(),
                         conv(8, 6, 3, padding=1, groups=groups, bias=bias), nn.Tanh(),
                         conv(6, 4, 1))  # fmt: skip


@pytest.mark.parametrize(("groups", "dims"), [(2, 2), (2, 1), (1, 1)])
def test_full_rank_svd_grouped_and_1d_convs_give_backprop(float64, groups, dims):
    ref = _grouped_net(groups, dims)
    x = torch.randn(2, 3, *([7, 6] if dims == 2 else [9]))
    conv = convert(copy.deepcopy(ref), "ldfa", init="svd", example_input=x, force_grouped=True)
    rows = {r.name: r for r in conversion_report(conv).rows}
    assert rows["2"].note == "converted" and rows["2"].groups == groups
    assert rows["2"].rank == min(6 // groups, 8 // groups * 3**dims)
    _assert_same_grads(ref, conv, x)


def test_depthwise_is_kept_unless_forced_and_then_exact(float64):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Tanh(),
                        nn.Conv2d(6, 3, 1))  # fmt: skip
    x = torch.randn(2, 2, 5, 5)
    kept = convert(copy.deepcopy(ref), "ldfa", rank=8, example_input=x)
    note = {r.name: r.note for r in conversion_report(kept).rows}["2"]
    assert note.startswith("kept: depthwise, its transpose is already cheaper than rank 1")
    forced = convert(copy.deepcopy(ref), "ldfa", init="svd", example_input=x, force_grouped=True)
    assert forced[2].rank == 1 and forced[2].total_rank == 6
    _assert_same_grads(ref, forced, x)


def test_oja_and_hebbian_per_group_equal_their_equations_group_by_group():
    groups = 2
    layer = LDFAConv2d(4, 6, 3, padding=1, groups=groups, rule="ldfa_local", rank=2,
                       learn_q=True)  # fmt: skip
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    P = layer.feedback_P.detach()  # (groups * 2) x 3
    for j in range(groups):
        rows = g[:, 3 * j : 3 * (j + 1)].permute(0, 2, 3, 1).reshape(-1, 3)
        expected = _oja_reference(P[2 * j : 2 * (j + 1)], rows, 0.0)
        torch.testing.assert_close(layer.feedback_P.grad[2 * j : 2 * (j + 1)], expected)
    # Hebbian Q (eq. 18): the weight gradient of the grouped n -> r conv Q at z = P g
    z = nn.functional.conv2d(g, P[:, :, None, None], groups=groups)
    expected_q = torch.nn.grad.conv2d_weight(x.detach(), layer.feedback_Q.shape, z, padding=1,
                                             groups=groups)  # fmt: skip
    torch.testing.assert_close(layer.feedback_Q.grad, expected_q)
    # the input gradient: Q (P g) per group, a block-diagonal B^T
    dense = torch.cat([P[2 * j : 2 * (j + 1)].t() @ layer.feedback_Q.detach()[2 * j : 2 * (j + 1)]
                       .reshape(2, -1) for j in range(groups)]).reshape(6, 2, 3, 3)  # fmt: skip
    expected_x = torch.nn.grad.conv2d_input(x.shape, dense, g, padding=1, groups=groups)
    torch.testing.assert_close(x.grad, expected_x)


def test_factorisation_loss_is_the_sum_over_groups():
    layer = LDFAConv2d(4, 6, 3, groups=2, rule="ldfa", rank=2)
    W = layer.weight.detach()
    Q, P = layer.feedback_Q.detach(), layer.feedback_P.detach()
    expected = 0.0
    for j in range(2):
        qp = Q[2 * j : 2 * (j + 1)].reshape(2, -1).t() @ P[2 * j : 2 * (j + 1)]  # N x m_g
        expected += 0.5 * (qp - W[3 * j : 3 * (j + 1)].reshape(3, -1).t()).square().sum()
    torch.testing.assert_close(feedback_loss(layer), expected)
    feedback_loss(layer).backward()  # eq. 9 per group: descent reaches each W_j^T's rank-2 part
    assert layer.feedback_P.grad.shape == P.shape and layer.feedback_Q.grad.shape == Q.shape


@pytest.mark.parametrize("rule", ["ldfa", "ldfa_local", "lowrank_fa", "fa", "kp"])
def test_grouped_and_1d_flops_measured_equal_analytic(rule):
    torch.manual_seed(0)
    options = {"rank": 1} if rule not in ("fa", "kp") else {}
    for dims in (1, 2):
        head = _Head(_grouped_net(2, dims))
        x, y = torch.randn(2, 3, *([6, 6] if dims == 2 else [10])), torch.randint(0, 4, (2,))
        convert(head, rule, example_input=x, force_grouped=True, **options)
        report = flops_report(head, x, y)
        layers = dict(feedback_layers(head))
        assert layers["body.2"].groups == 2
        checked = 0
        for row in report.layers:
            if row["layer"] in layers:
                expected = analytic(layers[row["layer"]], row["samples"])
                for phase in PHASES:
                    assert row[phase] == expected[phase], (dims, row["layer"], phase)
                checked += 1
        assert checked == len(layers) == 2 and not report.warnings


class _Head(nn.Module):
    """A conv body pooled to logits, for a loss."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).flatten(2).mean(-1)


def test_bias_free_channels_last_and_compile_keep_working_for_grouped_convs():
    torch.manual_seed(0)
    layer = LDFAConv2d(4, 8, 3, padding=1, groups=4, bias=False, rule="ldfa_local", rank=1)
    x = torch.randn(2, 4, 6, 6)
    eager = copy.deepcopy(layer)
    xs = [x.clone().requires_grad_(True), x.to(memory_format=torch.channels_last)]
    xs[1].requires_grad_(True)
    eager(xs[0]).sum().backward()
    layer(xs[1]).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    compiled = torch.compile(copy.deepcopy(eager), backend="eager", fullgraph=True)
    xc = x.clone().requires_grad_(True)
    compiled(xc).sum().backward()
    torch.testing.assert_close(xc.grad, xs[0].grad)


def test_conv1d_layer_sends_its_factorised_feedback():
    layer = LDFAConv1d(3, 5, 3, stride=2, padding=1, rule="lowrank_fa", rank=2)
    x = torch.randn(2, 3, 11, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    dense = torch.einsum("rm,rnk->mnk", layer.feedback_P, layer.feedback_Q)
    expected = torch.nn.grad.conv1d_input(x.shape, dense, g, stride=2, padding=1)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_a_convs_backward_costs_twice_its_forward_whatever_its_groups(groups):
    """Input and weight gradient each repeat the forward's multiply-adds (PyTorch's own
    formula charges a grouped weight gradient g times over)."""
    from ldfa_cli.measure.flops import PhaseFlopCounter

    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with PhaseFlopCounter() as counter:
        out = conv(x)
        forward = counter.counts[("(other)", "forward")]
        out.sum().backward()
    assert forward == 2 * 2 * 16 * 25 * (8 // groups) * 9
    assert counter.counts[("(other)", "backward")] == 2 * forward


def test_a_conv_that_pads_otherwise_than_zeros_is_kept_with_its_reason():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 2, 1))  # fmt: skip
    convert(model, "ldfa", rank=2, example_input=torch.randn(1, 2, 6, 6))
    notes = {r.name: r.note for r in conversion_report(model).rows}
    assert "reflect" in notes["1"] and notes["2"] == "converted"
