"""``ldfa_local``: synapse-local feedback learning (Sec. 5, Algorithm 2).

The backward sends Q z upstream with z = P g the r-dimensional teaching signal (eq. 12).

* P learns the top-r principal subspace of the error arriving at the layer's output by the
  multi-component Oja rule (eq. 15), from the batch's centred covariance C normalised by
  gamma = max diag(C) (Algorithm 2):

      Delta P = eta P (C / gamma) (I - P^T P) - lambda P.

  At the output layer, ``use_targets`` takes C from the centred one-hot targets instead.
* Q is fixed and random (the default, the paper's MLPs), or learns by the Hebbian rule of
  eq. 18 (``learn_q``, the paper's CNNs): Delta Q = eta h (P delta)^T - lambda Q.

Cost. C is never formed: P C = (g_c P^T)^T g_c = z^T g_c with z = P g the input gradient
already computed, O(T m r); the orthonormalising factor adds O(m r^2); gamma is a
column sum of squares, O(T m). For a conv layer every output pixel is a sample (App. C.3);
a grouped conv learns each group's P_j from its own channels' C_j and gamma_j.

Where. In the training step's eager backward the layer keeps only P C and diag C
(:mod:`~ldfa_cli.feedback.deferred`), and ``after_backward`` finishes eq. 15 for all
layers whose P has one shape as one batched update: gamma, the division and the
orthonormalising factor cost the same few dispatches for 1 layer or 12. Anywhere else
(a compiled backward, DDP, a grouped conv, a bare ``.backward()``) the layer's backward
finishes it; both give the same P.grad.

Signs: the paper writes updates with the error delta = -g. In ``.grad`` form (what a
descent step applies): P.grad = -(P C/gamma)(I - P^T P) + lambda P and
Q.grad = h^T (g P^T) + lambda Q, the same sign as a weight gradient (Kolen-Pollack style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from . import accounting, deferred
from .lowrank import LowRankRule
from .ops import accumulate_grad, grouped, like, products
from .rule import ConversionPlan, Selection, check, make_rule, phase_flops, register


def oja_grad(ops, signal, projected, P, decay: float, normalise: str = "gamma"):
    """P.grad = -(P C / gamma)(I - P^T P) + decay P (eq. 15, Alg. 2), with C the centred
    covariance of ``signal`` over samples and ``projected`` = P signal, already computed:
    :func:`oja_statistics`, then :func:`oja_update`, in P's dtype and shape."""
    groups, samples = ops.groups, ops.samples(signal)
    pc, diag = oja_statistics(ops, signal, projected)
    Pf = like(P, torch.float32) if groups == 1 else grouped(P.float(), groups)
    grad = oja_update(pc, diag, Pf, decay, normalise, samples)
    return like(grad if groups == 1 else grad.reshape(P.shape), P.dtype)


def oja_statistics(ops, signal, projected) -> tuple[Tensor, Tensor]:
    """(P C, diag C) in float32, C the covariance of ``signal`` over samples (not divided by
    their number) and ``projected`` = P signal. C is never formed: only the signal is
    centred, once, as P C = z^T signal_c (centring z too would give the same at another two
    dispatches); its square, in place, then gives diag C. An ungrouped layer gives an
    r x m matrix and an m-vector, a grouped conv g x r_g x m_g and g x 1 x m_g (one C per
    group): each view or reshape the matrices skip is a dispatch per layer and step."""
    centred = ops.centre(signal)
    if ops.groups == 1:
        return like(ops.outer(projected, centred), torch.float32), like(
            ops.sumsq_(centred), torch.float32)  # fmt: skip
    pc = ops.grouped_outer(projected, centred).float()
    return pc, ops.sumsq_(centred).float().view(ops.groups, 1, -1)


