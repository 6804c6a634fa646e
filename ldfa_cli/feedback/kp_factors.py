"""``ldfa_kp``: the authors' ViT "bio" rule, Kolen-Pollack through the factors.

Not in the paper. The authors' code trains its biologically plausible ViTs
(``vit_training/train_vit_bio.py`` in maherhanut1/Low-Dimensional-Feedback, with the layer
``modules/bio_layers/LDFA_Linear.py``) by neither eq. 9 nor Oja's rule (eq. 15): each factor
gets the gradient of <QP, dW^T> with dW = dL/dW, the layer's own weight gradient this step,

    P.grad = Q^T dW^T,        Q.grad = dW^T P^T          (this package's layout, QP ~ W^T;

their layout, W ~ PQ: grad_P = dW Q^T, grad_Q = P^T dW). A descent step moves QP by
-eta (Q Q^T dW^T + dW^T P^T P): the transposed weight update seen through the factors, as
Kolen-Pollack (eq. 2) moves a full B by -eta dW^T. Both products are local: dW^T P^T =
x^T (P g) is ``ldfa_local``'s Hebbian Q (eq. 18) and Q^T dW^T = (x Q)^T g; no W is read.
The authors pair it with the same AdamW weight decay on W and the factors (0.1), the decay
that makes Kolen-Pollack's B approach W^T; ``decay`` adds a coupled lambda Q, lambda P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import accounting
from .lowrank import SVDInitialised
from .ops import grouped
from .rule import check, register


@register
@dataclass(frozen=True)
class FactorKolenPollack(SVDInitialised):
    """Q, P learn from the layer's weight gradient: P.grad = Q^T dW^T, Q.grad = dW^T P^T
    (the authors' ViT bio rule). Options: ``init`` (``svd``: their choice, with ``svd:
    lowrank`` and ``svd_niter: 2``), ``decay`` (a coupled lambda on both factors; 0 by
    default, the authors decay them in AdamW)."""

    name: ClassVar[str] = "ldfa_kp"
    summary: ClassVar[str] = "Kolen-Pollack through the factors (the authors' ViT bio rule)"
    equations: ClassVar[str] = "eq. 2 through B = QP; the authors' code, not the paper"
    learn_p_in_backward: ClassVar[bool] = True
    learn_q_in_backward: ClassVar[bool] = True
    needs_weight_grad: ClassVar[bool] = True

    decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check(self.decay >= 0, f"rule 'ldfa_kp': decay must be >= 0, got {self.decay}")

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        Q, P = feedback
        grad_input = self.input_grad(ops, g, x_shape, Q, P) if need_input else None
        if not any(need_feedback):
            return grad_input, (None, None)
        if accounting.ACTIVE:
            accounting.set_phase("feedback_update")
        grad_q, grad_p = factor_grads(ops, gw, Q.detach(), P.detach())
        if self.decay:
            grad_q, grad_p = grad_q + self.decay * Q, grad_p + self.decay * P
        return grad_input, (grad_q if need_feedback[0] else None,
                            grad_p if need_feedback[1] else None)  # fmt: skip

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """Backprop's forward and weight gradient, the input gradient as ``lowrank_fa``'s,
        and per group the two r x m_g x N products Q^T dW^T and P dW (4 r m_g N)."""
        counts = super().analytic_flops(layer, samples, batch)
        products = layer.groups * layer.rank * layer.group_out * layer.patch_size
        counts["feedback_update"] = 4 * products
        return counts


def factor_grads(ops, grad_weight, Q, P):
    """(Q.grad, P.grad) = (dW^T P^T, Q^T dW^T) in storage layout, group by group: with
    Qm^T the r x N rows of Q and dW as m_g x N, P.grad = Qm^T dW^T and Qm.grad^T = P dW."""
    groups = ops.groups
    dw = grouped(grad_weight.reshape(grad_weight.shape[0], -1).to(P.dtype), groups)
    q_rows = grouped(ops.q_rows(Q), groups)
    grad_p = torch.bmm(q_rows, dw.transpose(1, 2)).reshape(P.shape)
    grad_q_rows = torch.bmm(grouped(P, groups), dw)
    grad_q = ops.q_from_rows(grad_q_rows.reshape(P.shape[0], -1), tuple(Q.shape))
    return grad_q, grad_p
