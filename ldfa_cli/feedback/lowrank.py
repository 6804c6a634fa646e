"""The low-rank feedback pathway B = Q P that ``lowrank_fa``, ``ldfa`` and ``ldfa_local``
build on (Sec. 3, eq. 12), and the break-even rank above which a dense B is cheaper."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from .factors import (
    RANDOM_INITS,
    init_factors,
    load_factors,
    lowrank_svd_factors,
    random_factors,
    store,
    svd_factors,
)
from .ops import like
from .rule import Rule, check, phase_flops, resolve_rank


@dataclass(frozen=True)
class LowRankRule(Rule):
    """Rank-r feedback B = Q P in place of W^T (Sec. 3, eq. 12): the input gradient is
    Q (P g), two thin products costing O(T r (n + m)) instead of O(T n m).

    Layout: P is r x m (it reads the m-dimensional error); Q maps the r-channel signal back
    to the input, n x r for a Linear layer and an r x n x kh x kw transposed-conv kernel for
    a conv layer, so that QP has the shape of W^T. Above the break-even rank, where a dense
    B is cheaper than two thin products, rules that do not need the r-dimensional signal
    for their own update use the dense product.

    ``init`` names the factors' random draw (:data:`~ldfa_cli.feedback.factors.RANDOM_INITS`;
    see ``ldfa_local`` for each). A grouped conv gets a (P, Q) pair per group, the rank per
    group; where even rank 1 per group saves nothing the layer stays on autograd.
    """

    uses_rank: ClassVar[bool] = True
    learn_p_in_backward: ClassVar[bool] = False
    learn_q_in_backward: ClassVar[bool] = False
    p_is_parameter: ClassVar[bool] = False
    q_is_parameter: ClassVar[bool] = False
    inits: ClassVar[tuple[str, ...]] = tuple(RANDOM_INITS)

    init: str = "matched"

    def __post_init__(self):
        check(self.init in self.inits, f"rule {self.name!r}: init must be one of "
              f"{', '.join(self.inits)}, got {self.init!r}")  # fmt: skip

    def kept_because(self, module: nn.Module, rank, force_grouped: bool) -> str | None:
        """A grouped conv whose thin pathway saves nothing even at rank 1 per group (a
        depthwise conv: its W^T g costs T k^2 m, rank 1 costs T m (1 + k^2))."""
        groups = getattr(module, "groups", 1)
        if groups == 1 or force_grouped:
            return None
        m_g = module.out_channels // groups
        n_patch = module.in_channels // groups * math.prod(module.kernel_size)
        r_g = resolve_rank(rank, name="", m=m_g, full_rank=min(m_g, n_patch))
        if r_g * (m_g + n_patch) < m_g * n_patch:  # the thin pathway saves something
            return None
        what = "depthwise" if groups == module.in_channels else f"grouped (groups={groups})"
        return (f"kept: {what}, its transpose is already cheaper than rank {r_g} per group "
                "(force_grouped converts it)")  # fmt: skip

    def create_feedback(self, layer) -> None:
        Q, P = random_factors(layer)
        store(layer, "feedback_Q", Q, self.q_is_parameter or self.learn_q_in_backward)
        store(layer, "feedback_P", P, self.p_is_parameter or self.learn_p_in_backward)
        self.draw_factors(layer)

    def draw_factors(self, layer) -> None:
        """Q, P by the ``init`` option, in place."""
        init_factors(layer, self.init, orthonormal_p=self.learn_p_in_backward)

    def feedback_tensors(self, layer) -> tuple[Tensor, ...]:
        return layer.feedback_Q, layer.feedback_P

    def feedback_matrix(self, layer) -> Tensor:
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

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """The forward and weight gradient as backprop's; the input gradient Q (P g) per
        group (r the rank per group), or B = QP formed and applied above break-even."""
        T, g, m, N, r = samples, layer.groups, layer.group_out, layer.patch_size, layer.rank
        dense = 2 * T * layer.fan_out * N
        if dense_cheaper(T, r, m, N):
            input_grad = g * 2 * m * N * r + dense
        else:
            input_grad = self.thin_input_grad_flops(layer, samples)
        return phase_flops(forward=dense, weight_grad=dense, input_grad=input_grad)

    @staticmethod
    def thin_input_grad_flops(layer, samples: int) -> float:
        """P g then Q z, per group: 2 T r (m_g + N)."""
        return layer.groups * 2 * samples * layer.rank * (layer.group_out + layer.patch_size)


@dataclass(frozen=True)
class SVDInitialised(LowRankRule):
    """A low-rank rule whose factors may start from W's truncated SVD (``init: svd``, the
    authors' code), W^T ~ Q P; ``svd``: ``exact`` (``torch.linalg.svd`` in float64) or
    ``lowrank`` (``torch.svd_lowrank`` with ``svd_niter`` power iterations in the weight's
    dtype, as the authors' code; seeded from the layer and step, so the training RNG is
    untouched)."""

    inits: ClassVar[tuple[str, ...]] = (*RANDOM_INITS, "svd")

    svd: str = "exact"
    svd_niter: int = 10

    def __post_init__(self):
        super().__post_init__()
        rule = f"rule {self.name!r}"
        check(self.svd in ("exact", "lowrank"),
              f"{rule}: svd must be 'exact' or 'lowrank', got {self.svd!r}")  # fmt: skip
        check(self.svd_niter >= 0, f"{rule}: svd_niter must be >= 0, got {self.svd_niter}")

    def draw_factors(self, layer) -> None:
        if self.init == "svd":
            self.load_svd(layer)
        else:
            super().draw_factors(layer)

    def load_svd(self, layer, seed: int = 0) -> None:
        """Set the layer's Q, P to the truncated SVD of its current W^T, in place; ``svd``
        says how (``lowrank`` draws its random start from ``seed``)."""
        if self.svd == "lowrank":
            Q, P = lowrank_svd_factors(layer, self.svd_niter, seed)
        else:
            Q, P = svd_factors(layer)
        load_factors(layer, Q, P)


def dense_is_cheaper(ops, g: Tensor, Q: Tensor, P: Tensor) -> bool:
    groups = ops.groups
    r_g, m_g = P.shape[0] // groups, P.shape[1]
    return dense_cheaper(ops.samples(g), r_g, m_g, Q.numel() // P.shape[0])


def dense_cheaper(samples: int, r: int, m: int, n_patch: int) -> bool:
    """The break-even rank test (per group): thin products cost T r (m + N) multiply-adds,
    the dense B = QP costs m N r to form plus T m N to apply (T samples, N = n kh kw)."""
    return samples * m * n_patch + m * n_patch * r < samples * r * (m + n_patch)