def oja_update(pc: Tensor, diag: Tensor, P: Tensor, decay: float, normalise: str,
               samples: int) -> Tensor:  # fmt: skip
    """-(P C / gamma)(I - P^T P) + decay P from :func:`oja_statistics` (float32): one r x m
    matrix (diag C an m-vector), or a stack of them with a leading group or layer dimension
    (diag C as k x 1 x m), ``P`` alike; gamma = max diag C per matrix.

    ``normalise``: ``gamma`` divides C by gamma (Algorithm 2); ``std`` divides the signal
    by its largest per-unit standard deviation first (the authors' code: C / (s_max +
    1e-8)^2 with s_max^2 = gamma / (T - 1), T = ``samples``, so about (T - 1) C / gamma:
    the same direction, a T - 1 times larger step)."""
    gamma = diag.amax(-1, keepdim=True)  # max diag(C), shaped to divide pc
    if normalise == "std":
        scale = ((gamma / max(samples - 1, 1)).sqrt() + 1e-8) ** 2
    else:
        scale = gamma.clamp_min(torch.finfo(torch.float32).tiny)
    pc = pc / scale
    mm, addmm = products(P)
    # -(PC/gamma)(I - P^T P) as one addmm: each op saved is a dispatch per layer and step
    grad = addmm(pc, mm(pc, P.mT), P, beta=-1)
    return grad.add_(P, alpha=decay) if decay else grad


@register
@dataclass(frozen=True)
class Local(LowRankRule):
    """Oja-learned P (eq. 15), fixed or Hebbian Q (eq. 18). Options: ``decay`` (lambda of
    eq. 15), ``learn_q`` (eq. 18), ``q_decay`` (its lambda), ``use_targets`` (output layer's
    C from the centred one-hot targets; the converter applies it to the last layer only).

    ``init``: ``matched`` (the default: P with random orthonormal rows, where Oja keeps it,
    and Q at the scale of W's best rank-r approximation, see
    :func:`~ldfa_cli.feedback.factors.matched_factors`), ``kaiming`` (App. B's Kaiming uniform
    as the authors' code draws it, the paper-faithful recipes' choice), ``kaiming_literal``
    (App. B read literally in the paper's layout) or ``random`` (P ~ U(+-1/sqrt(m)), Q scaled
    so that QP starts with a default W^T's variance). Oja drives P to orthonormal rows, where
    the feedback's gain is Q's own: ``kaiming_literal`` and ``random`` give Q several times
    that gain, and on Fashion-MNIST over-confident networks (test loss 5-9, 2-3 points less).

    Where the authors' code differs from the paper's text, an option gives its choice:
    ``normalise: std`` (see :func:`oja_grad`; default ``gamma``, Algorithm 2),
    ``clamp_input_grad: 1.0`` (the gradient sent upstream clamped element-wise; default
    off), ``learn_q`` (their MLPs learn Q; the paper's Sec. 5.2 keeps it fixed)."""

    name: ClassVar[str] = "ldfa_local"
    summary: ClassVar[str] = "local LDFA: Oja-learned P, fixed or Hebbian Q (Algorithm 2)"
    equations: ClassVar[str] = "eqs. 12, 15, 18; Alg. 2"
    learn_p_in_backward: ClassVar[bool] = True

    decay: float = 0.0
    learn_q: bool = False
    q_decay: float = 0.0
    use_targets: bool = False
    normalise: str = "gamma"
    clamp_input_grad: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check(self.decay >= 0, f"rule 'ldfa_local': decay must be >= 0, got {self.decay}")
        check(self.q_decay >= 0, f"rule 'ldfa_local': q_decay must be >= 0, got {self.q_decay}")
        rule = "rule 'ldfa_local'"
        check(self.normalise in ("gamma", "std"),
              f"{rule}: normalise must be 'gamma' or 'std', got {self.normalise!r}")  # fmt: skip
        clamp = self.clamp_input_grad
        check(clamp is None or clamp > 0, f"{rule}: clamp_input_grad must be > 0 or null: {clamp}")

    @property
    def learn_q_in_backward(self) -> bool:  # type: ignore[override]
        return self.learn_q

    @property
    def needs_targets(self) -> bool:
        return self.use_targets

    def plan(self, selection: Selection) -> ConversionPlan:
        """With ``use_targets`` only the last converted layer (the output layer) takes its
        covariance from the targets; every other layer from its error."""
        plan = super().plan(selection)
        if self.use_targets and plan.layers:
            others = make_rule(self, use_targets=False)
            plan.layers = [(n, m, others) for n, m, _ in plan.layers[:-1]] + plan.layers[-1:]
        return plan

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """Q (P g) always thin (z is the update's signal), and per group: P C as z_c^T g
        (2 T r m) and its orthonormalising factor (4 r^2 m); the targets' projection
        (2 T m r) with ``use_targets``; the Hebbian x^T z (2 T N r) with ``learn_q``."""
        T, g, m, N, r = samples, layer.groups, layer.group_out, layer.patch_size, layer.rank
        dense = 2 * T * layer.fan_out * N
        update = g * (2 * T * r * m + 4 * r * r * m)
        if self.use_targets:
            update += g * 2 * T * m * r
        if self.learn_q:
            update += g * 2 * T * N * r
        return phase_flops(forward=dense, weight_grad=dense, feedback_update=update,
                           input_grad=self.thin_input_grad_flops(layer, samples))  # fmt: skip

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        Q, P = feedback
        z = ops.project(g, like(P, g.dtype))  # the r-dimensional teaching signal P g
        grad_input = ops.lift(z, like(Q, g.dtype), x_shape) if need_input else None
        if grad_input is not None and self.clamp_input_grad:  # the authors' +-1 clamp
            grad_input = grad_input.clamp(-self.clamp_input_grad, self.clamp_input_grad)
        if accounting.ACTIVE:
            accounting.set_phase("feedback_update")
        grad_q = self.hebbian_grad(ops, x, z, Q) if need_feedback[0] else None
        grad_p = None
        if need_feedback[1]:
            signal, projected = self.oja_signal(ops, g, z, P, targets)
            if ops.groups == 1 and deferred.active():  # finished in after_backward
                statistics = oja_statistics(ops, signal, projected)
                deferred.keep(ops, (*statistics, ops.samples(signal)))
            else:
                grad_p = oja_grad(ops, signal, projected, P, self.decay, self.normalise)
        return grad_input, (grad_q, grad_p)

    @classmethod
    def after_backward(cls, layers: list, step: int | None) -> None:
        """Eq. 15's update of P from the statistics the backward kept (in the training
        step's eager backward), batched over layers of one P shape: the scaling by gamma
        and the orthonormalising factor cost the same few dispatches for 1 or 12 layers."""
        kept: dict[tuple, list] = {}
        for layer in layers:
            for pc, diag, samples in deferred.take(layer):
                P, rule = layer.feedback_P, layer.rule
                key = (tuple(P.shape), P.dtype, P.device, rule.decay, rule.normalise,
                       samples if rule.normalise == "std" else None)  # fmt: skip
                kept.setdefault(key, []).append((layer, pc, diag, samples))
        for alike in kept.values():
            _finish_oja(alike)

    def oja_signal(self, ops, g, z, P, targets) -> tuple[Tensor, Tensor]:
        """(signal, P signal) whose covariance eq. 15 follows: the error and z = P g, or
        with ``use_targets`` the centred one-hot targets and their projection."""
        if not self.use_targets:
            return g, z
        if targets is None:
            raise RuntimeError(
                "a layer with use_targets=True got no targets: call "
                "ldfa_cli.feedback.set_feedback_targets(model, y) before the backward"
            )
        signal = targets.to(g.dtype)
        return signal, ops.project(signal, P.to(g.dtype))

    def hebbian_grad(self, ops, x, z, Q):
        """Q.grad = h^T (g P^T) + lambda Q (eq. 18 with delta = -g), summed over samples."""
        grad = like(ops.hebbian(x, z, Q.shape), Q.dtype)
        return grad + self.q_decay * Q if self.q_decay else grad


