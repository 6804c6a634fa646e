"""FLOPs of a training step per layer and phase, under the model's rules and under
backprop through the same layers, with each layer's analytic count beside the measured one.

The step is the training step itself (``engine/step.py``), counted by PyTorch's own counter
(``measure/flops.py``). The backprop reference is the same model with every feedback layer
switched to :class:`Transpose`, which computes W^T g inside the same autograd Function, so
the two tables split identically. Each rule gives its layers' analytic count
(``Rule.analytic_flops``), and ``fvcore_forward`` fvcore's forward count (multiply-adds),
with handles added for SDPA and the feedback Function so that it is not silently low.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from torch import nn

from ldfa_cli.data import dataset_shape
from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.engine.metering import count_step
from ldfa_cli.engine.optim import build_optimizers
from ldfa_cli.engine.step import TrainStep
from ldfa_cli.feedback import RULES, Rule, convert, feedback_layers, forward_parameters
from ldfa_cli.feedback.blocks import broadcast_points
from ldfa_cli.measure.flops import ALL_PHASES, StepFlops

OMITTED = ("data movement (copies, views, indexing, concatenation, padding), random-number "
           "generation, bias additions fused into addmm/convolution, the data pipeline and "
           "evaluation")  # fmt: skip
# counted in a way worth saying: FlopCounterMode's convention for attention, and embeddings
CONVENTIONS = ("attention's two products are counted whole, a causal mask's masked half "
               "included (as FlopCounterMode counts them; the kernels skip or mask it); an "
               "embedding's lookup and its gradient's scatter count 0")  # fmt: skip


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
    counter can split their backward into input and weight gradients; a layer that holds
    its weight otherwise (SVD form) is replaced by the dense layer it stands for; DFA's
    points on block outputs let the gradient through."""
    twin = copy.deepcopy(model)
    for _, point in [] if only_plain else broadcast_points(twin):
        point.enabled = False  # backprop passes through a block's output
    for name, layer in feedback_layers(twin):
        if not only_plain and (dense := layer.dense_twin()) is not None:
            layer = dense
            twin.set_submodule(name, layer)
        if not only_plain or layer.rule.plain_autograd:
            layer.rule = Transpose()
    return twin


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
        ours, bp = self.rule.extra_rows(), self.reference.extra_rows()
        extra = [{"row": row, "rule": ours[row], "bp": bp.get(row, 0.0)} for row in ours]
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
    model: nn.Module, x, y, optimizers: tuple[list, list] = ((), ()), make_step=TrainStep
) -> FlopsReport:  # fmt: skip
    """Per-layer FLOPs of one training step under the model's rules and under backprop;
    ``optimizers``: the rule's and backprop's optimizer plans
    (:meth:`~ldfa_cli.engine.optim.Optimizers.flop_plan`); ``make_step(model)``: the step
    (a recipe's: its precision, Mixup, label smoothing, epoch length for the resets)."""
    rule = count_step(make_step(backprop_twin(model, only_plain=True)), x, y, optimizers[0])
    reference = count_step(make_step(backprop_twin(model)), x, y, optimizers[1])
    layers_by_name = dict(feedback_layers(model))
    points = dict(broadcast_points(model))
    rows, warnings = [], []
    names = [n for n in rule.layers if n != "(other)"]
    for name in [*names, "(other)"]:
        row = {"layer": name}
        for phase in ALL_PHASES:
            row[phase] = rule.get(name, phase)
            row[f"bp_{phase}"] = reference.get(name, phase)
        expected = None
        if name in points:
            row.update(rule=points[name].rule.name, rank=None)
            expected = points[name].analytic_flops(len(x))
        if name in layers_by_name:
            layer = layers_by_name[name]
            row.update(rule=layer.rule.name, rank=layer.rank, samples=rule.samples.get(name))
            expected = layer.rule.analytic_flops(layer, rule.samples[name], rule.batches[name])
        if expected is not None:
            row["analytic"] = expected
            measured, predicted = rule.layer_total(name), sum(expected.values())
            if predicted and abs(measured - predicted) > 0.01 * predicted:
                warnings.append(f"{name}: measured {measured:.4g} FLOPs, analytic "
                                f"{predicted:.4g} ({measured / predicted - 1:+.1%})")  # fmt: skip
        rows.append(row)
    macs, note = fvcore_forward(model, x)
    return FlopsReport(rule, reference, rows, macs, note, warnings)


def recipe_report(recipe, batch_size: int, device, steps_per_epoch: int | None) -> FlopsReport:
    """:func:`flops_report` of a recipe's model on a synthetic batch of its dataset's
    shape, with the recipe's step and optimizers (``bp``, and the layers inside blocks
    whose output has a feedback point, converted to ``bp``, so that backprop's backward is
    split per layer as well)."""
    model, x, y = synthetic_network(recipe, batch_size, device)
    fb = recipe.feedback
    if RULES[fb.rule].plain_autograd:
        convert(model, fb.rule, include=fb.include, exclude=fb.exclude, example_input=x[:2])
    elif points := broadcast_points(model):
        convert(model, "bp", include=[f"{name}.*" for name, _ in points], example_input=x[:2])
    plan = build_optimizers(recipe, model, steps_per_epoch or 1).flop_plan(model)
    forward = sum(p.numel() for p in forward_parameters(model))
    classes = dataset_shape(recipe.data).classes
    return flops_report(model, x, y, (plan, [("forward", recipe.optim, forward)]),
                        partial(TrainStep.for_recipe, recipe, optimizers=None, classes=classes,
                                steps_per_epoch=steps_per_epoch))  # fmt: skip
