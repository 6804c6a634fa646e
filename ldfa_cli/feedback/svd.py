"""``svd_dfa``: direct feedback alignment on low-rank SVD manifolds (Roy, Apolinario, Das
Biswas & Roy 2025, arXiv 2510.25594; the second seed).

The public text is an abstract. This is the reading implemented here, term by term; every
term has a switch, so each ablation is a recipe override.

1. **Forward in SVD form.** A converted layer holds W = U diag(s) V^T of rank k, with
   U (m x k), s (k), V (N x k), N = n kh kw; the dense W is never stored. U, s, V start
   from the truncated SVD of the layer's initial weight. A Linear layer computes
   y = ((x V) * s) U^T + b; a conv layer runs two convolutions: a kh x kw conv with the
   kernel V^T reshaped to (k, n, kh, kw) and the layer's stride, padding and dilation,
   then a 1x1 conv with U (plus bias), the k channels scaled by s in between (the same
   function as U s^1/2 after s^1/2 V^T). Trainable parameters: k (m + N + 1) + m instead of
   m N + m.

2. **Direct feedback.** As ``dfa``: the source error e (default the output's) reaches each
   layer's input through a fixed random B_l, so autograd hands layer l the error
   g_l = (B_{l+1} e) * f'(a_l) at its output; no W^T product exists anywhere.

3. **Feedback that matches the factors** (``project``, default on). The layer learns from
   the part of g_l inside its own output subspace, g^_l = U U^T g_l: the error reaches the
   layer's parameters only through its k-dimensional manifold. Local gradients, with
   a = x V (per sample), h = a * s and z = g^ U:

       dL/dU = g^T h,   dL/ds = sum_samples z * a,   dL/dV = x^T (z * s),   dL/db = g^.

   These are exactly the gradients of W = U diag(s) V^T (and its bias) for the output
   gradient g^, so ``project: false`` gives the unstructured DFA gradients of the factors.

4. **Subspace alignment** (``align`` = lambda_align, 0 switches it off). For every layer
   the fraction of the received error outside the layer's output subspace,

       L_align,l = || g_l (I - U U^T) ||_F^2 / || g_l ||_F^2,

   with g_l held fixed (it is the teaching signal, not a function of U). Its gradient,
   -2 [G (I - U U^T) + (I - U U^T) G] U / tr G with G = g_l^T g_l, is added to U.grad
   inside the backward: it turns U toward the dominant directions of the error the layer
   receives, so that the projection in 3 keeps them. (With 3 on and 4 off, the subspace
   spanned by U never turns: U's CE gradient lies in that span.)

5. **Orthogonality** (``orth`` = lambda_orth, 0 switches it off):

       L_orth = sum_l ||U_l^T U_l - I||_F^2 + ||V_l^T V_l - I||_F^2,

   an ordinary loss term: the training loop adds lambda_orth L_orth to the cross-entropy
   (:func:`ldfa_cli.feedback.auxiliary_loss`) and autograd differentiates it. It keeps
   the factors a true SVD, so s carries the scale and 3-4 measure what they claim.

Loss: L = CE + lambda_align sum_l L_align,l + lambda_orth L_orth. Every gradient is local to
a layer: its own factors, its input and the broadcast error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import accounting
from .broadcast import BroadcastChannel, DirectFeedbackAlignment
from .layers import (
    ConvShape,
    FeedbackLayer,
    LDFAConv2d,
    LDFALinear,
    LinearShape,
    _reference,
    conv_padding,
    per_device,
)
from .ops import ConvOps, LinearOps
from .rule import FeedbackConfigError, Rule, check, phase_flops, register, resolve_rank

_PIXELWISE = ConvOps((1, 1), (0, 0), (1, 1))  # U: a 1x1 conv at every output pixel


def orthogonality_error(factor: Tensor) -> Tensor:
    """||F^T F - I||_F^2 for a factor F with orthonormal columns as its goal."""
    gram = factor.t() @ factor
    return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).square().sum()


def _alignment_grad(ops_u, g: Tensor, z_raw: Tensor, U: Tensor, UtU: Tensor) -> Tensor:
    """d L_align / dU = -2 [G (I - UU^T) + (I - UU^T) G] U / tr G  (item 4), from
    GU = g^T (g U) and U^T G U = (gU)^T (gU); G itself (m x m) is never formed."""
    GU = ops_u.outer(g, z_raw)  # m x k
    UtGU = ops_u.outer(z_raw, z_raw)  # k x k
    total = g.float().square().sum().clamp_min(1e-30).to(g.dtype)
    return (GU @ UtU + U @ UtGU - 2 * GU) * (2 / total)


@dataclass(frozen=True)
class Geometry:
    """What the autograd Function needs to know of an SVD layer (a constant, hashable)."""

    name: str
    ops_v: LinearOps | ConvOps  # the n -> k product with V^T (the layer's own conv)
    ops_u: LinearOps | ConvOps  # the k -> m product with U (1x1 at every pixel)
    v_shape: tuple[int, ...]  # V^T as a weight: (k, n) or (k, n, kh, kw)
    channel_dim: int  # -1 for Linear, 1 for Conv2d

    @property
    def u_kernel_dims(self) -> tuple[int, ...]:
        return () if self.channel_dim == -1 else (1, 1)

    def forward(self, x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias) -> tuple[Tensor, Tensor]:
        """(y, a): a = x V, y = (a * s) U^T + b."""
        a = self.ops_v.forward(x, V.t().reshape(self.v_shape), None)
        u_weight = U.view(*U.shape, *self.u_kernel_dims)
        return self.ops_u.forward(_scale(a, s, self.channel_dim), u_weight, bias), a


def _scale(t: Tensor, s: Tensor, channel_dim: int) -> Tensor:
    return t * (s if channel_dim == -1 else s.view(-1, 1, 1))


def _sample_sum(t: Tensor, channel_dim: int) -> Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0) if channel_dim == -1 else t.sum(dim=(0, 2, 3))


def _make_svd_function(device_type: str) -> type[torch.autograd.Function]:
    class SVDFeedbackFunction(torch.autograd.Function):
        """Forward through V, s, U; backward: the factors' local gradients from the
        (projected) output error, U's alignment gradient, and the broadcast input gradient."""

        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type)
        def forward(ctx, x, U, s, V, bias, rule, geometry, *feedback):
            if torch.is_autocast_enabled(device_type):
                low = torch.get_autocast_dtype(device_type)
                x, U, s, V = x.to(low), U.to(low), s.to(low), V.to(low)
                bias = bias.to(low) if bias is not None else None
            ctx.rule, ctx.geometry, ctx.x_shape = rule, geometry, x.shape
            y, a = geometry.forward(x, U, s, V, bias)
            ctx.save_for_backward(x, a, U, s, *feedback)  # not V: V s U^T g is never formed
            return y

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(ctx, g):
            x, a, U, s, *feedback = ctx.saved_tensors
            rule, geo = ctx.rule, ctx.geometry
            ops_u, ops_v, dim = geo.ops_u, geo.ops_v, geo.channel_dim
            need_x, need_u, need_s, need_v, need_b = ctx.needs_input_grad[:5]
            counting = accounting.ACTIVE
            if counting:
                previous = accounting.enter(geo.name, "weight_grad")
            g = ops_v.prepare(g)
            x, a = ops_v.prepare(x.to(g.dtype)), a.to(g.dtype)
            U, s = U.to(g.dtype), s.to(g.dtype)
            z_raw = ops_u.project(g, U.t())  # g U: the error's coordinates in U
            UtU = U.t() @ U if (rule.project or rule.align) else None
            if rule.project:  # item 3: g^ = g U U^T, z = g^ U
                g_used, z = ops_u.project(z_raw, U), ops_u.project(z_raw, UtU)
            else:
                g_used, z = g, z_raw
            u_shape = (*U.shape, *geo.u_kernel_dims)
            grad_u, grad_b = ops_u.weight_grad(_scale(a, s, dim), g_used, u_shape, need_b)
            grad_u = grad_u.reshape(U.shape)
            grad_s = _sample_sum(z * a, dim) if need_s else None
            grad_v = None
            if need_v:
                grad_v = ops_v.weight_grad(x, _scale(z, s, dim), geo.v_shape, False)[0]
                grad_v = grad_v.reshape(geo.v_shape[0], -1).t()  # (k, N) -> V's N x k
            if rule.align and need_u:  # item 4
                if counting:
                    accounting.set_phase("feedback_update")
                grad_u = grad_u + rule.align * _alignment_grad(ops_u, g, z_raw, U, UtU)
            grad_x = None
            if need_x and rule.sends:  # item 2: the broadcast, never V s U^T g
                if counting:
                    accounting.set_phase("broadcast")
                grad_x = rule.spread(rule.source_error(g), feedback[0].to(g.dtype), ctx.x_shape)
            if counting:
                accounting.leave(previous)
            return (grad_x, grad_u if need_u else None, grad_s, grad_v, grad_b,
                    None, None, *(None for _ in feedback))  # fmt: skip

    SVDFeedbackFunction.__name__ = f"SVDFeedbackFunction_{device_type}"
    return SVDFeedbackFunction


