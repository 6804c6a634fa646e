"""``LDFALinear`` and ``LDFAConv2d``: ``nn.Linear`` / ``nn.Conv2d`` whose backward sends the
error upstream through the rule's feedback instead of W^T.

They are subclasses, so initialisation, the ``weight``/``bias`` state_dict keys and
``isinstance`` checks keep working; the rule adds its feedback tensors (``feedback_P``,
``feedback_Q`` or ``feedback_B``) as parameters or buffers.

The forward runs one custom ``torch.autograd.Function``. Its backward computes the standard
weight and bias gradients, and asks the rule for the input gradient and the feedback
parameters' ``.grad``; W^T g is never formed (except under rule ``bp``, which is plain
autograd). Module backward hooks could not do this: autograd would already have paid for
W^T g before a hook saw it.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from . import accounting
from .ops import ConvOps, LinearOps
from .rule import FeedbackConfigError, Rule, make_rule, resolve_rank

_reference = {"bp": False}


@contextlib.contextmanager
def backprop_reference():
    """Within this block every feedback layer runs plain autograd (exact backprop): the
    reference that diagnostics compare a rule's gradients against."""
    previous = _reference["bp"]
    _reference["bp"] = True
    try:
        yield
    finally:
        _reference["bp"] = previous


def _make_feedback_function(device_type: str) -> type[torch.autograd.Function]:
    """The autograd Function for tensors on ``device_type``. Like ``custom_fwd`` /
    ``custom_bwd``, it records the forward's autocast state and restores it in backward,
    but enters an autocast context only where one is on (the decorators' context costs as
    much as the rest of a small layer's Python); the backward casts the saved tensors to
    the gradient's dtype itself (``convolution_backward`` is not an autocast op)."""

    class FeedbackFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, targets, rule, ops, name, *feedback):
            ctx.autocast = torch.is_autocast_enabled(device_type)
            if ctx.autocast:
                low = ctx.autocast_dtype = torch.get_autocast_dtype(device_type)
                x, weight = x.to(low), weight.to(low)
                bias = bias.to(low) if bias is not None else None
            ctx.rule, ctx.ops, ctx.name = rule, ops, name
            ctx.x_shape, ctx.weight_shape = x.shape, weight.shape
            ctx.has_bias = bias is not None
            ctx.save_for_backward(x, targets, *feedback)
            return ops.forward(x, weight, bias)

        @staticmethod
        def backward(ctx, g):
            if ctx.autocast:
                with torch.autocast(device_type, dtype=ctx.autocast_dtype):
                    return _feedback_backward(ctx, g)
            if torch.is_autocast_enabled(device_type):  # a backward called inside autocast
                with torch.autocast(device_type, enabled=False):
                    return _feedback_backward(ctx, g)
            return _feedback_backward(ctx, g)

    FeedbackFunction.__name__ = f"FeedbackFunction_{device_type}"
    return FeedbackFunction


def _feedback_backward(ctx, g: Tensor) -> tuple:
    """The weight and bias gradients as autograd's, the input gradient through the rule's
    feedback, and the feedback tensors' ``.grad`` where the rule learns them here."""
    x, targets, *feedback = ctx.saved_tensors
    rule, ops = ctx.rule, ctx.ops
    need_input, need_w, need_b = ctx.needs_input_grad[:3]
    need_feedback = tuple(ctx.needs_input_grad[7:])
    counting = accounting.ACTIVE
    if counting:
        previous = accounting.enter(ctx.name, "weight_grad")
    g = ops.as_rows(g)
    x = ops.as_rows(x if x.dtype == g.dtype else x.to(g.dtype))
    grad_w = grad_b = None
    if need_w or need_b or (rule.needs_weight_grad and any(need_feedback)):
        grad_w, grad_b = ops.weight_grad(x, g, ctx.weight_shape, ctx.has_bias and need_b)
    if counting:
        accounting.set_phase("input_grad")
    grad_input, grad_feedback = rule.backward(
        ops, g, x, ctx.x_shape, tuple(feedback), targets, need_input, need_feedback, grad_w
    )
    if counting:
        accounting.leave(previous)
    return grad_input, grad_w if need_w else None, grad_b, None, None, None, None, *grad_feedback


