"""At full rank with Q P = W^T (SVD init), every rule that sends Q P g upstream must give
exactly backprop's gradients; and each rule's input gradient is its own feedback's, not W^T's."""

import copy

import pytest
import timm
import torch
from torch import nn

from ldfa_cli.feedback import LDFAConv2d, LDFALinear, conversion_report, convert


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _forward_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (out * target).sum().backward()
    grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None and not n.split(".")[-1].startswith("feedback_")
    }
    return grads, xi.grad.clone()


def _assert_same_grads(reference, converted, x):
    target = torch.randn_like(reference(x))
    ref, ref_x = _forward_grads(reference, x, target)
    got, got_x = _forward_grads(converted, x, target)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-10, msg=name)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-6, atol=1e-10)


def test_linear_full_rank_svd_equals_backprop():
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    conv = convert(copy.deepcopy(ref), "ldfa", rank=None, init="svd")
    assert all(r.note == "converted" for r in conversion_report(conv).rows)
    _assert_same_grads(ref, conv, torch.randn(6, 7))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False),
        dict(in_channels=2, out_channels=8, kernel_size=(3, 2), dilation=(2, 1)),  # n < m
        dict(in_channels=6, out_channels=4, kernel_size=1, stride=2),  # 1x1 strided
    ],
)
def test_conv_full_rank_svd_equals_backprop(kwargs):
    torch.manual_seed(2)
    ref = nn.Sequential(
        nn.Conv2d(2, kwargs["in_channels"], 3, padding=1), nn.Tanh(), nn.Conv2d(**kwargs)
    )
    conv = convert(copy.deepcopy(ref), "ldfa", init="svd")
    _assert_same_grads(ref, conv, torch.randn(2, 2, 11, 10))


def test_tiny_vit_full_rank_svd_equals_backprop():
    torch.manual_seed(3)
    ref = (
        timm.models.vision_transformer.VisionTransformer(
            img_size=8,
            patch_size=4,
            in_chans=3,
            num_classes=4,
            embed_dim=12,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
        )
        .double()
        .eval()
    )
    x = torch.randn(2, 3, 8, 8)
    conv = convert(copy.deepcopy(ref), "ldfa", init="svd", example_input=x)
    # whatever timm names them: every Linear (qkv, proj, fc1, fc2, head) is converted, the
    # patch embedding's conv (on the raw image) kept
    rows = conversion_report(conv).rows
    linears = [r for r in rows if r.kind == "Linear"]
    assert len(linears) == 2 * 4 + 1
    assert all(r.rule == "ldfa" and r.note == "converted" for r in linears)
    (patch,) = [r for r in rows if r.kind == "Conv2d"]
    assert patch.note == "kept: its input needs no gradient"
    _assert_same_grads(ref, conv, x)


@pytest.mark.parametrize("rule", ["fa", "kp", "lowrank_fa", "ldfa", "ldfa_local"])
def test_input_gradient_uses_feedback_not_weight(rule):
    """The input gradient is B^T g (or (g P^T) Q^T): it ignores W entirely."""
    layer = LDFALinear(10, 6, rule=rule, rank=3)
    x = torch.randn(4, 10, requires_grad=True)
    g = torch.randn(4, 6)
    layer(x).backward(g)
    if rule in ("fa", "kp"):
        expected = g @ layer.feedback_B
    else:
        expected = (g @ layer.feedback_P.t()) @ layer.feedback_Q.t()
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(layer.weight.grad, g.t() @ x.detach())
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    first = x.grad.clone()
    with torch.no_grad():
        layer.weight.mul_(-3.0)
    x.grad = None
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, first)


@pytest.mark.parametrize("rule", ["lowrank_fa", "ldfa_local"])
def test_conv_input_gradient_is_factorised_feedback(rule):
    layer = LDFAConv2d(3, 8, 3, stride=2, padding=1, rule=rule, rank=2)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    dense = torch.einsum("rm,rnhw->mnhw", layer.feedback_P, layer.feedback_Q)
    expected = torch.nn.grad.conv2d_input(x.shape, dense, g, stride=2, padding=1)
    torch.testing.assert_close(x.grad, expected)


def test_dense_path_above_break_even_equals_thin_path():
    """Above r* = mn/(m+n) a dense QP is used; both give the same input gradient."""
    layer = LDFALinear(6, 5, rule="ldfa", rank=5)  # r = 5 > 30/11
    x = torch.randn(50, 6, requires_grad=True)
    g = torch.randn(50, 5)
    layer(x).backward(g)
    thin = (g @ layer.feedback_P.t()) @ layer.feedback_Q.t()
    torch.testing.assert_close(x.grad, thin)
