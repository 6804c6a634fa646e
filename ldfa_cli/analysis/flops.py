"""FLOPs of a training step, per layer and phase, measured with PyTorch's own counter.

``PhaseFlopCounter`` is ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add, forward and backward, custom autograd Functions and SDPA included) that also
files every count under the layer and phase the feedback layers mark (``forward``,
``input_grad``, ``weight_grad``, ``feedback_update``; see ``feedback/accounting.py``).
Operations outside feedback layers (attention, unconverted layers) go to ``(other)``.

The backprop reference is the same model with every feedback layer switched to
:class:`Transpose`, which computes W^T g inside the same autograd Function, so the two
tables split identically. ``analytic_flops`` gives the same numbers from layer shapes, and
``fvcore_forward`` fvcore's forward count (multiply-adds), with handles added for SDPA and
the feedback Function so that it is not silently low.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ldfa_cli.feedback import (
    accounting,
    backward_with_rules,
    feedback_layers,
    forward_parameters,
    set_feedback_targets,
)
from ldfa_cli.feedback.base import Rule, dense_cheaper
from ldfa_cli.feedback.convert import learned_feedback
from ldfa_cli.feedback.layers import FeedbackLayer
from ldfa_cli.feedback.normative import load_svd, normative_layers
from ldfa_cli.feedback.svd import SVDLayer

from . import costs

PHASES = ("forward", "input_grad", "broadcast", "weight_grad", "feedback_update")
OMITTED = ("data movement (copies, views, indexing, concatenation, padding), random-number "
           "generation, bias additions fused into addmm/convolution, the data pipeline and "
           "evaluation")  # fmt: skip
# Outside feedback layers the backward is not split: it is filed as "backward".
ALL_PHASES = (*PHASES, "backward")


def _attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """scores = q k^T, then scores v: b h s_q s_k (d_q + d_v) multiply-adds."""
    *batch, s_q, d_q = query
    return 2 * math.prod(batch) * s_q * key[-2] * (d_q + value[-1])


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The scores recomputed (d_q), grad of the scores and of v (2 d_v), of q and k (2 d_q)."""
    *batch, s_q, d_q = query
    return 2 * math.prod(batch) * s_q * key[-2] * (3 * d_q + 2 * value[-1])


def attention_formulas() -> dict:
    """FLOP formulas (shapes in, FLOPs out) for attention kernels PyTorch's counter lacks.

    ``F.scaled_dot_product_attention`` runs a different aten kernel per device and version;
    on CPU in torch 2.14 it is ``_scaled_dot_product_flash_attention_for_cpu``, which
    FlopCounterMode's table leaves out, so attention counted 0. Kernels the table already
    has keep PyTorch's own formula (the same products as these)."""
    aten = torch.ops.aten
    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            formulas[op] = formula
    return formulas


ELEMENTWISE_ROW = "(elementwise)"
RESET_PHASE = "svd_reset"


class PhaseFlopCounter(accounting.Marking, FlopCounterMode):
    """FlopCounterMode (with :func:`attention_formulas` and the QR/SVD formulas) that also
    keeps ``counts[(layer, phase)]``, charges elementwise ops by ``costs.ELEMENTWISE`` under
    ``("(elementwise)", "forward" | "backward")`` (inside an SVD reset: under the reset), and
    remembers the names of the ops it charged nothing (``uncounted``)."""

    def __init__(self):
        formulas = {**attention_formulas(), **costs.decomposition_formulas()}
        super().__init__(display=False, custom_mapping=formulas)
        self.counts: dict[tuple[str, str], float] = defaultdict(float)
        self.uncounted: set[str] = set()

    def _count_flops(self, func_packet, out, args, kwargs):
        where = accounting.where()
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            layer, phase = where
            if isinstance(layer, tuple):  # layers of one shape, batched: equal shares
                share, rest = divmod(flops, len(layer))
                for index, name in enumerate(layer):
                    self.counts[(name, phase)] += share + (rest if index == 0 else 0)
            else:
                self.counts[where] += flops
            for parent in set(self.mod_tracker.parents):
                self.flop_counts[parent][func_packet] += flops
            return out
        name = func_packet.__name__
        flops = costs.elementwise_flops(name, args, out)
        if flops is None:
            self.uncounted.add(name)
        elif where[1] == RESET_PHASE:
            self.counts[where] += flops
        else:
            self.counts[(ELEMENTWISE_ROW, "forward" if where[1] == "forward" else "backward")] += (
                flops
            )
        return out


@dataclass(frozen=True)
class Transpose(Rule):
    """Backprop measured inside the feedback Function: the input gradient is W^T g."""

    name: ClassVar[str] = "bp"

    def feedback_tensors(self, layer):
        return (layer.weight.detach(),)

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        (weight,) = feedback
        return (ops.through(g, weight.to(g.dtype), x_shape) if need_input else None), (None,)


