"""Broadcast rules: the error of one source layer sent straight to every earlier layer.

* ``dfa`` (Noekland 2016): a fixed random B_l maps the source error e to layer l:
  delta_l = (B_l e) * f'(a_l).
* ``dldfa`` (eq. 17, Sec. 5.3): a rank-r map, delta_l = (Q_l P_l e) * f'(a_l), with Q_l fixed
  and random and P_l learned by Oja's rule (eq. 15) on the source error's covariance.

Source: the model's output (``source: output``, the default), the penultimate layer
(``penultimate``: its output error reaches it by ordinary backprop through the last layer,
which trains normally) or any named module. Layers after the source are not converted.

How it runs. A hook on the source's output stores e when the backward pass reaches it. Each
converted layer's backward then returns B_l e (reshaped to its input) as its *input*
gradient: it never reads the gradient that arrives from above for that, so no W^T product
exists anywhere between hidden layers (the feedback points cut the graph), while autograd
still applies the activation's derivative f'(a_l) on the way to the layer below. The
layer's own weight gradient is the usual one, from the broadcast error at its output.

Shapes. A layer receives e through a dense map from the flattened source error to its
flattened input ("dense"), or, when both are feature maps of the same height and width,
through a 1x1 map at every pixel ("pixel": m_src -> r -> n channels), or, when both are
sequences of the same length (a language model's tokens), through one map at every position
("token": the error at a position reaches the layer's input at that position, as in Launay
et al. 2020's DFA for transformers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import accounting
from .blocks import block_plan
from .factors import store
from .local import oja_grad
from .ops import ConvOps, LinearOps
from .probe import probe
from .rule import (
    ConversionPlan,
    FeedbackConfigError,
    Rule,
    Selection,
    check,
    phase_flops,
    register,
)

_ROWS = LinearOps()  # statistics over batch rows (dense)
_PIXELS = ConvOps((1, 1), (0, 0), (1, 1))  # statistics over batch and pixels


class BroadcastChannel:
    """Carries the source error from the source's output to the layers below it."""

    def __init__(self):
        self.error: Tensor | None = None

    def capture(self, grad: Tensor) -> None:
        self.error = grad

    def attach(self, module) -> None:
        """Capture ``module``'s output gradient. The hook finds the channel through the
        module, so a deep copy of the model (which copies the channel once, shared by the
        copied rules) captures into its own channel."""
        module.broadcast_channel = self
        module.register_forward_hook(_capture_source_error)


def _capture_source_error(module, args, out) -> None:
    if isinstance(out, Tensor) and out.requires_grad:
        out.register_hook(module.broadcast_channel.capture)


