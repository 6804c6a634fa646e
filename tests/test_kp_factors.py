"""``ldfa_kp``, the authors' ViT bio rule: each factor gets the gradient of <QP, dW^T>."""

import pytest
import torch

from ldfa_cli.feedback import LDFAConv2d, LDFALinear


def _factors_reference(Q, P, dense_of, dW):
    """The equation: (Q.grad, P.grad) = d<B, dW>/d(Q, P), B = QP in W's layout, by autograd."""
    Q, P = Q.detach().clone().requires_grad_(), P.detach().clone().requires_grad_()
    (dense_of(Q, P) * dW).sum().backward()
    return Q.grad, P.grad


def test_ldfa_kp_linear_factor_grads_are_the_authors_bio_update():
    """P.grad = Q^T dW^T, Q.grad = dW^T P^T; in the authors' layout (W ~ P_a Q_a, P_a = P^T,
    Q_a = Q^T) grad_P_a = dW Q_a^T and grad_Q_a = P_a^T dW; the input gradient is Q P g."""
    torch.manual_seed(0)
    layer = LDFALinear(7, 9, rule="ldfa_kp", rank=3, decay=0.0)
    x = torch.randn(4, 5, 7, requires_grad=True)
    g = torch.randn(4, 5, 9)
    layer(x).backward(g)
    Q, P, dW = layer.feedback_Q.detach(), layer.feedback_P.detach(), layer.weight.grad
    torch.testing.assert_close(layer.feedback_P.grad, Q.t() @ dW.t())
    torch.testing.assert_close(layer.feedback_Q.grad, dW.t() @ P.t())
    P_a, Q_a = P.t(), Q.t()
    torch.testing.assert_close(layer.feedback_P.grad.t(), dW @ Q_a.t())
    torch.testing.assert_close(layer.feedback_Q.grad.t(), P_a.t() @ dW)
    ref_q, ref_p = _factors_reference(Q, P, lambda q, p: (q @ p).t(), dW)
    torch.testing.assert_close(layer.feedback_Q.grad, ref_q)
    torch.testing.assert_close(layer.feedback_P.grad, ref_p)
    torch.testing.assert_close(x.grad, g @ P.t() @ Q.t())


@pytest.mark.parametrize("groups", [1, 2])
def test_ldfa_kp_conv_factor_grads_are_the_gradients_of_qp_dot_dw(groups):
    torch.manual_seed(1)
    layer = LDFAConv2d(4, 6, 3, padding=1, groups=groups, rule="ldfa_kp", rank=2, decay=0.2)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = layer(x)
    out.backward(torch.randn_like(out))
    Q, P, dW = layer.feedback_Q.detach(), layer.feedback_P.detach(), layer.weight.grad
    ref_q, ref_p = _factors_reference(Q, P, layer.ops.dense_from_factors, dW)
    torch.testing.assert_close(layer.feedback_Q.grad, ref_q + 0.2 * Q)
    torch.testing.assert_close(layer.feedback_P.grad, ref_p + 0.2 * P)


def test_ldfa_kp_descent_step_moves_qp_by_the_transposed_weight_update():
    """One SGD step of size eta: Q'P' = QP - eta (Q Q^T dW^T + dW^T P^T P)
    + eta^2 dW^T P^T Q^T dW^T, exactly."""
    torch.manual_seed(2)
    layer = LDFALinear(6, 5, rule="ldfa_kp", rank=2)
    Q0, P0 = layer.feedback_Q.detach().clone(), layer.feedback_P.detach().clone()
    layer(torch.randn(8, 6, requires_grad=True)).pow(2).sum().backward()
    dW, eta = layer.weight.grad.t(), 0.1  # dW^T, n x m
    torch.optim.SGD([layer.feedback_Q, layer.feedback_P], lr=eta).step()
    expected = (Q0 @ P0 - eta * (Q0 @ Q0.t() @ dW + dW @ P0.t() @ P0)
                + eta**2 * dW @ P0.t() @ Q0.t() @ dW)  # fmt: skip
    torch.testing.assert_close(layer.feedback_Q.detach() @ layer.feedback_P.detach(), expected)


def test_ldfa_kp_svd_init_matches_the_weight_and_counts_its_update():
    layer = LDFALinear(12, 10, rule="ldfa_kp", rank=10, init="svd")
    torch.testing.assert_close(layer.feedback_Q @ layer.feedback_P, layer.weight.t(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    counts = layer.rule.analytic_flops(layer, samples=8, batch=8)
    assert counts["feedback_update"] == 4 * 10 * 10 * 12