def backprop_twin(model: nn.Module, only_plain: bool = False) -> nn.Module:
    """A copy of ``model`` whose feedback layers (with ``only_plain``, those of rule ``bp``,
    which run plain autograd) compute backprop inside the feedback Function, where the
    counter can split their backward into input and weight gradients."""
    twin = copy.deepcopy(model)
    for name, layer in feedback_layers(twin):
        if isinstance(layer, SVDLayer) and not only_plain:  # backprop of the dense layer
            layer = layer.dense_twin()
            twin.set_submodule(name, layer)
        if not only_plain or layer.rule.plain_autograd:
            layer.rule = Transpose()
    return twin


@dataclass
class StepFlops:
    """FLOPs of one training step by (layer, phase), and each feedback layer's samples; the
    feedback update amortised over its interval, an SVD reset over its; the optimizer steps
    (``optimizer``: label -> FLOPs) from their algorithms."""

    counts: dict[tuple[str, str], float]
    samples: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, int] = field(default_factory=dict)  # normative update interval
    resets: dict[str, int] = field(default_factory=dict)  # steps between SVD resets
    optimizer: dict[str, float] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)

    def get(self, layer: str, phase: str) -> float:
        value = self.counts.get((layer, phase), 0)
        if phase == "feedback_update":
            value /= self.intervals.get(layer, 1)  # amortised over the update interval
        elif phase == RESET_PHASE:
            value /= self.resets.get(layer, 1)
        return value

    def layer_total(self, layer: str) -> float:
        return sum(self.get(layer, p) for p in ALL_PHASES)

    @property
    def layers(self) -> list[str]:
        """Feedback layers and ``(other)``: the rows of products."""
        names = (layer for layer, phase in self.counts if phase != RESET_PHASE)
        return [n for n in dict.fromkeys(names) if n != ELEMENTWISE_ROW]

    @property
    def products(self) -> float:
        """Matmuls, convolutions and attention: what FlopCounterMode itself counts."""
        return sum(self.layer_total(layer) for layer in self.layers)

    @property
    def elementwise(self) -> dict[str, float]:
        return {p: self.get(ELEMENTWISE_ROW, p) for p in ("forward", "backward")}

    @property
    def svd_reset(self) -> float:
        return sum(self.get(layer, p) for layer, p in self.counts if p == RESET_PHASE)

    def extra_rows(self) -> dict[str, float]:
        """The step's costs beside the per-layer products, each its own row."""
        rows = {"(elementwise fwd)": self.elementwise["forward"],
                "(elementwise bwd)": self.elementwise["backward"],
                "(svd reset)": self.svd_reset}  # fmt: skip
        rows.update({f"(optimizer: {label})": v for label, v in self.optimizer.items()})
        return rows

    @property
    def total(self) -> float:
        return self.products + sum(self.extra_rows().values())


def _samples_hooks(model: nn.Module, samples: dict, batches: dict):
    def hook(module, args, out):
        channels = out.shape[1] if isinstance(module, nn.Conv1d | nn.Conv2d) else out.shape[-1]
        samples[module.layer_name] = out.numel() // channels
        batches[module.layer_name] = out.shape[0]

    return [layer.register_forward_hook(hook) for _, layer in feedback_layers(model)]


def _reset_every_due_layer(model: nn.Module, steps_per_epoch: int | None) -> dict[str, int]:
    """Run the SVD reset once in every layer that has one (the counter then sees its cost);
    return each such layer's interval, to amortise it over."""
    intervals = {}
    for layer in normative_layers(model):
        every = layer.rule.reset_interval(steps_per_epoch)
        if every:
            previous = accounting.enter(layer.layer_name, RESET_PHASE)
            load_svd(layer)
            accounting.leave(previous)
            intervals[layer.layer_name] = every
    return intervals


def count_training_step(
    model: nn.Module,
    x,
    y,
    label_smoothing: float = 0.0,
    optimizers: list[tuple[str, object, int]] = (),
    steps_per_epoch: int | None = None,
) -> StepFlops:
    """Count one training step (forward, loss, backward, every feedback update, the SVD
    resets amortised) on ``model`` without changing it: it runs on a copy, with the RNG state
    restored afterwards. ``optimizers``: (label, optimizer config, parameter elements) for
    each optimizer step to add (see :func:`ldfa_cli.analysis.costs.optimizer_flops`)."""
    work = copy.deepcopy(model)
    work.train(model.training)
    samples: dict[str, int] = {}
    batches: dict[str, int] = {}
    hooks = _samples_hooks(work, samples, batches)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), PhaseFlopCounter() as counter:
        set_feedback_targets(work, y)
        loss = F.cross_entropy(work(x).float(), y, label_smoothing=label_smoothing)
        backward_with_rules(work, loss)  # every normative update; amortised in .get
        resets = _reset_every_due_layer(work, steps_per_epoch)
    for h in hooks:
        h.remove()
    intervals = {name: getattr(layer.rule, "interval", 1) for name, layer in feedback_layers(work)}
    steps = {label: costs.optimizer_flops(config, n) for label, config, n in optimizers}
    return StepFlops(dict(counter.counts), samples, batches, intervals, resets, steps,
                     sorted(counter.uncounted))  # fmt: skip


