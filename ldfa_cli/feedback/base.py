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
        """(width a fractional rank refers to, full rank): the layer's output width and
        the rank of W^T, except for broadcast rules."""
        return layer.fan_out, layer.full_rank

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
        Q, P = Q.to(g.dtype), P.to(g.dtype)
        if dense_is_cheaper(ops, g, Q, P):
            return ops.through(g, ops.dense_from_factors(Q, P), x_shape)
        return ops.lift(ops.project(g, P), Q, x_shape)

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        Q, P = feedback
        grad_input = self.input_grad(ops, g, x_shape, Q, P) if need_input else None
        return grad_input, (None, None)


def dense_is_cheaper(ops, g: Tensor, Q: Tensor, P: Tensor) -> bool:
    r, m = P.shape
    return dense_cheaper(ops.samples(g), r, m, Q.numel() // r)


def dense_cheaper(samples: int, r: int, m: int, n_patch: int) -> bool:
    """The break-even rank test: thin products cost T r (m + N) multiply-adds, the dense
    B = QP costs m N r to form plus T m N to apply (T samples, N = n kh kw)."""
    return samples * m * n_patch + m * n_patch * r < samples * r * (m + n_patch)


def random_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Random Q, P (Kaiming uniform, as the paper, App. B). P reads the m error channels
    (fan-in m); Q is scaled so that QP has the variance of a default-initialised W^T, so a
    random low-rank feedback carries gradients of the same size as the transpose it replaces.
    """
    r, m, n_patch = layer.rank, layer.fan_out, layer.patch_size
    w = layer.weight
    P = kaiming_uniform_like_weight((r, m), m, w)
    # Var(QP)_ij = r Var(Q) Var(P) = r Var(Q) / (3 m); a default W has Var = 1 / (3 n_patch).
    q_bound = math.sqrt(3.0 * m / (r * n_patch))
    q_shape = layer.ops.q_shape(layer.fan_in, r, layer.kernel)
    Q = torch.empty(q_shape, device=w.device, dtype=w.dtype).uniform_(-q_bound, q_bound)
    return Q, P


def svd_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Q, P from the truncated SVD of W^T: W^T = U S V^T, Q = U_r S_r^1/2, P = S_r^1/2 V_r^T.
    A conv kernel is factorised as W reshaped to m x (n kh kw) (App. C.3, the kernel product).
    """
    r = layer.rank
    w_rows = layer.weight.detach().reshape(layer.fan_out, -1).to(torch.float64)  # m x N
    U, S, Vh = torch.linalg.svd(w_rows.t(), full_matrices=False)  # W^T = U S Vh
    root = S[:r].sqrt()
    q_matrix = U[:, :r] * root  # N x r
    P = root[:, None] * Vh[:r]  # r x m
    q_shape = layer.ops.q_shape(layer.fan_in, r, layer.kernel)
    Q = layer.ops.q_from_rows(q_matrix.t(), q_shape)
    w = layer.weight
    return Q.to(w.dtype), P.to(w.dtype).contiguous()


def kaiming_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """Random Q, P by App. B's "Kaiming uniform" as the authors' code draws it: each factor
    initialised like an nn.Linear / nn.Conv2d of its own shape (``kaiming_uniform_(a=
    sqrt(5))``, U(+-1/sqrt(fan_in))) in their layout, P m x r and Q r x N: P ~ U(+-1/sqrt(r))
    and, Q drawn with the linear gain, Q ~ U(+-sqrt(3/N)) (N = n kh kw, the patch). Returned
    in this package's layout (P r x m, Q n x r or r x n x kh x kw).

    Why this one: Oja drives P to orthonormal rows, where the feedback's gain is Q's own, and
    under Adam's coupled weight decay that gain sets how strongly the decay acts (a large
    gain drowns it). This Q gives ||QP||_F = sqrt(r) there, about the Frobenius norm of a
    default-initialised W's best rank-r approximation; :func:`kaiming_literal_factors`' Q is
    sqrt(N/(3r)) times larger and trained over-confident networks (see docs/reproducing.md)."""
    r, m, n_patch = layer.rank, layer.fan_out, layer.patch_size
    w = layer.weight
    p_bound, q_bound = 1.0 / math.sqrt(r), math.sqrt(3.0 / n_patch)
    P = torch.empty((r, m), device=w.device, dtype=w.dtype).uniform_(-p_bound, p_bound)
    q_shape = layer.ops.q_shape(layer.fan_in, r, layer.kernel)
    Q = torch.empty(q_shape, device=w.device, dtype=w.dtype).uniform_(-q_bound, q_bound)
    return Q, P


def kaiming_literal_factors(layer: FeedbackLayer) -> tuple[Tensor, Tensor]:
    """App. B's "Kaiming uniform" read literally in the paper's layout (this package's):
    PyTorch's default init, ``kaiming_uniform_(a=sqrt(5))``, of each stored factor, i.e.
    U(+-1/sqrt(fan_in)) with the fan-in of its second dimension: P (r x m) ~ U(+-1/sqrt(m)),
    a Linear Q (n x r) ~ U(+-1/sqrt(r)), a conv Q (the r x n x kh x kw kernel of a
    transposed conv, as nn.ConvTranspose2d's) ~ U(+-1/sqrt(n kh kw))."""
    w = layer.weight
    P = torch.empty((layer.rank, layer.fan_out), device=w.device, dtype=w.dtype)
    Q = torch.empty(layer.ops.q_shape(layer.fan_in, layer.rank, layer.kernel), device=w.device,
                    dtype=w.dtype)  # fmt: skip
    for factor in (P, Q):
        nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
    return Q, P


RANDOM_INITS = {"kaiming": kaiming_factors, "kaiming_literal": kaiming_literal_factors,
                "random": random_factors}  # fmt: skip


def init_factors(layer: FeedbackLayer, init: str) -> None:
    """Draw the layer's Q, P by one of :data:`RANDOM_INITS`, in place."""
    load_factors(layer, *RANDOM_INITS[init](layer))


def lowrank_svd_factors(layer: FeedbackLayer, niter: int, seed: int) -> tuple[Tensor, Tensor]:
    """Q, P from ``torch.svd_lowrank(W, q=r, niter)`` (a randomized SVD, as the authors'
    code): W ~ U S V^T, so W^T ~ V S U^T, Q = V S^1/2 and P = S^1/2 U^T. Its random start is
    drawn under ``seed`` with the global RNG state saved and restored."""
    r = layer.rank
    w_rows = layer.weight.detach().reshape(layer.fan_out, -1)  # m x N, in W's dtype
    devices = [w_rows.device] if w_rows.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(w_rows, q=r, niter=niter)
    root = S[:r].sqrt()
    P = (root[:, None] * U[:, :r].t()).contiguous()  # r x m
    q_shape = layer.ops.q_shape(layer.fan_in, r, layer.kernel)
    Q = layer.ops.q_from_rows((V[:, :r] * root).t(), q_shape)
    return Q.to(w_rows.dtype), P.to(w_rows.dtype)