def per_device(make):
    """``make(device_type)`` for every device type, built once at import (torch.compile
    traces a lookup, not a class definition); returns the lookup (other types: cpu's)."""
    table = {d: make(d) for d in ("cpu", "cuda", "mps", "xpu")}

    def for_device(device_type: str) -> type[torch.autograd.Function]:
        return table.get(device_type, table["cpu"])

    return for_device


feedback_function = per_device(_make_feedback_function)  # the layers' autograd Function


class FeedbackLayer:
    """Mixin holding a rule, its rank and the routing into the autograd Function."""

    rule: Rule
    rank: int | None
    rank_asked: int | float | None = None
    ops: LinearOps | ConvOps
    layer_name: str
    # Run the Function even when the input needs no gradient (a first layer), so that the
    # FLOP counter files its weight gradient under the layer: set on backprop references.
    always_routed: bool = False

    @classmethod
    def replacing(cls, module: nn.Module, name: str, rule: Rule, rank) -> FeedbackLayer:
        """A feedback layer running ``rule`` in place of ``module`` (an ``nn.Linear``,
        ``nn.Conv1d`` or ``nn.Conv2d``), sharing its weight and bias Parameters."""
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            kind = LDFAConv1d if isinstance(module, nn.Conv1d) else LDFAConv2d
            new = kind(module.in_channels, module.out_channels, module.kernel_size,
                       module.stride, module.padding, module.dilation, module.groups,
                       module.bias is not None, module.padding_mode, device="meta",
                       rule="bp", name=name)  # fmt: skip
        else:
            new = LDFALinear(module.in_features, module.out_features, module.bias is not None,
                             device="meta", rule="bp", name=name)  # fmt: skip
        new.weight = module.weight
        new.bias = module.bias
        new._setup_feedback(rule, rank, name, {})
        new.train(module.training)
        return new

    def dense_twin(self) -> nn.Module | None:
        """The dense layer this one stands for, where it holds its weight otherwise (an
        SVD-form layer); None where its ``weight`` is the dense one already."""
        return None

    def _setup_feedback(self, rule: str | Rule, rank, name: str | None, options: dict) -> None:
        self.layer_name = name or type(self).__name__
        self.rule = make_rule(rule, **options)
        width, full = self.rule.rank_limits(self)
        self.rank = (
            resolve_rank(rank, name=self.layer_name, m=width, full_rank=full)
            if self.rule.uses_rank
            else None
        )
        self.rank_asked = rank if self.rank is not None else None  # before any clipping
        self.feedback_targets: Tensor | None = None
        self.rule.create_feedback(self)

    groups: int = 1  # a grouped conv's groups; its rank is per group

    @property
    def group_out(self) -> int:
        """Output channels per group (m_g; m for a Linear layer or an ungrouped conv)."""
        return self.fan_out // self.groups

    @property
    def full_rank(self) -> int:
        """Rank of a group's W^T, a map from its m_g error channels to its n_g kh kw patch."""
        return min(self.group_out, self.patch_size)

    @property
    def total_rank(self) -> int | None:
        """Channels of the feedback signal: the rank per group times the groups."""
        return None if self.rank is None else self.rank * self.groups

    @property
    def rank_clipped_from(self) -> int | None:
        """The rank asked for, where it was above the layer's full rank and so clipped."""
        asked = self.rank_asked
        if self.rank is None or asked is None or isinstance(asked, bool):
            return None
        if isinstance(asked, float):  # a fraction of the width the rule reads ranks against
            asked = round(asked * self.rule.rank_limits(self)[0])
        return asked if asked > self.rank else None

    def forward(self, x: Tensor) -> Tensor:
        return self._feedback_forward(x)

    def _feedback_forward(self, x: Tensor) -> Tensor:
        counting = accounting.ACTIVE
        if counting:
            previous = accounting.enter(self.layer_name, "forward")
        out = self._forward_routed(x)
        if counting:
            accounting.leave(previous)
        return out

    def _forward_routed(self, x: Tensor) -> Tensor:
        if (
            self.rule.plain_autograd
            or _reference["bp"]
            or not (torch.is_grad_enabled() and (x.requires_grad or self.always_routed))
        ):
            # No input gradient is needed (or asked for): autograd's own weight gradient is
            # all the work there is, so nothing is gained by the custom Function.
            return self.ops.forward(x, self.weight, self.bias)
        function = feedback_function(x.device.type)
        return function.apply(
            x,
            self.weight,
            self.bias,
            self.feedback_targets,
            self.rule,
            self.ops,
            self.layer_name,
            *self.rule.feedback_tensors(self),
        )

    def feedback_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.rule.options().items())
        rank = f", rank={self.rank}" if self.rank is not None else ""
        rank += " per group" if rank and self.groups > 1 else ""
        return f"rule={self.rule.name}{rank}" + (f", {options}" if options else "")