def optimizer_plan(recipe, model: nn.Module) -> tuple[list, list]:
    """(rule's, backprop's) optimizer steps of a recipe's model for
    :func:`count_training_step`: the forward optimizer over the forward parameters (and the
    feedback tensors with ``feedback.optimizer: forward``), the feedback one over the rest;
    backprop has the forward one over the forward parameters only."""
    forward = sum(p.numel() for p in forward_parameters(model))
    feedback = feedback_elements_per_step(model)
    if recipe.feedback.optimizer == "forward":
        rule = [("forward", recipe.optim, forward + feedback)]
    else:
        rule = [("forward", recipe.optim, forward)]
        if feedback:
            rule.append(("feedback", recipe.feedback.optimizer, feedback))
    return rule, [("forward", recipe.optim, forward)]


def feedback_elements_per_step(model: nn.Module) -> float:
    """The learned feedback tensors' elements an optimizer steps in an average step. The
    factors of an ``ldfa`` layer whose eq. 9 runs every k steps have a gradient one step in
    k (``zero_grad`` sets it to None in between, and PyTorch's optimizers skip a parameter
    without one), so they count 1/k of their elements."""
    return sum(
        p.numel() / getattr(layer.rule, "interval", 1)
        for _, layer in feedback_layers(model)
        for p in learned_feedback(layer)
    )


# ------------------------------------------------------------------------- analytic
def analytic_flops(layer: FeedbackLayer, samples: int, batch: int = 0) -> dict:
    """The step's FLOPs of one feedback layer from its shapes (2 per multiply-add)."""
    T, m, N = samples, layer.fan_out, layer.patch_size
    rule, r = layer.rule, layer.rank
    dense = 2 * T * m * N
    counts = {phase: 0 for phase in PHASES}
    counts["forward"] = counts["weight_grad"] = dense
    name = rule.name
    if getattr(rule, "broadcast", False):
        # rows: the batch (dense map) or every pixel (1x1 map); widths of e and the input
        rows = batch * (math.prod(rule.source_shape[1:]) if rule.pixel else 1)
        d, n_in = rule.source_width, rule.input_width
        if name == "svd_dfa":
            return _svd_flops(layer, T, counts, 2 * rows * d * n_in)
        if name == "dfa":
            counts["broadcast"] = 2 * rows * d * n_in
        else:
            counts["broadcast"] = 2 * rows * r * (d + n_in)
            counts["feedback_update"] = 2 * rows * r * d + 4 * r * r * d
        return counts
    if name in ("bp", "fa", "kp", "usf", "brsf", "frsf"):
        counts["input_grad"] = dense
        return counts
    # the low-rank rules: per group (r = rank per group, m = m_g), times the groups
    g, m = layer.groups, layer.group_out
    if name in ("lowrank_fa", "ldfa"):
        if dense_cheaper(T, r, m, N):
            counts["input_grad"] = g * 2 * m * N * r + dense
        else:
            counts["input_grad"] = g * 2 * T * r * (m + N)
        if name == "ldfa":
            per_update = g * (4 * m * N * r + 4 * r * r * N + 4 * r * r * m)  # eq. 9, no dot
            counts["feedback_update"] = per_update / rule.interval
    elif name == "ldfa_local":
        counts["input_grad"] = g * 2 * T * r * (m + N)
        update = g * (2 * T * r * m + 4 * r * r * m)
        if rule.use_targets:
            update += g * 2 * T * m * r
        if rule.learn_q:
            update += g * 2 * T * N * r
        counts["feedback_update"] = update
    return counts


def _svd_flops(layer, T: int, counts: dict, broadcast: int) -> dict:
    """svd_dfa (feedback/svd.py): forward x V then (a s) U^T; backward g U, the projection
    (g U) U^T and (g U)(U^T U), the gradients of U and V; alignment g^T (g U),
    (g U)^T (g U) and two m x k x k products; the broadcast as dfa's."""
    rule, k, m, N = layer.rule, layer.rank, layer.fan_out, layer.patch_size
    counts["forward"] = 2 * T * k * (N + m)
    gram = 2 * m * k * k if (rule.project or rule.align) else 0  # U^T U
    projection = 2 * T * m * k + 2 * T * k * k if rule.project else 0
    counts["weight_grad"] = 2 * T * m * k + gram + projection + 2 * T * m * k + 2 * T * N * k
    if rule.align:
        counts["feedback_update"] = 2 * T * m * k + 2 * T * k * k + 4 * m * k * k
    counts["broadcast"] = broadcast if rule.sends else 0
    return counts