def _finish_oja(alike: list) -> None:
    """P.grad of layers whose P has one shape, from their kept (layer, P C, diag C, T):
    one matrix alone, else stacked and batched, every layer's gradient a view of the
    batch's result taken by one ``unbind``. The FLOP counter gives each layer its share."""
    layers = [layer for layer, *_ in alike]
    counting = accounting.ACTIVE
    if counting:
        previous = accounting.enter(tuple(layer.layer_name for layer in layers), "feedback_update")
    first, (_, pc, diag, samples) = layers[0], alike[0]
    rule = first.rule
    if len(alike) == 1:
        grads = [oja_update(pc, diag, like(first.feedback_P, torch.float32), rule.decay,
                            rule.normalise, samples)]  # fmt: skip
    else:
        pc = torch.stack([item[1] for item in alike])
        diag = torch.stack([item[2] for item in alike]).unsqueeze(1)  # k x 1 x m
        P = torch.stack([like(layer.feedback_P, torch.float32) for layer in layers])
        grads = oja_update(pc, diag, P, rule.decay, rule.normalise, samples).unbind()
    for layer, grad in zip(layers, grads, strict=True):
        accumulate_grad(layer.feedback_P, like(grad, layer.feedback_P.dtype))
    if counting:
        accounting.leave(previous)
