"""The products every rule is written in, once for a Linear and once for a convolution.

A rule's backward is written against these few operations, so one implementation serves
every layer kind. Shapes, with m output channels, n input channels, r the feedback rank:

=====================  ==============================  ==========================================
operation              Linear (W: m x n)               Conv1d/2d (W: m x n_g x k...)
=====================  ==============================  ==========================================
``weight_grad(x, g)``  g^T x                           conv weight gradient (+ bias gradient)
``project(g, P)``      z = g P^T   (P: r x m)          1x1 conv, m -> r channels at every pixel
``lift(z, Q)``         z Q^T       (Q: n x r)          transposed conv r -> n (Q: r x n_g x k...)
``through(g, Bw)``     g Bw        (Bw in W's layout)  transposed conv with kernel Bw
``hebbian(x, z, Q)``   x^T z       (shape of Q)        conv weight gradient of the n -> r conv Q
``outer(a, b)``        sum over samples of a b^T       the same, summed over batch and pixels
``grouped_outer``      1 x A x B                       per group: g x A_g x B_g
=====================  ==============================  ==========================================

A grouped conv (``groups`` g > 1; depthwise when g = n) keeps its groups in the feedback:
P is a grouped 1x1 conv (g r_g x m_g), Q a grouped transposed conv (g r_g x n_g x k...), r_g
the rank per group, and every statistic a rule forms (Oja's covariance, the factorisation
loss) is formed per group. "Samples" are every row of a Linear input (batch x tokens) and
every output position of a conv. Only ``mm``/``bmm`` and ``convolution``/
``convolution_backward`` are used for the heavy products, so
``torch.utils.flop_counter.FlopCounterMode`` sees each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _unrows(t: Tensor, shape: torch.Size) -> Tensor:
    return t if len(shape) == 2 else t.view(shape)


def like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (no call at all when it is already: the backward runs per layer
    and step, and even a no-op ``.to`` costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def products(t: Tensor):
    """(mm, addmm) for matrices, (bmm, baddbmm) for a stack of them (a leading group or
    layer dimension), so that one expression serves both."""
    return (torch.mm, torch.addmm) if t.dim() == 2 else (torch.bmm, torch.baddbmm)


def grouped(t: Tensor, groups: int) -> Tensor:
    """A factor stored as (groups x rows) x cols viewed as groups x rows x cols."""
    return t.reshape(groups, -1, t.shape[-1])


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """``param.grad += grad``, a new .grad in the parameter's own strides, as autograd's
    AccumulateGrad lays it out: the fused Adam/AdamW kernels (the optimizers' default here)
    walk param and grad memory in step and do not check their strides, so a contiguous
    grad for a channels_last Q was applied to the wrong elements, silently (torch 2.14)."""
    if param.grad is None:
        same = grad.stride() == param.stride()
        param.grad = grad if same else torch.empty_like(param).copy_(grad)
    else:
        param.grad.add_(grad)


@dataclass(frozen=True)
class LinearOps:
    """Products for ``nn.Linear``: inputs of any leading shape (batch, tokens, ..., features)."""

    groups: ClassVar[int] = 1

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def prepare(self, t: Tensor) -> Tensor:
        """One contiguous copy at most (gradients reaching a ViT's qkv or proj are often
        strided), so the several row views the backward takes cost nothing."""
        return t.contiguous()

    def as_rows(self, t: Tensor) -> Tensor:
        """Rows (samples x features), in one contiguous copy at most: the feedback
        Function's g and x, which its products then take as they are, where each would
        otherwise reshape a token dimension away again (a dispatch each, a kernel launch's
        host time on a GPU). The input gradient is shaped back by ``x_shape``."""
        return _rows(t.contiguous())

    def weight_grad(
        self, x: Tensor, g: Tensor, weight_shape: torch.Size, has_bias: bool
    ) -> tuple[Tensor, Tensor | None]:
        g2 = _rows(g)
        grad_w = g2.t().mm(_rows(x))
        return grad_w, (g2.sum(0) if has_bias else None)

    def project(self, g: Tensor, P: Tensor) -> Tensor:
        z = _rows(g).mm(P.t())
        return z if g.dim() == 2 else z.view(*g.shape[:-1], P.shape[0])

    def lift(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return _unrows(_rows(z).mm(Q.t()), x_shape)

    def through(self, g: Tensor, w_layout: Tensor, x_shape: torch.Size) -> Tensor:
        return _unrows(_rows(g).mm(w_layout), x_shape)

    def hebbian(self, x: Tensor, z: Tensor, q_shape: torch.Size) -> Tensor:
        return _rows(x).t().mm(_rows(z))

    def outer(self, a: Tensor, b: Tensor) -> Tensor:
        return _rows(a).t().mm(_rows(b))

    def grouped_outer(self, a: Tensor, b: Tensor) -> Tensor:
        """``outer`` per group: 1 x A x B for a Linear layer."""
        return self.outer(a, b).unsqueeze(0)

    def centre(self, t: Tensor) -> Tensor:
        return t - _rows(t).mean(0)

    def sumsq_(self, t: Tensor) -> Tensor:
        """Per channel, the sum over samples of t^2, squaring ``t`` in place: of a centred
        t, the diagonal of its covariance (centre, square in place, sum: 16x faster on CPU
        than torch.var over the batch dimension, and one T x m temporary, not two)."""
        return _rows(t.square_()).sum(0)

    def samples(self, g: Tensor) -> int:
        return g.numel() // g.shape[-1]

    def q_shape(self, n_in: int, rank: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        return (n_in, rank)

    @staticmethod
    def q_rows(Q: Tensor) -> Tensor:
        """Q^T as an r x N matrix (N = n): the factor in W's layout, B^T = P^T Q^T."""
        return Q.t()

    @staticmethod
    def q_from_rows(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        return q_rows.t().contiguous()

    @staticmethod
    def q_from_rows_batched(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        """``q_from_rows`` for a stack of layers (L x r x N -> L x N x r), in one copy."""
        return q_rows.transpose(1, 2).contiguous()

    @staticmethod
    def dense_from_factors(Q: Tensor, P: Tensor) -> Tensor:
        """B^T = (QP)^T in W's layout (m x n)."""
        return P.t().mm(Q.t())


@dataclass(frozen=True)
class ConvOps:
    """Products for ``nn.Conv1d`` / ``nn.Conv2d`` (``dims`` spatial dimensions) with zero
    padding, any ``groups``. With g groups, P (g r_g x m_g, a grouped 1x1 conv) and Q
    (g r_g x n_g x k..., a grouped transposed conv) hold one rank-r_g factor pair per group:
    group j's error channels reach only group j's input channels, as through W^T."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1
    dims: int = 2

    @property
    def _conv(self):
        return F.conv1d if self.dims == 1 else F.conv2d

    @property
    def _spatial(self) -> tuple[int, ...]:
        return tuple(range(2, 2 + self.dims))

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def prepare(self, t: Tensor) -> Tensor:
        return t  # convolutions take any memory format (channels_last included)

    def as_rows(self, t: Tensor) -> Tensor:
        return t  # a convolution's products take the feature map as it is

    def _backward(self, g, x, weight, mask, bias_sizes=None):
        """``aten.convolution_backward``; ``x`` and ``weight`` may be shapes where only the
        shape matters (as in ``torch.nn.grad``)."""
        if not isinstance(x, Tensor):
            x = g.new_empty(1).expand(x)
        if not isinstance(weight, Tensor):
            weight = g.new_empty(1).expand(weight)
        return torch.ops.aten.convolution_backward(
            g,
            x,
            weight,
            bias_sizes,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * self.dims,
            self.groups,
            mask,
        )

    def weight_grad(
        self, x: Tensor, g: Tensor, weight_shape: torch.Size, has_bias: bool
    ) -> tuple[Tensor, Tensor | None]:
        bias_sizes = [weight_shape[0]] if has_bias else None
        _, grad_w, grad_b = self._backward(g, x, weight_shape, (False, True, has_bias), bias_sizes)
        return grad_w, (grad_b if has_bias else None)

    def project(self, g: Tensor, P: Tensor) -> Tensor:
        return self._conv(g, P.view(*P.shape, *[1] * self.dims), groups=self.groups)

    def lift(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return self._backward(z, x_shape, Q, (True, False, False))[0]

    def through(self, g: Tensor, w_layout: Tensor, x_shape: torch.Size) -> Tensor:
        return self._backward(g, x_shape, w_layout, (True, False, False))[0]

    def hebbian(self, x: Tensor, z: Tensor, q_shape: torch.Size) -> Tensor:
        return self._backward(z, x, q_shape, (False, True, False))[1]

    def outer(self, a: Tensor, b: Tensor) -> Tensor:
        """sum over batch and positions of a b^T (channels x channels), ungrouped."""
        return torch.einsum("nis,njs->ij", a.flatten(2), b.flatten(2))

    def grouped_outer(self, a: Tensor, b: Tensor) -> Tensor:
        """``outer`` within each group: g x A_g x B_g."""
        n, g = a.shape[0], self.groups
        a = a.reshape(n, g, a.shape[1] // g, -1)
        b = b.reshape(n, g, b.shape[1] // g, -1)
        return torch.einsum("ngis,ngjs->gij", a, b)

    def centre(self, t: Tensor) -> Tensor:
        return t - t.mean(dim=(0, *self._spatial), keepdim=True)

    def sumsq_(self, t: Tensor) -> Tensor:
        return t.square_().sum(dim=(0, *self._spatial))

    def samples(self, g: Tensor) -> int:
        return g.numel() // g.shape[1]

    def q_shape(self, n_in: int, rank: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        """Q as a transposed-conv kernel: (total rank) x (input channels per group) x k..."""
        return (rank, n_in // self.groups, *kernel)

    @staticmethod
    def q_rows(Q: Tensor) -> Tensor:
        """Q^T as an r x N matrix (N = n_g kh kw), a view of the r x n_g x kh x kw kernel."""
        return Q.reshape(Q.shape[0], -1)

    @staticmethod
    def q_from_rows(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        return q_rows.reshape(q_shape).contiguous()

    @staticmethod
    def q_from_rows_batched(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        """``q_from_rows`` for a stack of ungrouped layers: a view, L x r x n x k..."""
        return q_rows.reshape(q_rows.shape[0], *q_shape)

    def dense_from_factors(self, Q: Tensor, P: Tensor) -> Tensor:
        """B^T = (QP)^T as a kernel in W's layout (m x n_g x k...), group by group."""
        g = self.groups
        rows = torch.bmm(grouped(P, g).transpose(1, 2), grouped(self.q_rows(Q), g))
        return rows.reshape(g * P.shape[1], *Q.shape[1:])  # g m_g x n_g x k...