class LinearShape:
    """A feedback layer's sizes and repr in ``nn.Linear`` terms (mixed into every kind)."""

    fan_in = property(lambda self: self.in_features)
    fan_out = property(lambda self: self.out_features)
    patch_size = property(lambda self: self.in_features)
    kernel = property(lambda self: ())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.feedback_repr()}"


class ConvShape:
    """A feedback layer's sizes and repr in ``nn.Conv1d`` / ``nn.Conv2d`` terms (mixed into
    every kind); the patch is one group's: n_g kh kw."""

    fan_in = property(lambda self: self.in_channels)
    fan_out = property(lambda self: self.out_channels)
    patch_size = property(
        lambda self: self.in_channels // self.groups * math.prod(self.kernel_size)
    )
    kernel = property(lambda self: tuple(self.kernel_size))

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.feedback_repr()}"


class LDFALinear(LinearShape, FeedbackLayer, nn.Linear):
    """``nn.Linear`` trained by a feedback rule. ``rule`` is a name from
    ``ldfa_cli.feedback.RULES`` (or a Rule), ``rank`` an int, a fraction of the output
    width, or None for full rank; further keywords are the rule's options."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        rule: str | Rule = "ldfa",
        rank: int | float | None = None,
        name: str | None = None,
        **options,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self.ops = LinearOps()
        self._setup_feedback(rule, rank, name, options)


def conv_padding(conv: nn.Conv1d | nn.Conv2d, name: str) -> tuple[int, ...]:
    """The conv's padding as ints; string paddings resolved, asymmetric ones refused."""
    where = f"layer {name!r}"
    if conv.padding_mode != "zeros":
        raise FeedbackConfigError(
            f"{where} pads with {conv.padding_mode!r}; feedback layers support zero padding "
            "only: exclude it from the conversion"
        )
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                raise FeedbackConfigError(
                    f"{where}: padding='same' with an even kernel pads asymmetrically; "
                    "give integer padding or exclude the layer"
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def conv_ops(conv: nn.Conv1d | nn.Conv2d, name: str) -> ConvOps:
    return ConvOps(tuple(conv.stride), conv_padding(conv, name), tuple(conv.dilation),
                   conv.groups, len(conv.kernel_size))  # fmt: skip


class LDFAConv2d(ConvShape, FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` trained by a feedback rule. P acts as a 1x1 conv (m -> r channels at
    every pixel), Q as a kxk transposed conv (r -> n) with the layer's stride, padding and
    dilation, so QP has the shape of the W^T that the conv's backward would apply. A grouped
    conv gets a (P, Q) pair per group (grouped 1x1 and transposed convs), ``rank`` per group.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        rule: str | Rule = "ldfa",
        rank: int | float | None = None,
        name: str | None = None,
        **options,
    ):
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.ops = conv_ops(self, name or type(self).__name__)
        self._setup_feedback(rule, rank, name, options)


class LDFAConv1d(ConvShape, FeedbackLayer, nn.Conv1d):
    """``nn.Conv1d`` trained by a feedback rule (audio, text, token mixing): as
    :class:`LDFAConv2d` with one spatial dimension."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        rule: str | Rule = "ldfa",
        rank: int | float | None = None,
        name: str | None = None,
        **options,
    ):
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device,
                           dtype=dtype)  # fmt: skip
        self.ops = conv_ops(self, name or type(self).__name__)
        self._setup_feedback(rule, rank, name, options)