svd_function = per_device(_make_svd_function)


class SVDLayer(FeedbackLayer):
    """Mixin for a layer held as W = U diag(s) V^T (parameters ``svd_U`` m x k, ``svd_s``,
    ``svd_V`` N x k, and ``bias``). ``weight`` is the dense product, read-only."""

    svd_U: nn.Parameter
    svd_s: nn.Parameter
    svd_V: nn.Parameter
    channel_dim: ClassVar[int]

    def _setup_svd(self, weight: Tensor, bias, rule, rank, name: str) -> None:
        self.layer_name = name
        self.rule = rule
        # k, the rank of W's factorisation: a fraction refers to the output width m
        self.rank = resolve_rank(rank, name=name, m=self.fan_out, full_rank=self.full_rank)
        self.rank_asked = rank
        k = self.rank
        U, S, Vh = torch.linalg.svd(weight.detach().reshape(self.fan_out, -1).double(),
                                    full_matrices=False)  # fmt: skip
        like = dict(device=weight.device, dtype=weight.dtype)
        self.svd_U = nn.Parameter(U[:, :k].to(**like).contiguous())
        self.svd_s = nn.Parameter(S[:k].to(**like))
        self.svd_V = nn.Parameter(Vh[:k].t().to(**like).contiguous())
        self.bias = bias
        self.feedback_targets = None
        self.geometry = Geometry(name, self.ops, self.ops_u, (k, self.fan_in, *self.kernel),
                                 self.channel_dim)  # fmt: skip
        rule.create_feedback(self)

    @property
    def weight(self) -> Tensor:
        """W = U diag(s) V^T in nn.Linear / nn.Conv2d's layout (differentiable)."""
        rows = (self.svd_U * self.svd_s) @ self.svd_V.t()
        return rows.reshape(self.fan_out, self.fan_in, *self.kernel)

    @classmethod
    def replacing(cls, module: nn.Module, name: str, rule, rank) -> SVDLayer:
        """The SVD-form replacement of an ``nn.Linear`` or ``nn.Conv2d`` (bias shared)."""
        if isinstance(module, nn.Conv2d):
            return SVDConv2d(module, rule, rank, name)
        if isinstance(module, nn.Linear):
            return SVDLinear(module, rule, rank, name)
        raise FeedbackConfigError(f"layer {name!r}: svd_dfa converts Linear and Conv2d layers only")

    def _forward_routed(self, x: Tensor) -> Tensor:
        """The SVD Function even for a first layer (the factors learn from the projected
        error); plain autograd through the factors for the backprop reference."""
        if _reference["bp"] or not torch.is_grad_enabled():
            return self.geometry.forward(x, self.svd_U, self.svd_s, self.svd_V, self.bias)[0]
        function = svd_function(x.device.type)
        return function.apply(x, self.svd_U, self.svd_s, self.svd_V, self.bias, self.rule,
                              self.geometry, *self.rule.feedback_tensors(self))  # fmt: skip