# ---------------------------------------------------------------------------- fvcore
FVCORE_HANDLES = ("feedback", "attention")


def fvcore_forward(
    model: nn.Module, x, handles: tuple[str, ...] = FVCORE_HANDLES
) -> tuple[float | None, str]:
    """fvcore's forward count in multiply-adds, with ``handles`` for the feedback Function
    and SDPA (either of which it would otherwise count as 0); (None, reason) if it cannot
    trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's import uses deprecated torch.jit calls
            from fvcore.nn import FlopCountAnalysis
    except ImportError as error:  # pragma: no cover - fvcore is a dependency
        return None, f"fvcore unavailable: {error}"

    def shape(value):
        return value.type().sizes()

    def feedback_handle(inputs, outputs):
        out = shape(outputs[0])
        weight = shape(inputs[1])
        return math.prod(out) * math.prod(weight[1:])

    def sdpa_handle(inputs, outputs):
        q, k, v = (shape(t) for t in inputs[:3])
        batch = math.prod(q[:-2])
        return batch * q[-2] * k[-2] * (q[-1] + v[-1])

    analysis = FlopCountAnalysis(model, (x,))
    if "feedback" in handles:
        for device in ("cpu", "cuda", "mps", "xpu"):
            analysis.set_op_handle(f"prim::PythonOp.FeedbackFunction_{device}", feedback_handle)
    if "attention" in handles:
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's tracer uses deprecated torch.jit calls
            return float(analysis.total()), "multiply-adds (fvcore, forward only)"
    except Exception as error:
        return None, f"fvcore could not trace the model ({type(error).__name__})"


# ----------------------------------------------------------------------- the report
@dataclass
class FlopsReport:
    rule: StepFlops
    reference: StepFlops  # backprop through the same layers
    layers: list[dict]
    fvcore_macs: float | None
    fvcore_note: str
    warnings: list[str]

    def to_dict(self) -> dict:
        rule, bp = self.rule.extra_rows(), self.reference.extra_rows()
        extra = [{"row": name, "rule": rule[name], "bp": bp.get(name, 0.0)} for name in rule]
        return {
            "layers": self.layers,
            "extra": extra,
            "products": {"rule": self.rule.products, "bp": self.reference.products},
            "total": {"rule": self.rule.total, "bp": self.reference.total,
                      "ratio": self.rule.total / self.reference.total},
            "forward_measured_flops": sum(self.rule.get(n, "forward") for n in self.rule.layers),
            "uncounted_ops": self.rule.uncounted,
            "omitted": OMITTED,
            "fvcore_forward_macs": self.fvcore_macs,
            "fvcore_note": self.fvcore_note,
            "warnings": self.warnings,
        }  # fmt: skip


def flops_report(
    model: nn.Module, x, y, optimizers: tuple[list, list] = ((), ()),
    steps_per_epoch: int | None = None,
) -> FlopsReport:  # fmt: skip
    """Per-layer FLOPs of one training step under the model's rules and under backprop;
    ``optimizers``: the rule's and backprop's optimizer steps (:func:`optimizer_plan`)."""
    rule = count_training_step(
        backprop_twin(model, only_plain=True),
        x,
        y,
        optimizers=optimizers[0],
        steps_per_epoch=steps_per_epoch,
    )
    reference = count_training_step(backprop_twin(model), x, y, optimizers=optimizers[1])
    layers_by_name = dict(feedback_layers(model))
    rows, warnings = [], []
    names = [n for n in rule.layers if n != "(other)"]
    for name in [*names, "(other)"]:
        row = {"layer": name}
        for phase in ALL_PHASES:
            row[phase] = rule.get(name, phase)
            row[f"bp_{phase}"] = reference.get(name, phase)
        if name in layers_by_name:
            layer = layers_by_name[name]
            row.update(rule=layer.rule.name, rank=layer.rank, samples=rule.samples.get(name))
            expected = analytic_flops(layer, rule.samples[name], rule.batches[name])
            row["analytic"] = expected
            measured, predicted = rule.layer_total(name), sum(expected.values())
            if predicted and abs(measured - predicted) > 0.01 * predicted:
                warnings.append(f"{name}: measured {measured:.4g} FLOPs, analytic "
                                f"{predicted:.4g} ({measured / predicted - 1:+.1%})")  # fmt: skip
        rows.append(row)
    macs, note = fvcore_forward(model, x)
    return FlopsReport(rule, reference, rows, macs, note, warnings)
