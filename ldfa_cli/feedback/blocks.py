"""DFA at the blocks (Launay et al. 2020): the output error broadcast to each residual
block's output instead of to every layer's input.

``dfa`` with ``points: blocks`` puts a feedback point on the output of every block (the
children of the model's ``nn.ModuleList``s whose output has their input's shape: a GPT's
``blocks.i``, a Hugging Face model's ``layers.i`` or ``h.i``, a ViT's ``blocks.i``; or the
modules a ``blocks`` glob names). A point is the identity in the forward pass; in the
backward it drops the gradient arriving from above and returns B_l e instead, e the output
error at the same position. Inside the block, backprop carries that signal to the block's
weights and on to the block's input, where the point of the block below drops it again: no
W^T reaches from one block to the next, while every layer inside a block trains on the
gradient of its own block's broadcast. The source (``source: output``, the last layer, or
a module named outright) and whatever follows it train by backprop from the loss. This is
Launay et al.'s "simple" DFA for transformers (one feedback point per block), whose e is the
gradient at the top of the encoder, before the vocabulary projection: ``source: ln_f``.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from . import accounting
from .probe import probe
from .rule import ConversionPlan, FeedbackConfigError, phase_flops

BLOCK_NOTE = ("the block's output gradient is B e (the source's error at each position, "
              "through a fixed random B); backprop inside the block")  # fmt: skip


class _PointFunction(torch.autograd.Function):
    """Identity forward; backward: the rule's broadcast (B e), the incoming gradient unused."""

    @staticmethod
    def forward(ctx, out, rule, name, feedback_B):
        ctx.rule, ctx.name, ctx.shape = rule, name, out.shape
        ctx.save_for_backward(feedback_B)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        (B,) = ctx.saved_tensors
        counting = accounting.ACTIVE
        if counting:
            previous = accounting.enter(ctx.name, "broadcast")
        grad, _ = ctx.rule.backward(None, g, None, ctx.shape, (B,), None, True, (False,), None)
        if counting:
            accounting.leave(previous)
        return grad, None, None, None


class BroadcastPoint(nn.Module):
    """The feedback point on one block's output (registered as the block's
    ``broadcast_point``); holds the fixed B (block width x source width) as a buffer."""

    def __init__(self, name: str, rule, device, dtype):
        super().__init__()
        self.point_name, self.rule, self.enabled = name, rule, True
        self.factory = {"device": device, "dtype": dtype}
        rule.create_feedback(self)

    @property
    def width(self) -> int:
        return self.rule.input_width

    def analytic_flops(self, batch: int) -> dict[str, float]:
        """One step's FLOPs by phase: the broadcast B e at every row (position) of
        ``batch`` examples; the block's own layers count as backprop's."""
        rule = self.rule
        broadcast = 2 * rule.broadcast_rows(batch) * rule.source_width * rule.input_width
        return phase_flops(broadcast=broadcast)

    def forward(self, out: Tensor) -> Tensor:
        if not (self.enabled and torch.is_grad_enabled() and out.requires_grad):
            return out
        return _PointFunction.apply(out, self.rule, self.point_name, self.feedback_B)


def broadcast_points(model: nn.Module) -> list[tuple[str, BroadcastPoint]]:
    """(block name, point) for every feedback point of ``model``."""
    return [(p.point_name, p) for p in model.modules() if isinstance(p, BroadcastPoint)]


def _through_point(block: nn.Module, args, out):
    """The block's forward hook: its output (or a tuple's first element) through its point."""
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return (block.broadcast_point(out[0]), *out[1:])
    return block.broadcast_point(out)


def _block_candidates(model: nn.Module, pattern: str | None) -> list[str]:
    if pattern is not None:
        return [n for n, _ in model.named_modules() if n and fnmatch(n, pattern)]
    return [f"{n}.{i}" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
            for i in range(len(m))]  # fmt: skip


def find_blocks(model: nn.Module, example_input, pattern: str | None) -> dict[str, dict]:
    """The blocks a forward pass on ``example_input`` reaches whose output has their input's
    shape, with what :func:`~ldfa_cli.feedback.probe.probe` saw of them; without a
    ``pattern``, the outermost such children of ``nn.ModuleList``s."""
    seen = probe(model, example_input, _block_candidates(model, pattern))
    blocks = {n: i for n, i in seen.items() if i["input"] == i["output"]}
    if pattern is None:  # a block inside another block is part of it
        blocks = {n: i for n, i in blocks.items()
                  if not any(n.startswith(f"{o}.") for o in blocks)}  # fmt: skip
    return dict(sorted(blocks.items(), key=lambda item: item[1]["order"]))


def block_plan(rule, selection, seen: dict, source: str, channel) -> ConversionPlan:
    """The plan of ``dfa`` with ``points: blocks``: no layer swapped (each keeps backprop,
    with the reason), a point on every block that finishes before the source does (``seen``:
    the probe of every module, so the orders compare; a block holding the source finishes
    after it), the source hook."""
    model, source_shape = selection.model, seen[source]["output"][1:]
    blocks = find_blocks(model, selection.example_input, rule.blocks)
    blocks = {n: i for n, i in blocks.items() if seen[n]["order"] < seen[source]["order"]}
    if not blocks:
        hint = f"blocks '{rule.blocks}' matched" if rule.blocks else "no nn.ModuleList child"
        raise FeedbackConfigError(
            f"rule 'dfa' with points: blocks: {hint} no module whose output has its input's "
            "shape before the source; name them with blocks: 'GLOB' (e.g. 'blocks.*') or "
            "use points: layers"
        )
    for name, module in selection.chosen:
        block = next((b for b in blocks if name.startswith(f"{b}.")), None)
        module.ldfa_note = (f"kept: backprop inside block '{block}' from its feedback point"
                            if block else "kept: outside the blocks (points: blocks)")  # fmt: skip
        if name == source:
            module.ldfa_note = (
                "kept: the broadcast source (backprop from the loss; e is its output gradient)"
            )
        elif seen.get(name, {"order": -1})["order"] > seen[source]["order"]:
            module.ldfa_note = f"kept: after the broadcast source '{source}' (backprop)"
    like = next(model.parameters())

    def finish(model: nn.Module) -> None:
        channel.attach(model.get_submodule(source))
        for name, info in blocks.items():
            point_rule = dataclasses.replace(rule, channel=channel, input_shape=info["output"][1:],
                                             source_shape=source_shape)  # fmt: skip
            block = model.get_submodule(name)
            block.broadcast_point = BroadcastPoint(name, point_rule, like.device, like.dtype)
            block.register_forward_hook(_through_point)

    return ConversionPlan([], finish, points=list(blocks))