@dataclass(frozen=True)
class Broadcast(Rule):
    """Shared by dfa and dldfa: the source, and per layer its input and source shapes
    (per sample), filled in by the converter."""

    broadcast: ClassVar[bool] = True
    internal: ClassVar[tuple] = ("channel", "input_shape", "source_shape")

    source: str = "output"
    channel: object = field(default=None, compare=False, repr=False)
    input_shape: tuple = field(default=(), compare=False, repr=False)
    source_shape: tuple = field(default=(), compare=False, repr=False)

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in self.internal}

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.internal]

    @property
    def pixel(self) -> bool:
        """Both maps of one spatial size: a 1x1 map at every pixel."""
        return (len(self.input_shape) == 3 and len(self.source_shape) == 3
                and self.input_shape[1:] == self.source_shape[1:])  # fmt: skip

    @property
    def token(self) -> bool:
        """Both sequences of one length: one map at every position."""
        return (len(self.input_shape) == 2 and len(self.source_shape) == 2
                and self.input_shape[0] == self.source_shape[0])  # fmt: skip

    @property
    def source_width(self) -> int:
        if self.token:
            return self.source_shape[-1]
        return self.source_shape[0] if self.pixel else math.prod(self.source_shape)

    @property
    def input_width(self) -> int:
        if self.token:
            return self.input_shape[-1]
        return self.input_shape[0] if self.pixel else math.prod(self.input_shape)

    def plan(self, selection: Selection) -> ConversionPlan:
        """The selected layers up to the source, in forward order, each with this rule for
        its shapes (:meth:`for_layer`); the source's hook attached once they are swapped."""
        seen, source = self.locate_source(selection)
        channel = BroadcastChannel()
        layers = []
        for name, module in selection.chosen:
            info = seen.get(name)
            if info is None or info["order"] > seen[source]["order"]:
                module.ldfa_note = f"kept: after the broadcast source '{source}'"
            elif (rule := self.for_layer(info, seen[source], channel)) is None:
                module.ldfa_note = "kept: its input needs no gradient"
            else:
                layers.append((name, module, rule))
        return ConversionPlan(layers, lambda m: channel.attach(m.get_submodule(source)))

    def locate_source(self, selection: Selection) -> tuple[dict, str]:
        """What a probe on the example batch saw of every module, and the source's name."""
        if selection.example_input is None:
            raise FeedbackConfigError(
                f"rule {self.name!r} needs example_input= (a batch) to size its feedback"
            )
        model, candidates = selection.model, selection.candidates
        names = list(dict.fromkeys([*candidates, *dict(model.named_modules())]))
        seen = probe(model, selection.example_input, names)
        source = self._source_name(sorted((n for n in candidates if n in seen),
                                          key=lambda n: seen[n]["order"]), seen)  # fmt: skip
        return seen, source

    def _source_name(self, order: list[str], seen: dict) -> str:
        """The source module's name: the last (output) or second-to-last (penultimate)
        Linear/Conv layer in forward order, or a module named outright."""
        if self.source in ("output", "penultimate"):
            index = -1 if self.source == "output" else -2
            if len(order) < -index:
                raise FeedbackConfigError(f"source '{self.source}': the model has too few layers")
            return order[index]
        if self.source in seen:
            return self.source
        raise FeedbackConfigError(
            f"source '{self.source}' is not a module the forward pass reaches; use output, "
            f"penultimate or a module name such as: {', '.join(order)}"
        )

    def for_layer(self, info: dict, source: dict, channel: BroadcastChannel) -> Rule | None:
        """This rule for one layer before the source, given what the probe saw of the
        layer and of the source; None keeps the layer (its input needs no gradient: it has
        nothing to send)."""
        if not info["needs_grad"]:
            return None
        return dataclasses.replace(self, channel=channel, input_shape=info["input"][1:],
                                   source_shape=source["output"][1:])  # fmt: skip

    def broadcast_rows(self, batch: int) -> int:
        """Rows of the broadcast's products: the batch (dense map), every pixel (1x1) or
        every position (token)."""
        if self.token:
            return batch * self.source_shape[0]
        return batch * (math.prod(self.source_shape[1:]) if self.pixel else 1)

    def rank_limits(self, layer) -> tuple[int, int]:
        """A fraction refers to the source width d; r is clipped to the input width only:
        the paper's output broadcast sweeps r past the 10 classes. With r > d, Oja drives
        P (r x d) to orthonormal columns (P^T P = I_d), an isometric embedding of e, and
        B = Q P keeps rank <= d."""
        return self.source_width, self.input_width

    def source_error(self, g: Tensor) -> Tensor:
        error = self.channel.error if self.channel is not None else None
        if error is None:
            raise RuntimeError(
                f"broadcast rule {self.name!r}: no source error was captured; the source "
                "must come after this layer in the forward pass"
            )
        error = error.to(g.dtype)
        return error if self.pixel or self.token else error.reshape(error.shape[0], -1)

    def spread(self, z: Tensor, M: Tensor, x_shape) -> Tensor:
        """z (samples x k) or (N, k, H, W) through M (input width x k) to the input's shape."""
        if self.pixel:
            return F.conv2d(z, M[:, :, None, None])
        return z.matmul(M.t()).view(x_shape)

    def gather(self, e: Tensor, M: Tensor) -> Tensor:
        """e through M (k x source width): the k-dimensional signal per sample or pixel."""
        return F.conv2d(e, M[:, :, None, None]) if self.pixel else e.matmul(M.t())


def _placement(layer) -> dict:
    """Where a layer's (or a block's feedback point's) feedback tensors go."""
    factory = getattr(layer, "factory", None)
    return factory or {"device": layer.weight.device, "dtype": layer.weight.dtype}


