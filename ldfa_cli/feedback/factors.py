"""The feedback factors' initial values: the random draws a rule's ``init`` option names
(``matched``, ``kaiming``, ``kaiming_literal``, ``random``), the truncated SVD of W (exact
or randomized) and a full-rank random B; and how a rule stores them on its layer.

Layouts: P is (groups x r) x m_g, Q a Linear layer's n x r or a conv's (groups x r) x n_g x
k... transposed-conv kernel, so that QP has the shape of W^T (group by group).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .ops import grouped


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


def _empty(layer, shape) -> Tensor:
    return torch.empty(shape, device=layer.weight.device, dtype=layer.weight.dtype)


def _factor_shapes(layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(Q's shape, P's shape): P is (g r_g) x m_g, Q a Linear's n x r or a conv's
    (g r_g) x n_g x k... transposed-conv kernel."""
    total = layer.total_rank
    q_shape = layer.ops.q_shape(layer.fan_in, total, layer.kernel)
    return q_shape, (total, layer.group_out)


def random_factors(layer) -> tuple[Tensor, Tensor]:
    """Random Q, P with QP at a default-initialised W^T's variance: P reads a group's m_g
    error channels (U(+-1/sqrt(m_g))), and Var(QP) = r Var(Q) Var(P) = r Var(Q) / (3 m_g)
    is set to a default W's 1 / (3 N) (N = n_g kh kw)."""
    r, m, n_patch = layer.rank, layer.group_out, layer.patch_size
    q_shape, p_shape = _factor_shapes(layer)
    P = _empty(layer, p_shape).uniform_(-1.0 / math.sqrt(m), 1.0 / math.sqrt(m))
    q_bound = math.sqrt(3.0 * m / (r * n_patch))
    return _empty(layer, q_shape).uniform_(-q_bound, q_bound), P


def _w_groups(layer, dtype=None) -> Tensor:
    """W as g x m_g x N (a Linear layer: 1 x m x n)."""
    w = layer.weight.detach().reshape(layer.fan_out, -1)
    return (w if dtype is None else w.to(dtype)).reshape(layer.groups, layer.group_out, -1)


def _from_group_factors(layer, q_rows: Tensor, P: Tensor):
    """Q, P in storage from g x r x N rows of Q^T and g x r x m_g rows of P."""
    q_shape, p_shape = _factor_shapes(layer)
    Q = layer.ops.q_from_rows(q_rows.reshape(layer.total_rank, -1), q_shape)
    w = layer.weight
    return Q.to(w.dtype), P.reshape(p_shape).to(w.dtype).contiguous()


def svd_factors(layer) -> tuple[Tensor, Tensor]:
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


def kaiming_factors(layer) -> tuple[Tensor, Tensor]:
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


def kaiming_literal_factors(layer) -> tuple[Tensor, Tensor]:
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


def best_rank_norm(layer, rank: int | None) -> Tensor:
    """Frobenius norm of W's best rank-r approximation, per group (all of W: ||W||_F)."""
    w = _w_groups(layer, torch.float64)
    if rank is None:
        return w.flatten(1).norm(dim=1)
    return torch.linalg.svdvals(w)[:, :rank].square().sum(1).sqrt()


def matched_factors(layer, orthonormal_p: bool = False) -> tuple[Tensor, Tensor]:
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


def matched_full_rank(layer) -> Tensor:
    """A random full-rank B in W's layout with ||B||_F = ||W||_F (fa, kp)."""
    B = kaiming_uniform_like_weight(tuple(layer.weight.shape), layer.patch_size, layer.weight)
    target = layer.weight.detach().double().norm()
    if target <= 1e-12:  # a zero-initialised W: keep the default draw
        return B
    return B * (target / B.double().norm().clamp_min(1e-300)).to(B.dtype)


RANDOM_INITS = {"matched": matched_factors, "kaiming": kaiming_factors,
                "kaiming_literal": kaiming_literal_factors, "random": random_factors}  # fmt: skip


def init_factors(layer, init: str, orthonormal_p: bool = False) -> None:
    """Draw the layer's Q, P by one of :data:`RANDOM_INITS`, in place."""
    if init == "matched":
        load_factors(layer, *matched_factors(layer, orthonormal_p))
    else:
        load_factors(layer, *RANDOM_INITS[init](layer))


def lowrank_svd_factors(layer, niter: int, seed: int) -> tuple[Tensor, Tensor]:
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
