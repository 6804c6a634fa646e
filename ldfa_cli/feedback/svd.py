"""``svd_dfa``: direct feedback alignment on low-rank SVD manifolds (Roy, Apolinario, Das
Biswas & Roy 2025, arXiv 2510.25594, "Feedback Alignment Meets Low-Rank Manifolds"; the
second seed; earlier version "Unlocking SVD-Space for Feedback Aligned Local Training",
ICLR 2025 submission, OpenReview 8Agcic0csh).

No code of theirs is public and only the abstract is in the seeds. The reading here, term by
term, with where each choice comes from ([paper]: the abstract of 2510.25594v1; [reviews]:
the five public reviews of the earlier version, which quote its equations; [summary]:
third-party summaries of v1 (themoonlight.io); [guess]: not found, chosen here). Every term
has a switch, so each ablation is a recipe override; the first reading (options
``align_loss: subspace``, ``project: true``, ``feedback_form: dense``) stays available.

1. **Forward in SVD form** [paper, summary: "W_i = U_i S_i V_i^T ... U_i, V_i orthogonal, S_i
   diagonal", "decompose weight matrices into their SVD components before training"]. A
   converted layer holds W = U diag(s) V^T of rank k, U (m x k), s (k), V (N x k),
   N = n kh kw; the dense W is never stored; U, s, V start from the truncated SVD of the
   layer's initial weight and all three train [paper: "updates the SVD components"]. A
   Linear layer computes y = ((x V) * s) U^T + b; a conv layer a kh x kw conv with V^T as
   its kernel, then a 1x1 conv with U (``conv_split: channel``); with ``conv_split:
   spatial`` (the default) [summary: "a kernel K in R^{N x C x H x W} is reshaped into a 2D
   matrix K' in R^{NW x CH}, decomposed as K' = U Sigma V^T, and then reshaped into two
   convolutional kernels", an H x 1 and a 1 x W one; guess: which stage carries the stride
   and padding (each its own axis's)] the kernel as K'[(n, w), (c, h)], run as an H x 1
   conv to k channels and a 1 x W conv.

2. **Direct feedback** [paper: "leverages Direct Feedback Alignment"; reviews: the error is
   the output's y_predict - y_label]. As ``dfa``: the source error e reaches each layer's
   input through a fixed random B_l, so autograd hands layer l the error
   g_l = (B_{l+1} e) * f'(a_l) at its output; no W^T product exists anywhere. With
   ``feedback_form: svd`` (the default) [paper: "feedback matrices are constructed to match
   the SVD structure"; reviews: "(B_U B_S B_V^T)^T e"] B_l is the truncated SVD, at the
   receiving layer's rank k, of dfa's random draw [guess: how B's factors are drawn, and
   that B stays fixed (a reviewer asks about "initializing" it)]. With k at least the
   source's width (10 classes, k = 32 in the recipes) the truncation keeps all of B.

3. **Local gradients** [paper]. With a = x V (per sample), h = a * s and z = g U:

       dL/dU = g^T h,   dL/ds = sum_samples z * a,   dL/dV = x^T (z * s),   dL/db = g,

   exactly the gradients of W = U diag(s) V^T (and its bias) for the output gradient g.
   ``project: true`` (the first reading; no source describes it [reviews, summary]) uses
   g^ = g U U^T in place of g, the error inside the layer's output subspace.

4. **Alignment** (``align`` = lambda_align, 0 switches it off). ``align_loss: cosine`` (the
   default) [reviews: "Equation (5) defines a cosine similarity between layer_output =
   layer_input (U S V^T) and the feedback signal (B_U B_S B_V^T)^T e"; "aligning the output
   of the layer with its estimated gradient"]: for every sample i,

       L_align,l = mean_i [1 - cos(y_i, -g_i)],   y = (x V * s) U^T (no bias),

   g held fixed (the teaching signal). Its gradient reaches U, s and V through y
   (:func:`cosine_alignment_grad`, added to the output gradient those three see, not the
   bias's). [guess: the sign, -g being the descent direction (with +g it would pull against
   the DFA step); a conv's sample is its whole flattened map; the mean over samples.]
   ``align_loss: subspace`` (the first reading): || g_l (I - U U^T) ||_F^2 / || g_l ||_F^2,
   its gradient -2 [G (I - U U^T) + (I - U U^T) G] U / tr G (G = g_l^T g_l) added to U.grad.

5. **Orthogonality** (``orth`` = lambda_orth) [paper: "orthogonality constraints"; reviews:
   "preserve orthogonality of the U and V matrices"; guess: the form and the weight]:

       L_orth = sum_l ||U_l^T U_l - I||_F^2 + ||V_l^T V_l - I||_F^2,

   an ordinary loss term: the training loop adds lambda_orth L_orth to the cross-entropy
   (:func:`ldfa_cli.feedback.auxiliary_loss`) and autograd differentiates it.

6. **Rank reduction** (``reduce_at_epochs``, ``energy``, ``min_rank``) [paper: "dynamically
   reducing the rank of the SVD components during training"; reviews: "dynamic rank
   reduction combining epoch-based scheduling with energy threshold", "r_k drops at epoch
   boundaries"; guess: the rule, the threshold's value and what happens to the optimizer
   state, which the paper leaves open (a reviewer asks)]. After each epoch listed, every
   layer keeps its fewest singular triplets (largest |s|) whose s^2 hold ``energy`` of the
   sum, at least ``min_rank``: U's and V's columns and s's entries are cut, and so are their
   optimizer moments (:func:`cut_rank`); the step's FLOPs are counted again. The feedback B
   keeps its rank. Off by default (no epochs listed).

7. **Sparsity** (``sparsity`` = lambda_sparsity, 0 by default) [reviews of the earlier
   version: "a Hoyer regularizer ... sparsifies singular values"; guess: the form
   ||s||_1 / ||s||_2 and its weight; the v1 abstract lists no sparsity term]: added to the
   loss as the orthogonality term is; it drives s toward few large values, which the rank
   reduction (6) then cuts.

Loss: L = CE + lambda_align sum_l L_align,l + lambda_orth L_orth (+ lambda_sparsity sum_l
||s_l||_1/||s_l||_2); the weights are the paper's alpha-epsilon, "chosen by
cross-validation" [reviews]; their values were not found (0.1 and 0.1 here [guess]). Every
gradient is local to a layer: its own factors, its input and the broadcast error.
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


def hoyer(s: Tensor) -> Tensor:
    """||s||_1 / ||s||_2, the Hoyer measure: 1 for one nonzero value, sqrt(k) for k equal."""
    return s.abs().sum() / s.norm().clamp_min(1e-12)


def cosine_alignment_grad(y: Tensor, g: Tensor, channel_dim: int) -> Tensor:
    """d/dy of L_align = mean_i [1 + cos(y_i, g_i)] = mean_i [1 - cos(y_i, -g_i)], g held
    fixed (item 4): the output of every sample (a row of a Linear's input, an image of a
    conv, flattened) turned toward the descent direction -g_i of the error it received,
    (g_i/|g_i| - cos_i y_i/|y_i|) / (|y_i| T) for T samples."""
    rows = y.reshape(-1, y.shape[-1]) if channel_dim == -1 else y.reshape(y.shape[0], -1)
    yf, gf = rows.float(), g.reshape(rows.shape).float()
    y_norm = yf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g_norm = gf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (yf * gf).sum(1, keepdim=True) / (y_norm * g_norm)
    grad = (gf / g_norm - cos * yf / y_norm) / (y_norm * rows.shape[0])
    return grad.reshape(y.shape).to(g.dtype)


def _alignment_grad(ops_u, g: Tensor, z_raw: Tensor, U: Tensor, UtU: Tensor) -> Tensor:
    """d L_align / dU = -2 [G (I - UU^T) + (I - UU^T) G] U / tr G  (item 4), from
    GU = g^T (g U) and U^T G U = (gU)^T (gU); G itself (m x m) is never formed."""
    GU = ops_u.outer(g, z_raw)  # m x k
    UtGU = ops_u.outer(z_raw, z_raw)  # k x k
    total = g.float().square().sum().clamp_min(1e-30).to(g.dtype)
    return (GU @ UtU + U @ UtGU - 2 * GU) * (2 / total)


@dataclass(frozen=True)
class Geometry:
    """What the autograd Function needs to know of an SVD layer (a constant, hashable): the
    two stages x -> a = x V (kernel V^T, ``ops_v``) and h = a s -> y = h U^T (kernel U,
    ``ops_u``), and how U and V sit in those kernels. ``split``: ``channel`` (a Linear
    layer; a conv as a kh x kw conv to k channels, then 1x1) or ``spatial`` (a conv as an
    H x 1 conv to k channels, then a 1 x W conv: the kernel as NW x CH, item 1)."""

    name: str
    ops_v: LinearOps | ConvOps
    ops_u: LinearOps | ConvOps
    v_shape: tuple[int, ...]  # V^T as a kernel: (k, n), (k, n, kh, kw) or (k, C, H, 1)
    u_shape: tuple[int, ...]  # U as a kernel: (m, k), (m, k, 1, 1) or (N, k, 1, W)
    channel_dim: int  # -1 for Linear, 1 for Conv2d
    split: str = "channel"

    def v_kernel(self, V: Tensor) -> Tensor:
        return V.t().reshape(self.v_shape)

    def u_kernel(self, U: Tensor) -> Tensor:
        if self.split == "spatial":  # U's rows are (n, w) pairs: kernel[n, j, 0, w]
            N, k, _, W = self.u_shape
            return U.reshape(N, W, k).permute(0, 2, 1).unsqueeze(2)
        return U.view(self.u_shape)

    def u_from_kernel(self, grad: Tensor) -> Tensor:
        if self.split == "spatial":
            N, k, _, W = grad.shape
            return grad.squeeze(2).permute(0, 2, 1).reshape(N * W, k)
        return grad.reshape(grad.shape[0], grad.shape[1])

    def v_from_kernel(self, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1).t()

    def to_inner(self, g: Tensor, U: Tensor, a_shape) -> Tensor:
        """An output gradient carried back to h = a s: g U (through the 1 x W conv's
        transpose for the spatial split)."""
        if self.split == "spatial":
            return self.ops_u.through(g, self.u_kernel(U), a_shape)
        return self.ops_u.project(g, U.t())

    def forward(self, x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias) -> tuple[Tensor, Tensor]:
        """(y, a): a = x V, y = (a * s) U^T + b."""
        a = self.ops_v.forward(x, self.v_kernel(V), None)
        return self.ops_u.forward(_scale(a, s, self.channel_dim), self.u_kernel(U), bias), a

    def with_rank(self, k: int) -> Geometry:
        u = self.u_shape
        return dataclasses.replace(self, v_shape=(k, *self.v_shape[1:]), u_shape=(u[0], k, *u[2:]))


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
            z_raw = geo.to_inner(g, U, a.shape)  # g U: the error's coordinates in U
            UtU = U.t() @ U if rule.needs_gram else None
            if rule.project:  # item 3: g^ = g U U^T, z = g^ U
                g_used, z = ops_u.project(z_raw, U), ops_u.project(z_raw, UtU)
            else:
                g_used, z = g, z_raw
            grad_b = _sample_sum(g_used, dim) if need_b else None
            u_weight = geo.u_kernel(U)
            if rule.align and rule.align_loss == "cosine":  # item 4: through y to U, s, V
                if counting:
                    accounting.set_phase("feedback_update")
                y = ops_u.forward(_scale(a, s, dim), u_weight, None)
                pull = rule.align * cosine_alignment_grad(y, g, dim)
                g_used, z = g_used + pull, z + geo.to_inner(pull, U, a.shape)
                if counting:
                    accounting.set_phase("weight_grad")
            grad_u = ops_u.weight_grad(_scale(a, s, dim), g_used, u_weight.shape, False)[0]
            grad_u = geo.u_from_kernel(grad_u)
            grad_s = _sample_sum(z * a, dim) if need_s else None
            grad_v = None
            if need_v:
                grad_v = ops_v.weight_grad(x, _scale(z, s, dim), geo.v_shape, False)[0]
                grad_v = geo.v_from_kernel(grad_v)  # (k, N) -> V's N x k
            if rule.align and rule.align_loss == "subspace" and need_u:  # item 4
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

    @property
    def rank_clipped_from(self) -> int | None:
        """The rank k asked for, where it was above the full rank (a fraction of m)."""
        asked = self.rank_asked
        if asked is None or isinstance(asked, bool):
            return None
        asked = round(asked * self.fan_out) if isinstance(asked, float) else asked
        return asked if asked > self.rank else None

    def _setup_svd(self, weight: Tensor, bias, rule, rank, name: str) -> None:
        self.layer_name = name
        self.rule = rule
        # k, the rank of W's factorisation: a fraction refers to the output width m
        self.rank = resolve_rank(rank, name=name, m=self.fan_out, full_rank=self.full_rank)
        self.rank_asked = rank
        k = self.rank
        U, S, Vh = torch.linalg.svd(self.matrix_of(weight.detach()).double(),
                                    full_matrices=False)  # fmt: skip
        like = dict(device=weight.device, dtype=weight.dtype)
        self.svd_U = nn.Parameter(U[:, :k].to(**like).contiguous())
        self.svd_s = nn.Parameter(S[:k].to(**like))
        self.svd_V = nn.Parameter(Vh[:k].t().to(**like).contiguous())
        self.bias = bias
        self.feedback_targets = None
        self.geometry = self.make_geometry(name, k)
        rule.create_feedback(self)

    def matrix_of(self, weight: Tensor) -> Tensor:
        """The matrix factorised as U diag(s) V^T: W as m x (n kh kw)."""
        return weight.reshape(self.fan_out, -1)

    def make_geometry(self, name: str, k: int) -> Geometry:
        u_shape = (self.fan_out, k, *((1, 1) if self.channel_dim == 1 else ()))
        return Geometry(name, self.ops, self.ops_u, (k, self.fan_in, *self.kernel), u_shape,
                        self.channel_dim)  # fmt: skip

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
    """An ``nn.Conv2d`` held in SVD form: with ``conv_split: spatial`` (the default, the
    paper's) the kernel N x C x H x W as the NW x CH matrix K'[(n, w), (c, h)], run as an
    H x 1 conv to k channels (stride, padding and dilation along H) and then a 1 x W conv
    (along W); with ``channel`` as the N x CHW matrix, a kh x kw conv to k channels then a
    1x1 conv."""

    channel_dim: ClassVar[int] = 1
    _CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                    "dilation", "transposed", "output_padding", "groups", "padding_mode",
                    "_reversed_padding_repeated_twice")  # fmt: skip

    def __init__(self, conv: nn.Conv2d, rule, rank, name: str):
        nn.Module.__init__(self)
        padding = conv_padding(conv, name)
        for field_name in self._CONV_FIELDS:
            setattr(self, field_name, getattr(conv, field_name))
        self.split = rule.conv_split
        if self.split == "spatial" and rule.needs_gram:
            raise FeedbackConfigError(
                f"layer {name!r}: svd_dfa's project and align_loss subspace read U as a map of "
                "channels; set conv_split: channel with them"
            )
        if self.split == "spatial":
            (sh, sw), (ph, pw), (dh, dw) = conv.stride, padding, conv.dilation
            self.ops = ConvOps((sh, 1), (ph, 0), (dh, 1))  # H x 1, C -> k
            self.ops_u = ConvOps((1, sw), (0, pw), (1, dw))  # 1 x W, k -> N
        else:
            self.ops = ConvOps(tuple(conv.stride), padding, tuple(conv.dilation))
            self.ops_u = _PIXELWISE
        self._setup_svd(conv.weight, conv.bias, rule, rank, name)
        self.train(conv.training)

    @property
    def full_rank(self) -> int:
        if self.split == "spatial":
            (kh, kw), n, m = self.kernel, self.in_channels, self.out_channels
            return min(m * kw, n * kh)
        return super().full_rank

    def matrix_of(self, weight: Tensor) -> Tensor:
        if self.split == "spatial":  # K'[(n, w), (c, h)] = K[n, c, h, w]
            m, n, kh, kw = weight.shape
            return weight.permute(0, 3, 1, 2).reshape(m * kw, n * kh)
        return super().matrix_of(weight)

    def make_geometry(self, name: str, k: int) -> Geometry:
        if self.split == "spatial":
            (kh, kw), n, m = self.kernel, self.in_channels, self.out_channels
            return Geometry(name, self.ops, self.ops_u, (k, n, kh, 1), (m, k, 1, kw), 1,
                            "spatial")  # fmt: skip
        return super().make_geometry(name, k)

    @property
    def weight(self) -> Tensor:
        if self.split != "spatial":
            return super().weight
        (kh, kw), n, m = self.kernel, self.in_channels, self.out_channels
        rows = (self.svd_U * self.svd_s) @ self.svd_V.t()  # (m kw) x (n kh)
        return rows.reshape(m, kw, n, kh).permute(0, 2, 3, 1)

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


def energy_rank(s: Tensor, energy: float, min_rank: int) -> int:
    """The fewest singular values (by magnitude) whose squares hold ``energy`` of the sum
    of all squares, at least ``min_rank`` (and at most all of them)."""
    squares = s.detach().double().square().sort(descending=True).values
    held = squares.cumsum(0) / squares.sum().clamp_min(1e-300)
    needed = int(torch.searchsorted(held, held.new_tensor(energy))) + 1
    return max(min(min_rank, len(s)), min(needed, len(s)))


def _cut(param: nn.Parameter, dim: int, keep: Tensor, optimizers: list) -> None:
    """Keep the entries ``keep`` of ``param`` along ``dim``, in place (the same Parameter,
    so the optimizers still hold it), with every optimizer state tensor of its shape (Adam's
    moments) cut alike; its gradient dropped."""
    old_shape = param.shape
    param.data = param.data.index_select(dim, keep)
    param.grad = None
    for optimizer in optimizers:
        state = optimizer.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = value.index_select(dim, keep)


def cut_rank(layer: SVDLayer, keep: Tensor, optimizers: list = ()) -> None:
    """Keep the singular triplets ``keep`` (indices into s) of an SVD layer: U's and V's
    columns, s's entries and their optimizer state; the layer's rank becomes len(keep)."""
    with torch.no_grad():
        keep = keep.to(layer.svd_s.device)
        _cut(layer.svd_U, 1, keep, optimizers)
        _cut(layer.svd_s, 0, keep, optimizers)
        _cut(layer.svd_V, 1, keep, optimizers)
    layer.rank = len(keep)
    layer.geometry = layer.geometry.with_rank(layer.rank)


def svd_parameter_count(layer: SVDLayer) -> tuple[int, int]:
    """(trainable parameters in SVD form, in the dense layer it replaces)."""
    k, m, N = layer.rank, layer.fan_out, layer.patch_size
    bias = m if layer.bias is not None else 0
    return k * (layer.svd_U.shape[0] + layer.svd_V.shape[0] + 1) + bias, m * N + bias


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
    through a fixed B in SVD form, with the cosine alignment, orthogonality and sparsity
    terms and the rank cut between epochs (module docstring, items 1-7)."""

    name: ClassVar[str] = "svd_dfa"
    summary: ClassVar[str] = "DFA on SVD factors U diag(s) V^T: cosine align + orth, rank cut"
    equations: ClassVar[str] = "Roy et al. 2025 (module docstring)"
    uses_rank: ClassVar[bool] = True
    layer_class: ClassVar[type] = SVDLayer  # a layer in SVD form, the first one too
    internal: ClassVar[tuple] = (*DirectFeedbackAlignment.internal, "sends")

    align: float = 0.1
    align_loss: str = "cosine"
    orth: float = 0.1
    project: bool = False
    feedback_form: str = "svd"
    conv_split: str = "spatial"
    sparsity: float = 0.0
    reduce_at_epochs: tuple[int, ...] = ()
    energy: float = 0.99
    min_rank: int = 1
    sends: bool = True  # False for a layer whose input needs no gradient (no B is made)

    def __post_init__(self):
        super().__post_init__()
        check(self.points == "layers",
              "rule 'svd_dfa': points must be layers (its layers are in SVD form; blocks "
              "is dfa's)")  # fmt: skip
        object.__setattr__(self, "reduce_at_epochs", tuple(self.reduce_at_epochs))
        check(all(isinstance(e, int) and e >= 1 for e in self.reduce_at_epochs),
              f"rule 'svd_dfa': reduce_at_epochs must list epochs >= 1, got "
              f"{list(self.reduce_at_epochs)}")  # fmt: skip
        check(0 < self.energy <= 1, f"rule 'svd_dfa': energy must be in (0, 1], got {self.energy}")
        check(self.min_rank >= 1, f"rule 'svd_dfa': min_rank must be >= 1, got {self.min_rank}")
        check(self.conv_split in ("spatial", "channel"),
              f"rule 'svd_dfa': conv_split must be spatial or channel, got "
              f"{self.conv_split!r}")  # fmt: skip

        check(self.align >= 0, f"rule 'svd_dfa': align must be >= 0, got {self.align}")
        check(self.orth >= 0, f"rule 'svd_dfa': orth must be >= 0, got {self.orth}")
        check(self.sparsity >= 0, f"rule 'svd_dfa': sparsity must be >= 0, got {self.sparsity}")
        check(self.align_loss in ("cosine", "subspace"),
              f"rule 'svd_dfa': align_loss must be cosine or subspace, got "
              f"{self.align_loss!r}")  # fmt: skip
        check(self.feedback_form in ("svd", "dense"),
              f"rule 'svd_dfa': feedback_form must be svd or dense, got "
              f"{self.feedback_form!r}")  # fmt: skip

    @property
    def needs_gram(self) -> bool:
        """U^T U is used by the projection and by the subspace alignment's gradient."""
        return self.project or (bool(self.align) and self.align_loss == "subspace")

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
        if getattr(layer, "split", "channel") == "spatial":
            return self._spatial_flops(layer, samples, batch)
        T, k, m, N = samples, layer.rank, layer.fan_out, layer.patch_size
        gram = 2 * m * k * k if self.needs_gram else 0  # U^T U
        projection = 2 * T * m * k + 2 * T * k * k if self.project else 0
        align = 0
        if self.align and self.align_loss == "subspace":
            align = 2 * T * m * k + 2 * T * k * k + 4 * m * k * k
        elif self.align:  # y = (a s) U^T again, and the pull's coordinates pull U
            align = 4 * T * m * k
        broadcast = 2 * self.broadcast_rows(batch) * self.source_width * self.input_width
        return phase_flops(
            forward=2 * T * k * (N + m),
            weight_grad=2 * T * m * k + gram + projection + 2 * T * m * k + 2 * T * N * k,
            feedback_update=align,
            broadcast=broadcast if self.sends else 0,
        )

    def _spatial_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """The spatial split: the H x 1 stage at every position of its output (the input's
        width, the output's height), the 1 x W stage at the output's; the backward carries g
        back through the 1 x W stage, and takes both stages' kernel gradients; the cosine
        alignment recomputes y and carries its pull back (one 1 x W product each)."""
        (kh, kw), n, m, k = layer.kernel, layer.in_channels, layer.fan_out, layer.rank
        (sh, _), (ph, _), (dh, _) = layer.ops.stride, layer.ops.padding, layer.ops.dilation
        _, h_in, w_in = self.input_shape
        rows = (h_in + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        stage_v = 2 * batch * rows * w_in * k * n * kh
        stage_u = 2 * samples * m * k * kw
        broadcast = 2 * self.broadcast_rows(batch) * self.source_width * self.input_width
        return phase_flops(
            forward=stage_v + stage_u,
            weight_grad=2 * stage_u + stage_v,
            feedback_update=2 * stage_u if self.align else 0,
            broadcast=broadcast if self.sends else 0,
        )

    def create_feedback(self, layer) -> None:
        """dfa's fixed random B; with ``feedback_form: svd`` truncated to the receiving
        layer's rank k, B = B_U diag(b_s) B_V^T (stored as the product)."""
        if not self.sends:
            return
        super().create_feedback(layer)
        if self.feedback_form == "svd":
            B = layer.feedback_B
            U, S, Vh = torch.linalg.svd(B.double(), full_matrices=False)
            k = layer.rank
            B.copy_(((U[:, :k] * S[:k]) @ Vh[:k]).to(B.dtype))

    def feedback_tensors(self, layer):
        return (layer.feedback_B,) if self.sends else ()

    @classmethod
    def at_epoch_end(cls, layers: list, epochs_done: int, optimizers: list) -> bool:
        """The rank reduction: after each epoch in ``reduce_at_epochs``, every layer keeps
        its fewest singular triplets (largest |s|) holding ``energy`` of sum s^2, at least
        ``min_rank``; U, s, V and their optimizer state are cut (item 6)."""
        changed = False
        for layer in layers:
            rule = layer.rule
            if epochs_done not in rule.reduce_at_epochs:
                continue
            k = energy_rank(layer.svd_s, rule.energy, rule.min_rank)
            if k < layer.rank:
                top = layer.svd_s.detach().abs().topk(k).indices
                cut_rank(layer, top.sort().values, optimizers)
                changed = True
        return changed

    @property
    def changes_shape(self) -> bool:
        return bool(self.reduce_at_epochs)

    def fit_to_state(self, layer, state: dict, prefix: str) -> None:
        """A checkpoint saved after a rank cut: the layer cut to its rank (its values are
        then loaded)."""
        saved = state.get(f"{prefix}svd_s")
        if saved is not None and saved.shape[0] < layer.rank:
            cut_rank(layer, torch.arange(saved.shape[0]))

    def auxiliary_loss(self, layer) -> Tensor | None:
        """lambda_orth (||U^T U - I||^2 + ||V^T V - I||^2) (item 5) + lambda_sparsity
        ||s||_1 / ||s||_2 (item 7)."""
        terms = []
        if self.orth:
            U, V = layer.svd_U, layer.svd_V
            terms.append(self.orth * (orthogonality_error(U) + orthogonality_error(V)))
        if self.sparsity:
            terms.append(self.sparsity * hoyer(layer.svd_s))
        return sum(terms[1:], terms[0]) if terms else None

    def layer_measures(self, layer) -> dict:
        return factor_measures(layer)
