"""What every rule shares: the rule registry, option checking, rank resolution, and the
low-rank feedback pathway B = Q P that ``lowrank_fa``, ``ldfa`` and ``ldfa_local`` build on.

A rule is a frozen dataclass whose fields are its options. It creates the layer's feedback
tensors, hands them to the layer's autograd Function, and computes, inside that Function's
backward, the input gradient through its feedback and the ``.grad`` of its feedback
parameters (see the package docstring for the sign convention).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .ops import grouped, like

if TYPE_CHECKING:
    from .layers import FeedbackLayer


class FeedbackConfigError(ValueError):
    """A rule, option, rank or layer that cannot be used; the message is one line."""


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    RULES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Rule:
    """Base of every credit-assignment rule. Fields of a subclass are its options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    equations: ClassVar[str] = ""
    uses_rank: ClassVar[bool] = False
    plain_autograd: ClassVar[bool] = False  # True only for ``bp``
    needs_weight_grad: ClassVar[bool] = False  # its feedback update uses dL/dW (``kp``)

    def create_feedback(self, layer: FeedbackLayer) -> None:
        """Register the rule's feedback parameters or buffers on ``layer``."""

    def feedback_tensors(self, layer: FeedbackLayer) -> tuple[Tensor, ...]:
        """Tensors handed to the autograd Function. Those whose ``.grad`` the backward
        returns are passed as they are; the others detached."""
        return ()

    def backward(
        self,
        ops,
        g: Tensor,
        x: Tensor,
        x_shape: torch.Size,
        feedback: tuple[Tensor, ...],
        targets: Tensor | None,
        need_input: bool,
        need_feedback: tuple[bool, ...],
        grad_weight: Tensor | None,
    ) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """Return the input gradient through the feedback and the feedback tensors' grads."""
        raise TypeError(f"rule {self.name!r} has no custom backward: it runs on plain autograd")

    def rank_limits(self, layer: FeedbackLayer) -> tuple[int, int]:
        """(width a fractional rank refers to, full rank): a group's output width and the
        rank of its W^T (the layer's, ungrouped), except for broadcast rules."""
        return layer.group_out, layer.full_rank

    def feedback_matrix(self, layer: FeedbackLayer) -> Tensor | None:
        """The feedback map B in the layout of W (so B^T stands where W^T would), or None."""
        return None

    def auxiliary_loss(self, layer: FeedbackLayer) -> Tensor | None:
        """A loss term on the layer's own parameters that training adds to the task loss."""
        return None

    def layer_measures(self, layer: FeedbackLayer) -> dict:
        """Rule-specific numbers for ``ldfa eval``'s per-layer report."""
        return {}

    def options(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def make_rule(rule: str | Rule, **options) -> Rule:
    """A rule instance from its name and options; unknown names and options are refused."""
    if isinstance(rule, Rule):
        return dataclasses.replace(rule, **options) if options else rule
    cls = RULES.get(rule)
    if cls is None:
        raise FeedbackConfigError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        known = ", ".join(cls.option_names()) or "none"
        raise FeedbackConfigError(
            f"rule {rule!r} has no option {unknown[0]!r}; its options are: {known}"
        )
    return cls(**options)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FeedbackConfigError(message)


def resolve_rank(spec: int | float | None, *, name: str, m: int, full_rank: int) -> int:
    """A layer's rank from an int (absolute), a float in (0, 1] (a fraction of the output
    width m, e.g. 0.125 -> m/8) or None (full rank), clipped to [1, full_rank]."""
    where = f"layer {name!r} (output width m={m}, full rank {full_rank})"
    if spec is None:
        return full_rank
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise FeedbackConfigError(f"{where}: rank must be an int or a fraction, got {spec!r}")
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise FeedbackConfigError(
                f"{where}: a fractional rank must be in (0, 1], got {spec}; "
                "give an integer for an absolute rank"
            )
        spec = round(spec * m)
    elif spec <= 0:
        raise FeedbackConfigError(f"{where}: rank must be >= 1, got {spec}")
    return int(min(max(spec, 1), full_rank))


def kaiming_uniform_like_weight(shape: tuple[int, ...], fan_in: int, like: Tensor) -> Tensor:
    """nn.Linear/nn.Conv2d's default init (Kaiming uniform, a = sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, device=like.device, dtype=like.dtype).uniform_(-bound, bound)


def load_factors(layer: nn.Module, Q: Tensor, P: Tensor) -> None:
    """Copy Q, P into the layer's feedback factors in place (Parameters or buffers)."""
    with torch.no_grad():
        layer.feedback_Q.copy_(Q)
        layer.feedback_P.copy_(P)


def store(layer: nn.Module, name: str, value: Tensor, learned: bool) -> None:
    """Register ``value`` as a Parameter (learned) or a persistent buffer (fixed)."""
    if learned:
        layer.register_parameter(name, nn.Parameter(value))
    else:
        layer.register_buffer(name, value)


@dataclass(frozen=True)
class LowRankRule(Rule):
    """Rank-r feedback B = Q P in place of W^T (Sec. 3, eq. 12): the input gradient is
    Q (P g), two thin products costing O(T r (n + m)) instead of O(T n m).

    Layout: P is r x m (it reads the m-dimensional error); Q maps the r-channel signal back
    to the input, n x r for a Linear layer and an r x n x kh x kw transposed-conv kernel for
    a conv layer, so that QP has the shape of W^T. Above the break-even rank, where a dense
    B is cheaper than two thin products, rules that do not need the r-dimensional signal
    for their own update use the dense product.
    """

    uses_rank: ClassVar[bool] = True
    learn_p_in_backward: ClassVar[bool] = False
    learn_q_in_backward: ClassVar[bool] = False
    p_is_parameter: ClassVar[bool] = False
    q_is_parameter: ClassVar[bool] = False

    def create_feedback(self, layer: FeedbackLayer) -> None:
        Q, P = random_factors(layer)
        store(layer, "feedback_Q", Q, self.q_is_parameter or self.learn_q_in_backward)
        store(layer, "feedback_P", P, self.p_is_parameter or self.learn_p_in_backward)
        init = getattr(self, "init", "random")
        if init in RANDOM_INITS:  # (the normative rule's "svd" is its own)
            init_factors(layer, init, orthonormal_p=self.learn_p_in_backward)

    def feedback_tensors(self, layer: FeedbackLayer) -> tuple[Tensor, ...]:
        Q, P = layer.feedback_Q, layer.feedback_P
        return (
            Q if self.learn_q_in_backward else Q.detach(),
            P if self.learn_p_in_backward else P.detach(),
        )

    def feedback_matrix(self, layer: FeedbackLayer) -> Tensor:
        return layer.ops.dense_from_factors(layer.feedback_Q.detach(), layer.feedback_P.detach())

    def input_grad(self, ops, g: Tensor, x_shape, Q: Tensor, P: Tensor) -> Tensor:
        """Q (P g), or the dense B^T g above the break-even rank."""
        Q, P = like(Q, g.dtype), like(P, g.dtype)
        if dense_is_cheaper(ops, g, Q, P):
            return ops.through(g, ops.dense_from_factors(Q, P), x_shape)
        return ops.lift(ops.project(g, P), Q, x_shape)

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        Q, P = feedback
        grad_input = self.input_grad(ops, g, x_shape, Q, P) if need_input else None
        return grad_input, (None, None)


def dense_is_cheaper(ops, g: Tensor, Q: Tensor, P: Tensor) -> bool:
    groups = ops.groups
    r_g, m_g = P.shape[0] // groups, P.shape[1]
    return dense_cheaper(ops.samples(g), r_g, m_g, Q.numel() // P.shape[0])


def dense_cheaper(samples: int, r: int, m: int, n_patch: int) -> bool:
    """The break-even rank test (per group): thin products cost T r (m + N) multiply-adds,
    the dense B = QP costs m N r to form plus T m N to apply (T samples, N = n kh kw)."""
    return samples * m * n_patch + m * n_patch * r < samples * r * (m + n_patch)


def _empty(layer: FeedbackLayer, shape) -> Tensor:
    return torch.empty(shape, device=layer.weight.device, dtype=layer.weight.dtype)


def _factor_shapes(layer: FeedbackLayer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(Q's shape, P's shape): P is (g r_g) x m_g, Q a Linear's n x r or a conv's
    (g r_g) x n_g x k... transposed-conv kernel."""
    total = layer.total_rank
    q_shape = layer.ops.q_shape(layer.fan_in, total, layer.kernel)
    return q_shape, (total, layer.group_out)


def random_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Random Q, P with QP at a default-initialised W^T's variance: P reads a group's m_g
    error channels (U(+-1/sqrt(m_g))), and Var(QP) = r Var(Q) Var(P) = r Var(Q) / (3 m_g)
    is set to a default W's 1 / (3 N) (N = n_g kh kw)."""
    r, m, n_patch = layer.rank, layer.group_out, layer.patch_size
    q_shape, p_shape = _factor_shapes(layer)
    P = _empty(layer, p_shape).uniform_(-1.0 / math.sqrt(m), 1.0 / math.sqrt(m))
    q_bound = math.sqrt(3.0 * m / (r * n_patch))
    return _empty(layer, q_shape).uniform_(-q_bound, q_bound), P


def _w_groups(layer: FeedbackLayer, dtype=None) -> Tensor:
    """W as g x m_g x N (a Linear layer: 1 x m x n)."""
    w = layer.weight.detach().reshape(layer.fan_out, -1)
    return (w if dtype is None else w.to(dtype)).reshape(layer.groups, layer.group_out, -1)


def _from_group_factors(layer: FeedbackLayer, q_rows: Tensor, P: Tensor):
    """Q, P in storage from g x r x N rows of Q^T and g x r x m_g rows of P."""
    q_shape, p_shape = _factor_shapes(layer)
    Q = layer.ops.q_from_rows(q_rows.reshape(layer.total_rank, -1), q_shape)
    w = layer.weight
    return Q.to(w.dtype), P.reshape(p_shape).to(w.dtype).contiguous()


def svd_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Q, P from the truncated SVD of W^T: W^T = U S V^T, Q = U_r S_r^1/2, P = S_r^1/2 V_r^T,
    group by group. A conv kernel is factorised as W reshaped to m_g x (n_g kh kw) (App. C.3,
    the kernel product)."""
    r = layer.rank
    U, S, Vh = torch.linalg.svd(_w_groups(layer, torch.float64).transpose(1, 2),
                                full_matrices=False)  # W_j^T = U S Vh, batched  # fmt: skip
    root = S[:, :r].sqrt()
    q_rows = (U[:, :, :r] * root[:, None, :]).transpose(1, 2)  # g x r x N
    P = root[:, :, None] * Vh[:, :r]  # g x r x m_g
    return _from_group_factors(layer, q_rows, P)


def kaiming_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Random Q, P by App. B's "Kaiming uniform" as the authors' code draws it: each factor
    initialised like an nn.Linear / nn.Conv2d of its own shape (``kaiming_uniform_(a=
    sqrt(5))``, U(+-1/sqrt(fan_in))) in their layout, P m x r and Q r x N: P ~ U(+-1/sqrt(r))
    and, Q drawn with the linear gain, Q ~ U(+-sqrt(3/N)) (N = n_g kh kw, the patch; r the
    rank per group). Returned in this package's layout (P r x m, Q n x r or r x n x kh x kw).

    Why this one: Oja drives P to orthonormal rows, where the feedback's gain is Q's own, and
    under Adam's coupled weight decay that gain sets how strongly the decay acts (a large
    gain drowns it). This Q gives ||QP||_F = sqrt(r) there, about the Frobenius norm of a
    default-initialised W's best rank-r approximation; :func:`kaiming_literal_factors`' Q is
    sqrt(N/(3r)) times larger and trained over-confident networks (see docs/reproducing.md)."""
    q_shape, p_shape = _factor_shapes(layer)
    p_bound, q_bound = 1.0 / math.sqrt(layer.rank), math.sqrt(3.0 / layer.patch_size)
    P = _empty(layer, p_shape).uniform_(-p_bound, p_bound)
    return _empty(layer, q_shape).uniform_(-q_bound, q_bound), P


def kaiming_literal_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """App. B's "Kaiming uniform" read literally in the paper's layout (this package's):
    PyTorch's default init, ``kaiming_uniform_(a=sqrt(5))``, of each stored factor, i.e.
    U(+-1/sqrt(fan_in)) with the fan-in of its second dimension: P (r x m_g) ~ U(+-1/sqrt(m_g)),
    a Linear Q (n x r) ~ U(+-1/sqrt(r)), a conv Q (the r x n_g x kh x kw kernel of a
    transposed conv, as nn.ConvTranspose2d's) ~ U(+-1/sqrt(n_g kh kw))."""
    q_shape, p_shape = _factor_shapes(layer)
    P, Q = _empty(layer, p_shape), _empty(layer, q_shape)
    for factor in (P, Q):
        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    return Q, P


def best_rank_norm(layer: FeedbackLayer, rank: int | None) -> Tensor:
    """Frobenius norm of W's best rank-r approximation, per group (all of W: ||W||_F)."""
    w = _w_groups(layer, torch.float64)
    if rank is None:
        return w.flatten(1).norm(dim=1)
    return torch.linalg.svdvals(w)[:, :rank].square().sum(1).sqrt()


def matched_factors(layer: FeedbackLayer, orthonormal_p: bool = False) -> tuple[Tensor, Tensor]:
    """Random directions at the scale of the layer's own W: Q rescaled, group by group, so
    that ||Q_j P_j||_F equals the Frobenius norm of W_j's best rank-r approximation. A model
    that initialises its weights otherwise than nn.Linear's default (timm's truncated
    normals, zero-init residual branches) then gets feedback of its own gradients' size, not
    a gain that compounds with depth (a W that is all zeros keeps the Kaiming draw's scale).
    ``orthonormal_p`` (the Oja rules): P starts with random
    orthonormal rows, where Oja keeps it, so the match holds at the rule's fixed point too;
    otherwise P is drawn as in :func:`kaiming_factors`."""
    Q, P = kaiming_factors(layer)
    g = layer.groups
    if orthonormal_p:
        rows = grouped(P, g).double()
        P = torch.linalg.qr(rows.transpose(1, 2)).Q.transpose(1, 2).reshape(P.shape).to(P.dtype)
    q_rows = grouped(layer.ops.q_rows(Q), g).double()  # g x r x N
    current = torch.bmm(grouped(P, g).double().transpose(1, 2), q_rows).flatten(1).norm(dim=1)
    target = best_rank_norm(layer, layer.rank)
    # a zero-initialised W (timm's zero heads) keeps the Kaiming draw's scale: a zero B
    # would never train the layers below it under the fixed-Q rules
    target = torch.where(target > 1e-12, target, current)
    scale = (target / current.clamp_min(1e-300)).to(Q.dtype)
    if g == 1:
        return Q * scale[0], P
    per_group = Q.reshape(g, -1, *Q.shape[1:]) * scale.view(g, *[1] * Q.dim())
    return per_group.reshape(Q.shape), P


def matched_full_rank(layer: FeedbackLayer) -> Tensor:
    """A random full-rank B in W's layout with ||B||_F = ||W||_F (fa, kp)."""
    B = kaiming_uniform_like_weight(tuple(layer.weight.shape), layer.patch_size, layer.weight)
    target = layer.weight.detach().double().norm()
    if target <= 1e-12:  # a zero-initialised W: keep the default draw
        return B
    return B * (target / B.double().norm().clamp_min(1e-300)).to(B.dtype)


RANDOM_INITS = {"matched": matched_factors, "kaiming": kaiming_factors,
                "kaiming_literal": kaiming_literal_factors, "random": random_factors}  # fmt: skip


def init_factors(layer: FeedbackLayer, init: str, orthonormal_p: bool = False) -> None:
    """Draw the layer's Q, P by one of :data:`RANDOM_INITS`, in place."""
    if init == "matched":
        load_factors(layer, *matched_factors(layer, orthonormal_p))
    else:
        load_factors(layer, *RANDOM_INITS[init](layer))


def lowrank_svd_factors(layer: FeedbackLayer, niter: int, seed: int) -> tuple[Tensor, Tensor]:
    """Q, P from ``torch.svd_lowrank(W, q=r, niter)`` (a randomized SVD, as the authors'
    code), group by group: W ~ U S V^T, so W^T ~ V S U^T, Q = V S^1/2 and P = S^1/2 U^T. Its
    random start is drawn under ``seed`` with the global RNG state saved and restored."""
    r = layer.rank
    w_groups = _w_groups(layer)  # g x m_g x N, in W's dtype
    devices = [w_groups.device] if w_groups.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w_groups, q=r, niter=niter)
    root = S[:, :r].sqrt()
    P = root[:, :, None] * U[:, :, :r].transpose(1, 2)  # g x r x m_g
    q_rows = (V[:, :, :r] * root[:, None, :]).transpose(1, 2)  # g x r x N
    return _from_group_factors(layer, q_rows, P)
