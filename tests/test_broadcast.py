"""dfa and dldfa (eq. 17): gradients equal a hand computation, no W^T anywhere in the
backward, Oja on the source error, dense and per-pixel maps, FLOPs."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ldfa_cli.analysis.flops import flops_report
from ldfa_cli.feedback import FeedbackConfigError, conversion_report, convert, feedback_layers
from tests.helpers import analytic
from tests.test_feedback_rules import _oja_reference


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _forward_backward(model, x, target):
    out = model(x)
    loss = ((out - target) ** 2).sum() / 2
    loss.backward()
    return out


@pytest.mark.parametrize("rule", ["dfa", "dldfa"])
def test_output_broadcast_equals_hand_computation_of_eq_17(rule):
    model, x, target = _mlp(), torch.randn(7, 4), torch.randn(7, 3)
    convert(model, rule, rank=2, example_input=x)
    rows = {r.name: r for r in conversion_report(model).rows}
    assert rows["0"].rule == "bp" and rows["2"].rule == rows["4"].rule == rule
    out = _forward_backward(model, x, target)
    e = out.detach() - target  # dL/d output, the source error

    def feedback(layer):  # the layer's map from e to its input: B, or Q P
        if rule == "dfa":
            return layer.feedback_B
        return layer.feedback_Q @ layer.feedback_P.detach()

    h1 = torch.tanh(model[0](x)).detach()
    h2 = torch.tanh(model[2](h1)).detach()
    delta2 = (e @ feedback(model[4]).t()) * (1 - h2**2)  # eq. 17 for fc2's output
    delta1 = (e @ feedback(model[2]).t()) * (1 - h1**2)  # eq. 17 for fc1's output
    torch.testing.assert_close(model[4].weight.grad, e.t() @ h2)
    torch.testing.assert_close(model[2].weight.grad, delta2.t() @ h1)
    torch.testing.assert_close(model[0].weight.grad, delta1.t() @ x)
    if rule == "dldfa":  # Oja (eq. 15) on the source error
        for i in (2, 4):
            expected = _oja_reference(model[i].feedback_P.detach(), e, 0.0)
            torch.testing.assert_close(model[i].feedback_P.grad, expected)


def test_penultimate_broadcast_trains_the_last_layer_normally():
    model, x, target = _mlp(), torch.randn(7, 4), torch.randn(7, 3)
    convert(model, "dldfa", rank=2, source="penultimate", example_input=x)
    rows = {r.name: r for r in conversion_report(model).rows}
    assert rows["4"].rule == "bp" and "after the broadcast source" in rows["4"].note
    out = _forward_backward(model, x, target)
    h1 = torch.tanh(model[0](x)).detach()
    h2 = torch.tanh(model[2](h1)).detach()
    e_out = out.detach() - target
    source = (e_out @ model[4].weight.detach()) * (1 - h2**2)  # backprop to fc2's output
    B = model[2].feedback_Q @ model[2].feedback_P.detach()
    delta1 = (source @ B.t()) * (1 - h1**2)
    torch.testing.assert_close(model[2].weight.grad, source.t() @ h1)
    torch.testing.assert_close(model[0].weight.grad, delta1.t() @ x)


class _WeightWatch(TorchDispatchMode):
    """Records, for every op that reads one of the given tensors' storage, which tensor
    (its index) and the op."""

    def __init__(self, tensors):
        super().__init__()
        self.index = {t.untyped_storage().data_ptr(): i for i, t in enumerate(tensors)}
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in args:
            if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.index:
                self.hits.append((self.index[a.untyped_storage().data_ptr()], str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", ["dfa", "dldfa"])
def test_no_weight_is_touched_in_the_backward(rule):
    model, x = _mlp(), torch.randn(7, 4)
    convert(model, rule, rank=2, example_input=x)
    weights = [layer.weight for _, layer in feedback_layers(model)]
    loss = model(x).pow(2).sum()
    with _WeightWatch(weights) as watch:
        loss.backward()
    assert watch.hits == []
    # the check can fail: backprop reads every weight in its backward
    plain = _mlp()
    loss = plain(x).pow(2).sum()
    with _WeightWatch([plain[2].weight, plain[4].weight]) as watch:
        loss.backward()
    # (whichever aten op a torch version computes g @ W with)
    assert {index for index, _ in watch.hits} == {0, 1}


def _vgg_like():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def _retina_like():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2),
                         nn.ReLU(), nn.Conv2d(2, 6, 5, padding=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 4))  # fmt: skip


@pytest.mark.parametrize("rule", ["dfa", "dldfa"])
def test_conv_layers_dense_and_per_pixel_maps(rule):
    vgg, x = _vgg_like(), torch.randn(3, 3, 8, 8)
    convert(vgg, rule, rank=3, example_input=x)  # from the logits: a dense map to the map
    assert not vgg[2].rule.pixel and vgg[2].rule.input_shape == (4, 8, 8)
    vgg(x).pow(2).sum().backward()
    assert vgg[0].weight.grad.abs().sum() > 0
    retina, x = _retina_like(), torch.randn(3, 1, 8, 8)
    convert(retina, rule, rank=2, source="4", include=["2"], example_input=x)
    assert retina[2].rule.pixel and retina[2].rule.source_shape == (6, 8, 8)
    retina(x).pow(2).sum().backward()
    assert retina[0].weight.grad.abs().sum() > 0  # the retina learned from the VVS error


@pytest.mark.parametrize("rule", ["dfa", "dldfa"])
@pytest.mark.parametrize("make", [_mlp, _vgg_like])
def test_broadcast_flops_measured_equal_analytic_and_input_grad_zero(rule, make):
    model = make()
    x = torch.randn(3, 4) if make is _mlp else torch.randn(3, 3, 8, 8)
    y = torch.randint(0, 3, (3,))
    convert(model, rule, rank=2, example_input=x)
    report = flops_report(model, x, y)
    assert not report.warnings
    layers = dict(feedback_layers(model))
    for row in report.layers:
        if row["layer"] in layers:
            assert row["input_grad"] == 0 and row["broadcast"] > 0
            expected = analytic(layers[row["layer"]], row["samples"],
                                      report.rule.batches[row["layer"]])  # fmt: skip
            assert row["broadcast"] == expected["broadcast"]
            assert row["feedback_update"] == expected["feedback_update"]


def test_broadcast_needs_an_example_and_a_known_source():
    with pytest.raises(FeedbackConfigError, match="example_input"):
        convert(_mlp(), "dfa")
    with pytest.raises(FeedbackConfigError, match="not a module the forward pass reaches"):
        convert(_mlp(), "dldfa", rank=2, source="nope", example_input=torch.randn(2, 4))
    with pytest.raises(FeedbackConfigError, match="points must be layers or blocks"):
        convert(_mlp(), "dfa", points="block", example_input=torch.randn(2, 4))
    with pytest.raises(FeedbackConfigError, match="name them with blocks:"):
        convert(_mlp(), "dfa", points="blocks", example_input=torch.randn(2, 4))
    with pytest.raises(FeedbackConfigError, match="set points: blocks"):
        convert(_mlp(), "dfa", blocks="blocks.*", example_input=torch.randn(2, 4))


def test_dldfa_rank_above_the_source_width_embeds_the_error_isometrically():
    """r > d (output broadcast past the number of classes): Oja drives P's columns to
    orthonormality, P^T P = I_d, so the r-dimensional signal P e keeps e's geometry."""
    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(64, 4)
    convert(model, "dldfa", rank=5, example_input=x)  # the output error has d = 3
    layer = model[2]
    assert layer.rank == 5 and tuple(layer.feedback_P.shape) == (5, 3)
    optimizer = torch.optim.SGD([layer.feedback_P], lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        model(x).pow(2).sum().div(2).backward()  # e = the output: a 3-d error
        optimizer.step()
    P = layer.feedback_P.detach()
    torch.testing.assert_close(P.t() @ P, torch.eye(3), atol=0.02, rtol=0)
