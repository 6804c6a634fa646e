"""The products every rule is written in, once for a Linear and once for a Conv2d layer.

A rule's backward is written against these few operations, so one implementation serves
both layer kinds. Shapes, with m output channels, n input channels, r the feedback rank:

=====================  ==============================  ==========================================
operation              Linear (W: m x n)               Conv2d (W: m x n x kh x kw)
=====================  ==============================  ==========================================
``weight_grad(x, g)``  g^T x                           conv weight gradient (+ bias gradient)
``project(g, P)``      z = g P^T   (P: r x m)          1x1 conv, m -> r channels at every pixel
``lift(z, Q)``         z Q^T       (Q: n x r)          kxk transposed conv r -> n (Q: r x n x k x k)
``through(g, Bw)``     g Bw        (Bw in W's layout)  transposed conv with kernel Bw
``hebbian(x, z, Q)``   x^T z       (shape of Q)        conv weight gradient of the n -> r conv Q
``outer(a, b)``        sum over samples of a b^T       the same, summed over batch and pixels
=====================  ==============================  ==========================================

"Samples" are every row of a Linear input (batch x tokens) and every output pixel of a conv.
Only ``mm`` and ``convolution``/``convolution_backward`` are used for the heavy products, so
``torch.utils.flop_counter.FlopCounterMode`` sees each of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


@dataclass(frozen=True)
class LinearOps:
    """Products for ``nn.Linear``: inputs of any leading shape (batch, tokens, ..., features)."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def prepare(self, t: Tensor) -> Tensor:
        """One contiguous copy at most (gradients reaching a ViT's qkv or proj are often
        strided), so the several row views the backward takes cost nothing."""
        return t.contiguous()

    def weight_grad(
        self, x: Tensor, g: Tensor, weight_shape: torch.Size, has_bias: bool
    ) -> tuple[Tensor, Tensor | None]:
        g2 = _rows(g)
        grad_w = g2.t().mm(_rows(x))
        return grad_w, (g2.sum(0) if has_bias else None)

    def project(self, g: Tensor, P: Tensor) -> Tensor:
        return _rows(g).mm(P.t()).view(*g.shape[:-1], P.shape[0])

    def lift(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return _rows(z).mm(Q.t()).view(x_shape)

    def through(self, g: Tensor, w_layout: Tensor, x_shape: torch.Size) -> Tensor:
        return _rows(g).mm(w_layout).view(x_shape)

    def hebbian(self, x: Tensor, z: Tensor, q_shape: torch.Size) -> Tensor:
        return _rows(x).t().mm(_rows(z))

    def outer(self, a: Tensor, b: Tensor) -> Tensor:
        return _rows(a).t().mm(_rows(b))

    def centre(self, t: Tensor) -> Tensor:
        return t - _rows(t).mean(0)

    def centred_sumsq(self, t: Tensor) -> Tensor:
        """Per channel, the sum over samples of (t - mean)^2: diag of the centred covariance.
        (Centre, square, sum: 16x faster on CPU than torch.var over the batch dimension.)"""
        centred = self.centre(t)
        return _rows(centred * centred).sum(0)

    def samples(self, g: Tensor) -> int:
        return g.numel() // g.shape[-1]

    @staticmethod
    def q_shape(n_in: int, rank: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        return (n_in, rank)

    @staticmethod
    def q_rows(Q: Tensor) -> Tensor:
        """Q^T as an r x N matrix (N = n): the factor in W's layout, B^T = P^T Q^T."""
        return Q.t()

    @staticmethod
    def q_from_rows(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        return q_rows.t().contiguous()

    @staticmethod
    def dense_from_factors(Q: Tensor, P: Tensor) -> Tensor:
        """B^T = (QP)^T in W's layout (m x n)."""
        return P.t().mm(Q.t())


@dataclass(frozen=True)
class ConvOps:
    """Products for ``nn.Conv2d`` with zero padding and ``groups == 1``."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def prepare(self, t: Tensor) -> Tensor:
        return t  # convolutions take any memory format (channels_last included)

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
            [0, 0],
            1,
            mask,
        )

    def weight_grad(
        self, x: Tensor, g: Tensor, weight_shape: torch.Size, has_bias: bool
    ) -> tuple[Tensor, Tensor | None]:
        bias_sizes = [weight_shape[0]] if has_bias else None
        _, grad_w, grad_b = self._backward(g, x, weight_shape, (False, True, has_bias), bias_sizes)
        return grad_w, (grad_b if has_bias else None)

    def project(self, g: Tensor, P: Tensor) -> Tensor:
        return F.conv2d(g, P[:, :, None, None])

    def lift(self, z: Tensor, Q: Tensor, x_shape: torch.Size) -> Tensor:
        return self._backward(z, x_shape, Q, (True, False, False))[0]

    def through(self, g: Tensor, w_layout: Tensor, x_shape: torch.Size) -> Tensor:
        return self._backward(g, x_shape, w_layout, (True, False, False))[0]

    def hebbian(self, x: Tensor, z: Tensor, q_shape: torch.Size) -> Tensor:
        return self._backward(z, x, q_shape, (False, True, False))[1]

    def outer(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("nihw,njhw->ij", a, b)

    def centre(self, t: Tensor) -> Tensor:
        return t - t.mean(dim=(0, 2, 3), keepdim=True)

    def centred_sumsq(self, t: Tensor) -> Tensor:
        centred = self.centre(t)
        return (centred * centred).sum(dim=(0, 2, 3))

    def samples(self, g: Tensor) -> int:
        return g.numel() // g.shape[1]

    @staticmethod
    def q_shape(n_in: int, rank: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
        return (rank, n_in, *kernel)

    @staticmethod
    def q_rows(Q: Tensor) -> Tensor:
        """Q^T as an r x N matrix (N = n kh kw), a view of the r x n x kh x kw kernel."""
        return Q.reshape(Q.shape[0], -1)

    @staticmethod
    def q_from_rows(q_rows: Tensor, q_shape: tuple[int, ...]) -> Tensor:
        return q_rows.reshape(q_shape).contiguous()

    @staticmethod
    def dense_from_factors(Q: Tensor, P: Tensor) -> Tensor:
        """B^T = (QP)^T as a kernel in W's layout (m x n x kh x kw)."""
        r = Q.shape[0]
        return P.t().mm(Q.reshape(r, -1)).view(P.shape[1], *Q.shape[1:])