class SVDLinear(LinearShape, SVDLayer, nn.Linear):
    """An ``nn.Linear`` held in SVD form (see the module docstring)."""

    channel_dim: ClassVar[int] = -1

    def __init__(self, linear: nn.Linear, rule, rank, name: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ops, self.ops_u = LinearOps(), LinearOps()
        self._setup_svd(linear.weight, linear.bias, rule, rank, name)
        self.train(linear.training)

    def dense_twin(self) -> nn.Module:
        """The dense layer this one replaces (rule bp, W = U diag(s) V^T): for references."""
        twin = LDFALinear(self.in_features, self.out_features, self.bias is not None,
                          rule="bp", name=self.layer_name)  # fmt: skip
        return _fill_twin(twin, self)


class SVDConv2d(ConvShape, SVDLayer, nn.Conv2d):
    """An ``nn.Conv2d`` held in SVD form: a kh x kw conv to k channels, then a 1x1 conv."""

    channel_dim: ClassVar[int] = 1
    _CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                    "dilation", "transposed", "output_padding", "groups", "padding_mode",
                    "_reversed_padding_repeated_twice")  # fmt: skip

    def __init__(self, conv: nn.Conv2d, rule, rank, name: str):
        nn.Module.__init__(self)
        padding = conv_padding(conv, name)
        for field_name in self._CONV_FIELDS:
            setattr(self, field_name, getattr(conv, field_name))
        self.ops = ConvOps(tuple(conv.stride), padding, tuple(conv.dilation))
        self.ops_u = _PIXELWISE
        self._setup_svd(conv.weight, conv.bias, rule, rank, name)
        self.train(conv.training)

    def dense_twin(self) -> nn.Module:
        """The dense layer this one replaces (rule bp, W = U diag(s) V^T): for references."""
        twin = LDFAConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, 1, self.bias is not None,
                          rule="bp", name=self.layer_name)  # fmt: skip
        return _fill_twin(twin, self)


