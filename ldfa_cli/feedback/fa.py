"""Feedback alignment: a random matrix in place of W^T, fixed or adapted.

* ``fa`` (eq. 1): a fixed random full-rank B, delta_l = B delta_{l+1} * f'(a_l).
* ``kp`` (eq. 2, Kolen-Pollack / Akrout et al.): B adapts with the transposed weight
  update, Delta B = -eta h delta^T - lambda B, beside Delta W = -eta delta h^T - lambda W.
  Because both receive the same update and the same decay, B - W^T shrinks by (1 - eta
  lambda) per step and B approaches W^T.
* ``lowrank_fa`` (Sec. 3): a fixed random rank-r B = Q P, the paper's failing baseline.

A full-rank B is stored in W's layout (``feedback_B``, m x n or m x n x kh x kw): the layer
sends B^T g upstream where backprop sends W^T g. So kp's ``feedback_B.grad`` is exactly
``weight.grad`` (plus lambda B), and a conv's B is a kernel like its W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .factors import kaiming_uniform_like_weight, matched_full_rank, store
from .lowrank import LowRankRule
from .rule import Rule, check, register


@register
@dataclass(frozen=True)
class FeedbackAlignment(Rule):
    """Eq. 1: delta_l = B_l delta_{l+1} * f'(a_l) with B fixed and random (Lillicrap 2016)."""

    name: ClassVar[str] = "fa"
    summary: ClassVar[str] = "feedback alignment: fixed random full-rank B"
    equations: ClassVar[str] = "eq. 1"
    learned: ClassVar[bool] = False

    # matched: ||B||_F = ||W||_F (the default; any model's init); kaiming: B drawn as a
    # default-initialised W (App. B)
    init: str = "matched"

    def __post_init__(self):
        check(self.init in ("matched", "kaiming"),
              f"rule {self.name!r}: init must be 'matched' or 'kaiming', got "
              f"{self.init!r}")  # fmt: skip

    def create_feedback(self, layer) -> None:
        if self.init == "matched":
            B = matched_full_rank(layer)
        else:
            B = kaiming_uniform_like_weight(tuple(layer.weight.shape), layer.patch_size,
                                            layer.weight)  # fmt: skip
        store(layer, "feedback_B", B, learned=self.learned)

    def feedback_tensors(self, layer):
        return (layer.feedback_B,)

    def feedback_matrix(self, layer):
        return layer.feedback_B.detach()

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        (B,) = feedback
        grad_input = ops.through(g, B.to(g.dtype), x_shape) if need_input else None
        return grad_input, (self.feedback_grad(B, gw) if need_feedback[0] else None,)

    def feedback_grad(self, B, grad_weight):
        return None


@register
@dataclass(frozen=True)
class KolenPollack(FeedbackAlignment):
    """Eq. 2: B receives the transposed weight update. In W's layout B.grad = dL/dW +
    decay * B, the descent step Delta B = -eta (h delta^T)^T - eta lambda B.

    ``decay`` (lambda) is B's decay; give W the same through the optimizer's weight decay
    for B to converge to W^T.
    """

    name: ClassVar[str] = "kp"
    summary: ClassVar[str] = "Kolen-Pollack: B gets the transposed weight update, with decay"
    equations: ClassVar[str] = "eq. 2"
    learned: ClassVar[bool] = True
    needs_weight_grad: ClassVar[bool] = True

    decay: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        check(self.decay >= 0, f"rule 'kp': decay must be >= 0, got {self.decay}")

    def feedback_grad(self, B, grad_weight):
        grad = grad_weight.to(B.dtype)
        return grad + self.decay * B if self.decay else grad.clone()


@register
@dataclass(frozen=True)
class LowRankFeedbackAlignment(LowRankRule):
    """Sec. 3: B = Q P with Q and P fixed and random, rank r. With r below the task's
    dimensionality the stationarity condition (eq. 6) is underdetermined and task modes
    stay unlearned: the paper's failing baseline."""

    name: ClassVar[str] = "lowrank_fa"
    summary: ClassVar[str] = "fixed random rank-r feedback B = QP (the failing baseline)"
    equations: ClassVar[str] = "Sec. 3, eqs. 4-6"