@register
@dataclass(frozen=True)
class DirectFeedbackAlignment(Broadcast):
    """DFA: delta_l = (B_l e) * f'(a_l), B_l fixed and random (input width x source width).

    ``points: layers`` (the default, Noekland's DFA) sends e to every layer's input;
    ``points: blocks`` to every residual block's output, backprop inside the block (Launay
    et al. 2020's DFA for transformers; ``blocks`` a glob naming the blocks, by default the
    children of the model's ModuleLists; see ``feedback/blocks.py``)."""

    name: ClassVar[str] = "dfa"
    summary: ClassVar[str] = "direct feedback alignment: source error through fixed random B"
    equations: ClassVar[str] = "Sec. 5.3 (Noekland 2016; points: blocks, Launay et al. 2020)"

    points: str = "layers"
    blocks: str | None = None

    def __post_init__(self):
        check(self.points in ("layers", "blocks"),
              f"rule 'dfa': points must be layers or blocks, got {self.points!r}")  # fmt: skip
        check(
            self.blocks is None or self.points == "blocks",
            "rule 'dfa': blocks names the blocks of points: blocks; set points: blocks",
        )

    def plan(self, selection: Selection) -> ConversionPlan:
        if self.points == "layers":
            return super().plan(selection)
        seen, source = self.locate_source(selection)
        return block_plan(self, selection, seen, source, BroadcastChannel())

    def create_feedback(self, layer) -> None:
        bound = 1.0 / math.sqrt(self.source_width)
        B = torch.empty(self.input_width, self.source_width, **_placement(layer))
        store(layer, "feedback_B", B.uniform_(-bound, bound), learned=False)

    def feedback_tensors(self, layer):
        return (layer.feedback_B,)

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """The forward and weight gradient as backprop's; no input gradient through the
        layer, the broadcast B e instead (rows x d x n_in)."""
        dense = 2 * samples * layer.fan_out * layer.patch_size
        broadcast = 2 * self.broadcast_rows(batch) * self.source_width * self.input_width
        return phase_flops(forward=dense, weight_grad=dense, broadcast=broadcast)

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        (B,) = feedback
        if not need_input:
            return None, (None,)
        if accounting.ACTIVE:
            accounting.set_phase("broadcast")
        return self.spread(self.source_error(g), B.to(g.dtype), x_shape), (None,)


@register
@dataclass(frozen=True)
class DirectLDFA(Broadcast):
    """dLDFA (eq. 17): delta_l = (Q_l P_l e) * f'(a_l); Q_l fixed (input width x r), P_l
    (r x source width) learned by Oja (eq. 15) from the source error: P.grad =
    -(P C/gamma)(I - P^T P) + decay P with C the centred covariance of e over the batch (and
    pixels, in pixel mode)."""

    name: ClassVar[str] = "dldfa"
    summary: ClassVar[str] = "direct LDFA: source error through Q P, Oja-learned P (eq. 17)"
    equations: ClassVar[str] = "eqs. 15, 17; Sec. 5.3"
    uses_rank: ClassVar[bool] = True

    decay: float = 0.0

    def __post_init__(self):
        check(self.decay >= 0, f"rule 'dldfa': decay must be >= 0, got {self.decay}")

    def create_feedback(self, layer) -> None:
        r, w = layer.rank, layer.weight
        p_bound = 1.0 / math.sqrt(self.source_width)
        P = torch.empty(r, self.source_width, device=w.device, dtype=w.dtype)
        Q = torch.empty(self.input_width, r, device=w.device, dtype=w.dtype)
        store(layer, "feedback_P", P.uniform_(-p_bound, p_bound), learned=True)
        store(layer, "feedback_Q", Q.uniform_(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r)), False)

    def feedback_tensors(self, layer):
        return (layer.feedback_Q, layer.feedback_P)

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        Q, P = feedback
        if accounting.ACTIVE:
            accounting.set_phase("broadcast")
        e = self.source_error(g)
        z = self.gather(e, P.to(g.dtype))  # r-dimensional teaching signal P e
        grad_input = self.spread(z, Q.to(g.dtype), x_shape) if need_input else None
        grad_p = None
        if need_feedback[1]:
            if accounting.ACTIVE:
                accounting.set_phase("feedback_update")
            grad_p = oja_grad(_PIXELS if self.pixel else _ROWS, e, z, P, self.decay)
        return grad_input, (None, grad_p)

    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """The broadcast P e then Q z (rows x r x (d + n_in)); Oja's P C as z_c^T e and
        its orthonormalising factor (rows x r x d + 2 r^2 d, twice)."""
        dense = 2 * samples * layer.fan_out * layer.patch_size
        rows, r, d = self.broadcast_rows(batch), layer.rank, self.source_width
        return phase_flops(forward=dense, weight_grad=dense,
                           broadcast=2 * rows * r * (d + self.input_width),
                           feedback_update=2 * rows * r * d + 4 * r * r * d)  # fmt: skip

    def feedback_matrix(self, layer):
        return None  # B maps the source error, not this layer's output: no W^T to compare
