"""How well each layer's feedback stands in for W^T.

Per converted layer: the relative error ||B - W^T|| / ||W^T||, the angle between B and
W^T (as vectors), and, on a probe batch, the cosine between the gradient the rule sends into
the layer's input and the one exact backprop sends there (Akrout et al. log the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import backprop_reference
from .model import feedback_layers, set_feedback_targets
from .probe import capture_inputs


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def feedback_alignment(layer) -> dict:
    """``rel_error`` ||B - W^T||/||W^T||, ``angle_deg`` between B and W^T (as vectors) and
    ``norm_ratio`` ||B||/||W^T|| (BioTorch logs the same two)."""
    B = layer.rule.feedback_matrix(layer)
    W = layer.weight.detach()
    if B is None:
        return {"rel_error": float("nan"), "angle_deg": float("nan"), "norm_ratio": float("nan")}
    norm = W.double().norm().clamp_min(1e-300)
    rel = float((B.double() - W.double()).norm() / norm)
    cos = max(-1.0, min(1.0, _cosine(B, W)))
    return {"rel_error": rel, "angle_deg": math.degrees(math.acos(cos)),
            "norm_ratio": float(B.double().norm() / norm)}  # fmt: skip


def _input_grads(model, inputs, targets, loss_fn, names) -> dict[str, Tensor]:
    captured = capture_inputs(model, names)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            wanted = [n for n in names if n in captured and captured[n].requires_grad]
            if not wanted:  # no feedback layer (a backprop run), or none with an input grad
                return {}
            grads = torch.autograd.grad(loss, [captured[n] for n in wanted], allow_unused=True)
    finally:
        captured.remove()
    return {n: g for n, g in zip(wanted, grads, strict=True) if g is not None}


def alignment_diagnostics(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn=F.cross_entropy
) -> list[dict]:
    """One dict per feedback layer: name, rule, rank, rel_error, angle_deg and grad_cosine
    (NaN where the layer's input needs no gradient). Runs the model in eval mode and
    leaves every ``.grad`` untouched."""
    layers = feedback_layers(model)
    names = [n for n, _ in layers]
    was_training = model.training
    model.eval()
    try:
        set_feedback_targets(model, targets)
        rule_grads = _input_grads(model, inputs, targets, loss_fn, names)
        with backprop_reference():
            bp_grads = _input_grads(model, inputs, targets, loss_fn, names)
    finally:
        set_feedback_targets(model, None)
        model.train(was_training)
    rows = []
    for name, layer in layers:
        grad_cos = (
            _cosine(rule_grads[name], bp_grads[name])
            if name in rule_grads and name in bp_grads
            else float("nan")
        )
        rows.append(
            {
                "name": name,
                "rule": layer.rule.name,
                "rank": layer.rank,
                **feedback_alignment(layer),
                "grad_cosine": grad_cos,
                **layer.rule.layer_measures(layer),
            }
        )
    return rows