def _fill_twin(twin: nn.Module, layer: SVDLayer) -> nn.Module:
    with torch.no_grad():
        twin.to(layer.svd_U.device, layer.svd_U.dtype)
        twin.weight.copy_(layer.weight)
        if layer.bias is not None:
            twin.bias.copy_(layer.bias)
    twin.train(layer.training)
    twin.always_routed = True  # a first layer's backward counted under it, as the SVD one
    return twin


def svd_parameter_count(layer: SVDLayer) -> tuple[int, int]:
    """(trainable parameters in SVD form, in the dense layer it replaces)."""
    k, m, N = layer.rank, layer.fan_out, layer.patch_size
    bias = m if layer.bias is not None else 0
    return k * (m + N + 1) + bias, m * N + bias


def factor_measures(layer: SVDLayer) -> dict:
    """||U^T U - I||_F, ||V^T V - I||_F and the singular values' range, for reports."""
    with torch.no_grad():
        U, V, s = layer.svd_U.float(), layer.svd_V.float(), layer.svd_s.float()
        return {
            "u_orth_error": math.sqrt(float(orthogonality_error(U))),
            "v_orth_error": math.sqrt(float(orthogonality_error(V))),
            "s_max": float(s.abs().max()),
            "s_min": float(s.abs().min()),
        }


@register
@dataclass(frozen=True)
class SVDDirectFeedback(DirectFeedbackAlignment):
    """svd_dfa: layers in SVD form U diag(s) V^T of rank k, trained by direct feedback
    projected onto each layer's output subspace, with the subspace-alignment and
    orthogonality terms (module docstring, items 1-5)."""

    name: ClassVar[str] = "svd_dfa"
    summary: ClassVar[str] = "DFA on SVD factors U diag(s) V^T: projected error, align + orth"
    equations: ClassVar[str] = "Roy et al. 2025 (module docstring)"
    uses_rank: ClassVar[bool] = True
    layer_class: ClassVar[type] = SVDLayer  # a layer in SVD form, the first one too
    internal: ClassVar[tuple] = (*DirectFeedbackAlignment.internal, "sends")

    align: float = 0.1
    orth: float = 0.1
    project: bool = True
    sends: bool = True  # False for a layer whose input needs no gradient (no B is made)

    def __post_init__(self):
        check(self.align >= 0, f"rule 'svd_dfa': align must be >= 0, got {self.align}")
        check(self.orth >= 0, f"rule 'svd_dfa': orth must be >= 0, got {self.orth}")

    def kept_because(self, module: nn.Module, rank, force_grouped: bool) -> str | None:
        if isinstance(module, nn.Conv1d) or getattr(module, "groups", 1) > 1:
            return "kept: svd_dfa trains Linear and ungrouped Conv2d layers only"
        return None

    def for_layer(self, info: dict, source: dict, channel: BroadcastChannel) -> Rule | None:
        """Every layer before the source, the first one too (its SVD form is its forward);
        one whose input needs no gradient sends nothing (no B is made)."""
        rule = super().for_layer({**info, "needs_grad": True}, source, channel)
        return rule if info["needs_grad"] else dataclasses.replace(rule, sends=False)

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """Forward x V then (a s) U^T; backward g U, the projection (g U) U^T and
        (g U)(U^T U), the gradients of U and V; alignment g^T (g U), (g U)^T (g U) and two
        m x k x k products; the broadcast as dfa's."""
        T, k, m, N = samples, layer.rank, layer.fan_out, layer.patch_size
        gram = 2 * m * k * k if (self.project or self.align) else 0  # U^T U
        projection = 2 * T * m * k + 2 * T * k * k if self.project else 0
        align = 2 * T * m * k + 2 * T * k * k + 4 * m * k * k if self.align else 0
        broadcast = 2 * self.broadcast_rows(batch) * self.source_width * self.input_width
        return phase_flops(
            forward=2 * T * k * (N + m),
            weight_grad=2 * T * m * k + gram + projection + 2 * T * m * k + 2 * T * N * k,
            feedback_update=align,
            broadcast=broadcast if self.sends else 0,
        )

    def create_feedback(self, layer) -> None:
        if self.sends:
            super().create_feedback(layer)

    def feedback_tensors(self, layer):
        return (layer.feedback_B,) if self.sends else ()

    def auxiliary_loss(self, layer) -> Tensor | None:
        """lambda_orth (||U^T U - I||^2 + ||V^T V - I||^2), item 5."""
        if not self.orth:
            return None
        return self.orth * (orthogonality_error(layer.svd_U) + orthogonality_error(layer.svd_V))

    def layer_measures(self, layer) -> dict:
        return factor_measures(layer)
