"""``ldfa``, the normative rule (Sec. 3.2 and 4.1, Algorithm 1).

The backward sends Q (P g) upstream (eq. 12). The factors learn by gradient descent on the
factorisation loss (eq. 8)

    L_B = 1/2 || Q P - W^T ||_F^2        (W detached)

whose gradients are (eq. 9 / eq. 14, with E = W^T - Q P)

    dL_B/dP = -Q^T E,    dL_B/dQ = -E P^T,

so a descent step is exactly the paper's Delta P = Q^T E, Delta Q = E P^T. The loss depends
only on W, never on the data: its cost is O(n m r) per update whatever the batch, and it can
run every ``interval`` steps. :func:`feedback_loss` returns it for ``.backward()``; the
engine steps a second optimizer (the paper's second AdamW, App. C.2) on the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import accounting
from .lowrank import SVDInitialised
from .ops import accumulate_grad, grouped, products
from .rule import check, register


@register
@dataclass(frozen=True)
class Normative(SVDInitialised):
    """Learned rank-r feedback tracking W^T (Algorithm 1).

    Options: ``init`` ``matched`` (the default: random directions with ||QP||_F that of
    W's best rank-r approximation, see :func:`~ldfa_cli.feedback.factors.matched_factors`),
    ``kaiming`` (App. B's Kaiming uniform as the authors draw it), ``kaiming_literal``,
    ``random`` (see ``ldfa_local``) or ``svd`` (truncated SVD of W, the authors' code for
    the normative rule); ``interval`` k,
    the factorisation update runs every k steps;
    ``reset_svd_every`` (steps) or ``reset_svd_every_epochs`` (a fraction of an epoch, floored
    to steps as the authors' ``len(loader) // 2``; both off by default): reset Q, P to the SVD
    of W, as the authors' code does every half epoch. That reset reads W's singular vectors
    (weight transport), so it is partly an oracle. ``svd`` and ``svd_niter``: how the SVD is
    taken (:class:`~ldfa_cli.feedback.lowrank.SVDInitialised`). ``sqrt_rank`` divides both
    factors' eq.-9 gradients by sqrt(r) (r the layer's rank: 3r for the authors' qkv), as
    the newest version of the authors' ``LDFA_Linear`` does; a per-layer learning rate under
    SGD, nothing under Adam(W) but for eps; not in the paper (off by default). ``batched``:
    eq. 9 for layers of one shape as batched products (:func:`update_factors`); by default
    (null) on an accelerator, and on a CPU for weights of at most 2^16 elements.
    """

    name: ClassVar[str] = "ldfa"
    summary: ClassVar[str] = "normative LDFA: Q, P learn 1/2||QP - W^T||^2 (Algorithm 1)"
    equations: ClassVar[str] = "eqs. 8-9, 12, 14; Alg. 1"
    p_is_parameter: ClassVar[bool] = True
    q_is_parameter: ClassVar[bool] = True

    interval: int = 1
    reset_svd_every: int | None = None
    reset_svd_every_epochs: float | None = None
    sqrt_rank: bool = False
    batched: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        check(self.reset_svd_every is None or self.reset_svd_every_epochs is None,
              "rule 'ldfa': give reset_svd_every (steps) or reset_svd_every_epochs, not "
              "both")  # fmt: skip
        check(self.reset_svd_every_epochs is None or self.reset_svd_every_epochs > 0,
              f"rule 'ldfa': reset_svd_every_epochs must be > 0 or null, got "
              f"{self.reset_svd_every_epochs}")  # fmt: skip
        check(self.interval >= 1, f"rule 'ldfa': interval must be >= 1, got {self.interval}")
        check(isinstance(self.sqrt_rank, bool),
              f"rule 'ldfa': sqrt_rank must be true or false, got {self.sqrt_rank!r}")  # fmt: skip
        check(self.batched is None or isinstance(self.batched, bool),
              f"rule 'ldfa': batched must be true, false or null: {self.batched!r}")  # fmt: skip
        check(
            self.reset_svd_every is None or self.reset_svd_every >= 1,
            f"rule 'ldfa': reset_svd_every must be >= 1 or null, got {self.reset_svd_every}",
        )

    @classmethod
    def after_backward(cls, layers: list, step: int | None) -> None:
        update_factors(layers, step)

    @property
    def update_every(self) -> int:
        return self.interval

    def reset_every(self, steps_per_epoch: int | None) -> int | None:
        """Steps between SVD resets, or None (never; or in epochs with no epoch length)."""
        if self.reset_svd_every is not None:
            return self.reset_svd_every
        if self.reset_svd_every_epochs is None or not steps_per_epoch:
            return None
        return max(1, math.floor(steps_per_epoch * self.reset_svd_every_epochs))

    def reset(self, layer, seed: int) -> None:
        self.load_svd(layer, seed)

    def grad_scale(self, layer) -> float | None:
        """What eq. 9's gradients are multiplied by: 1/sqrt(r) with ``sqrt_rank``, else None."""
        return 1.0 / math.sqrt(layer.rank) if self.sqrt_rank else None

    def ddp_ignored(self, layer) -> tuple[str, ...]:
        """The factors learn from W alone (identical on every rank), never from a backward
        through DDP's forward."""
        return ("feedback_P", "feedback_Q")

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """Eq. 9 per group, amortised over ``interval``: Qm^T W^T and P W (4 m N r), the
        r x r products P P^T, Qm^T Qm and their use (4 r^2 N + 4 r^2 m); no dot product."""
        counts = super().analytic_flops(layer, samples, batch)
        g, m, N, r = layer.groups, layer.group_out, layer.patch_size, layer.rank
        per_update = g * (4 * m * N * r + 4 * r * r * N + 4 * r * r * m)
        counts["feedback_update"] = per_update / self.interval
        return counts


class FactorisationLoss(torch.autograd.Function):
    """1/2 ||Q P - W^T||_F^2 with its eq.-9 gradients, never forming the n x m matrix QP;
    for a grouped conv the sum of it over groups (block-diagonal W^T), so every tensor has
    a leading group dimension g (1 for a Linear layer or an ungrouped conv).

    With Qm = Q as an N x r matrix (N = n kh kw), q_rows = Qm^T, w_rows = W as m x N:
    ||Qm P||^2 = <Qm^T Qm, P P^T>, <Qm P, W^T> = <Qm^T W^T, P>, and
    dL/dP = (Qm^T Qm) P - Qm^T W^T,   dL/dQm^T = (P P^T) Qm^T - P W.
    The backward is :func:`factorisation_grads` (which recomputes Qm^T W^T: this is the
    reference path; training calls :func:`normative_update`). With ``with_constant`` False
    the value leaves out the constant 1/2 ||W||^2, which has no gradient and would cost
    another pass over W.
    """

    @staticmethod
    def forward(ctx, q_rows, P, w_rows, name: str, with_constant: bool = True) -> Tensor:
        ctx.name = name
        qw = torch.bmm(q_rows, w_rows.transpose(1, 2))  # g x r x m: Qm^T W^T
        qq = torch.bmm(q_rows, q_rows.transpose(1, 2))  # g x r x r
        pp = torch.bmm(P, P.transpose(1, 2))  # g x r x r
        loss = 0.5 * (qq * pp).sum() - (qw * P).sum()
        if with_constant:
            loss = (loss + 0.5 * torch.dot(w_rows.flatten(), w_rows.flatten())).clamp_min(0.0)
        ctx.save_for_backward(q_rows, P, w_rows)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        q_rows, P, w_rows = ctx.saved_tensors
        counting = accounting.ACTIVE
        if counting:
            previous = accounting.enter(ctx.name, "feedback_update")
        grad_q_rows, grad_p = factorisation_grads(q_rows, P, w_rows)
        if counting:
            accounting.leave(previous)
        return grad * grad_q_rows, grad * grad_p, None, None, None


def factorisation_loss(layer, with_constant: bool = True) -> Tensor:
    """Eq. 8 for one layer (summed over its groups); gradients flow to its Q and P only."""
    g = layer.groups
    w_rows = grouped(layer.weight.detach().reshape(layer.fan_out, -1), g)
    q_rows = grouped(layer.ops.q_rows(layer.feedback_Q), g)
    counting = accounting.ACTIVE
    if counting:
        previous = accounting.enter(layer.layer_name, "feedback_update")
    loss = FactorisationLoss.apply(q_rows, grouped(layer.feedback_P, g), w_rows,
                                   layer.layer_name, with_constant)  # fmt: skip
    if (scale := layer.rule.grad_scale(layer)) is not None:
        loss = loss * scale
    if counting:
        accounting.leave(previous)
    return loss


def factorisation_grads(q_rows: Tensor, P: Tensor, w_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 9 without a loss: (dL/dQm^T, dL/dP) = ((P P^T) Qm^T - P W, (Qm^T Qm) P - Qm^T W^T),
    for one group (2-D tensors) or with a leading group dimension (see
    :class:`FactorisationLoss`). The two r x m x N products are the whole cost (both with r
    rows first: that layout runs about twice as fast as W Qm on CPU BLAS); ``addmm`` folds
    each subtraction into the small r x r product."""
    mm, addmm = products(P)
    qw = mm(q_rows, w_rows.mT)  # r x m: Qm^T W^T
    pw = mm(P, w_rows)  # r x N: P W
    grad_q_rows = addmm(pw, mm(P, P.mT), q_rows, beta=-1)
    grad_p = addmm(qw, mm(q_rows, q_rows.mT), P, beta=-1)
    return grad_q_rows, grad_p


def matrix_factorisation_grads(Q: Tensor, P: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 9 for a factor pair of matrices (a Linear layer's: Q n x r, P r x m, W m x n) in
    their own layouts: (dL/dQ, dL/dP) = (Q (P P^T) - (P W)^T, (Q^T Q) P - Q^T W^T), the
    transpose of :func:`factorisation_grads`'s dL/dQm^T computed in Q's layout, so that
    neither a transposed copy nor a transpose of it follows: ten dispatches, of which the
    two r x m x n products are the cost (r rows first, as there; P P^T is symmetric). With
    a leading dimension (layers of one shape stacked) the same ten dispatches, batched."""
    mm, addmm = products(P)
    q_rows = Q.mT
    qw = mm(q_rows, w.mT)  # r x m: Q^T W^T
    pw = mm(P, w)  # r x n: P W
    grad_q = addmm(pw.mT, Q, mm(P, P.mT), beta=-1)
    grad_p = addmm(qw, mm(q_rows, Q), P, beta=-1)
    return grad_q, grad_p


def normative_layers(model: nn.Module):
    for module in model.modules():
        if isinstance(getattr(module, "rule", None), Normative):
            yield module


def feedback_loss(
    model: nn.Module, step: int | None = None, with_constant: bool = True
) -> Tensor | None:
    """Sum of eq. 8 over the model's ``ldfa`` layers whose update is due at ``step``
    (every layer when ``step`` is None); None when no layer is due. Call ``.backward()`` on
    it to put eq. 9's update into the factors' ``.grad``. ``with_constant=False`` (the
    training loop's choice) drops the gradient-free 1/2 ||W||^2 from the value."""
    losses = [
        factorisation_loss(layer, with_constant)
        for layer in normative_layers(model)
        if step is None or step % layer.rule.interval == 0
    ]
    return torch.stack(losses).sum() if losses else None


def normative_update(model: nn.Module, step: int | None = None,
                     batched: bool | None = None) -> int:  # fmt: skip
    """Eq. 9 into Q.grad and P.grad of the model's ``ldfa`` layers whose update is due at
    ``step`` (every layer when None); see :func:`update_factors`. Returns how many layers
    were updated."""
    return update_factors(list(normative_layers(model)), step, batched)


@torch.no_grad()
def update_factors(layers: list, step: int | None = None, batched: bool | None = None) -> int:
    """Eq. 9 added straight into Q.grad and P.grad of those ``ldfa`` ``layers`` whose
    update is due at ``step`` (every layer when None): the gradients that
    ``feedback_loss(model, step).backward()`` gives, without building the loss or running
    autograd over it (the training loop's path; on a 3x512 MLP at batch 256 the autograd
    route cost 8% of the step, this one about 4%). Returns how many layers were updated.

    ``batched`` runs layers of one shape together, as batched products over stacked copies
    of their W, Q and P: a ViT's 12 qkv layers cost one call per product instead of twelve.
    By default (None) the rule's ``batched`` option decides, and where that is null too it
    is done on an accelerator, where a step of a small or mid-sized model is bound by
    kernel launches, not FLOPs, and this update was most of what LDFA added to them. On a
    CPU it is done for weights of at most :data:`CPU_BATCHED_MAX_ELEMENTS` and larger ones
    run layer by layer: inside a training step, where W has left the cache, copying a large
    W costs more than the calls save (docs/performance.md has both measured)."""
    due = [layer for layer in layers if step is None or step % layer.rule.interval == 0]
    for alike in _alike_layers(due):
        if len(alike) > 1 and _batches(alike[0], batched):
            _update_alike(alike)
        else:
            for layer in alike:
                _update_layer(layer)
    return len(due)


def _batches(layer, batched: bool | None) -> bool:
    """The call's ``batched``, else the rule's option, else: off the CPU."""
    if batched is None:
        batched = layer.rule.batched
    return _worth_batching(layer) if batched is None else batched


# On a CPU, batching pays for W's copy where W is small: whole steps take the same time
# batched or not for the tiny ViT (W at most 192 x 64) and the kjv GPT (at most 512 x 128);
# the MLP's 512 x 512 weights cost 5-6% more (docs/performance.md, benchmarks/step_paths.py)
CPU_BATCHED_MAX_ELEMENTS = 1 << 16


def _worth_batching(layer) -> bool:
    w = layer.weight
    return w.device.type != "cpu" or w.numel() <= CPU_BATCHED_MAX_ELEMENTS


def _alike_layers(layers: list) -> list[list]:
    """The layers in runs of one batchable kind: ungrouped, same layer type, shapes, dtype
    and device (a grouped conv, whose factors carry a group dimension, runs alone)."""
    runs: dict[tuple, list] = {}
    for layer in layers:
        w, Q, P = layer.weight, layer.feedback_Q, layer.feedback_P
        key = (type(layer.ops), tuple(w.shape), tuple(Q.shape), tuple(P.shape), w.dtype,
               P.dtype, w.device, layer.rule.grad_scale(layer), layer.rule.batched)  # fmt: skip
        runs.setdefault(key if layer.groups == 1 else ("alone", id(layer)), []).append(layer)
    return list(runs.values())


def _update_layer(layer) -> None:
    counting = accounting.ACTIVE
    if counting:
        previous = accounting.enter(layer.layer_name, "feedback_update")
    # no detach, no reshape that changes nothing, no transposed copy: each is a dispatch,
    # paid in host time on a GPU, per layer and step
    g, Q, P = layer.groups, layer.feedback_Q, layer.feedback_P
    if Q.dim() == 2 and layer.weight.dim() == 2:  # a Linear layer: matrices as they are
        grad_q, grad_p = matrix_factorisation_grads(Q, P, layer.weight)
    else:
        w_rows = layer.weight.reshape(layer.fan_out, -1)
        q_rows = layer.ops.q_rows(Q)
        if g > 1:  # one (P_j, Q_j) pair per group: a leading group dimension
            w_rows, q_rows, P = grouped(w_rows, g), grouped(q_rows, g), grouped(P, g)
        grad_q_rows, grad_p = factorisation_grads(q_rows, P, w_rows)
        grad_q_rows = grad_q_rows.reshape(layer.total_rank, -1)
        grad_q = layer.ops.q_from_rows(grad_q_rows, tuple(Q.shape))
        grad_p = grad_p.reshape(layer.feedback_P.shape)
    if (scale := layer.rule.grad_scale(layer)) is not None:
        grad_q, grad_p = grad_q.mul_(scale), grad_p.mul_(scale)
    accumulate_grad(Q, grad_q)
    accumulate_grad(layer.feedback_P, grad_p)
    if counting:
        accounting.leave(previous)


def _update_alike(layers: list) -> None:
    """Eq. 9 for layers of one shape, as one batched product each (the layer dimension in
    place of the group dimension of :func:`factorisation_grads`); every layer's grads are
    views of the batch's results, taken by one ``unbind``. A stack of Linear layers costs
    fifteen dispatches however many layers it has. The FLOP counter gives each layer its
    equal share."""
    counting = accounting.ACTIVE
    if counting:
        names = tuple(layer.layer_name for layer in layers)
        previous = accounting.enter(names, "feedback_update")
    first = layers[0]
    P = torch.stack([layer.feedback_P for layer in layers])
    if first.feedback_Q.dim() == 2 and first.weight.dim() == 2:  # Linear: matrices as they are
        Q = torch.stack([layer.feedback_Q for layer in layers])
        w = torch.stack([layer.weight for layer in layers])
        grad_q, grad_p = matrix_factorisation_grads(Q, P, w)
    else:
        w_rows = torch.stack([layer.weight.reshape(layer.fan_out, -1) for layer in layers])
        q_rows = torch.stack([first.ops.q_rows(layer.feedback_Q) for layer in layers])
        grad_q_rows, grad_p = factorisation_grads(q_rows, P, w_rows)
        grad_q = first.ops.q_from_rows_batched(grad_q_rows, tuple(first.feedback_Q.shape))
    if (scale := first.rule.grad_scale(first)) is not None:  # alike: one rank
        grad_q, grad_p = grad_q.mul_(scale), grad_p.mul_(scale)
    for layer, gq, gp in zip(layers, grad_q, grad_p, strict=True):
        accumulate_grad(layer.feedback_Q, gq)
        accumulate_grad(layer.feedback_P, gp)
    if counting:
        accounting.leave(previous)
