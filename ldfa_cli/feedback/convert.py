"""Swap a model's ``nn.Linear`` / ``nn.Conv2d`` layers for feedback layers, and report it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from .base import FeedbackConfigError, Rule, make_rule, resolve_rank
from .layers import FeedbackLayer, LDFAConv1d, LDFAConv2d, LDFALinear

# nn.MultiheadAttention calls its out_proj's weight functionally: swapping it changes nothing.
_FUNCTIONAL_LINEARS = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch(name, p) for p in patterns)


CONVERTIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _candidates(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            continue
        if isinstance(module, CONVERTIBLE):
            yield name, module


def _kept_because(module: nn.Module, rule: Rule, rank, force_grouped: bool) -> str | None:
    """Why a selected layer stays on plain autograd, or None to convert it."""
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
        return f"kept: pads with {module.padding_mode!r} (feedback layers support zero padding)"
    if getattr(rule, "svd_form", False) and (
        isinstance(module, nn.Conv1d) or getattr(module, "groups", 1) > 1
    ):
        return "kept: svd_dfa trains Linear and ungrouped Conv2d layers only"
    groups = getattr(module, "groups", 1)
    if groups == 1 or not rule.uses_rank or force_grouped or getattr(rule, "broadcast", False):
        return None
    m_g = module.out_channels // groups
    n_patch = module.in_channels // groups * math.prod(module.kernel_size)
    r_g = resolve_rank(rank, name="", m=m_g, full_rank=min(m_g, n_patch))
    if r_g * (m_g + n_patch) < m_g * n_patch:  # the thin pathway saves something
        return None
    what = "depthwise" if groups == module.in_channels else f"grouped (groups={groups})"
    return (f"kept: {what}, its transpose is already cheaper than rank {r_g} per group "
            "(force_grouped converts it)")  # fmt: skip


def _inputs_without_grad(model: nn.Module, example_input, names) -> set[str]:
    """Names of layers whose input needs no gradient in a forward pass on ``example_input``."""
    return {n for n, info in _probe(model, example_input, names).items() if not info["needs_grad"]}


class capture_inputs(dict):
    """name -> the first input tensor the named module received, while the hooks stay."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args):
            if name not in self and args:
                self[name] = args[0]

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _rank_for(name: str, module: nn.Module, rank, ranks: dict | None, scale: dict | None):
    """The rank spec for a layer: ``ranks``' first matching pattern, else ``rank``; then
    times ``scale``'s first matching multiplier (a fraction is resolved against the output
    width first, so ``{"*.qkv": 3}`` makes qkv's rank 3r whatever r is)."""
    spec = next((v for p, v in (ranks or {}).items() if fnmatch(name, p)), rank)
    factor = next((v for p, v in (scale or {}).items() if fnmatch(name, p)), None)
    if factor is None or spec is None or isinstance(spec, bool):
        return spec
    if isinstance(spec, float):
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        width = module.out_channels // module.groups if conv else module.out_features
        spec = max(1, round(spec * width))
    return max(1, round(spec * factor))


def _swap(module: nn.Module, name: str, rule: Rule, rank) -> FeedbackLayer:
    """A feedback layer sharing ``module``'s weight and bias Parameters (or, for a rule
    that trains layers in SVD form, sharing its bias and factorising its weight)."""
    if getattr(rule, "svd_form", False):
        from .svd import svd_layer

        return svd_layer(module, name, rule, rank)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        kind = LDFAConv1d if isinstance(module, nn.Conv1d) else LDFAConv2d
        new = kind(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device="meta",
            rule="bp",
            name=name,
        )
    else:
        new = LDFALinear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device="meta",
            rule="bp",
            name=name,
        )
    new.weight = module.weight
    new.bias = module.bias
    new._setup_feedback(rule, rank, name, {})
    new.train(module.training)
    return new


def convert(
    model: nn.Module,
    rule: str | Rule,
    rank: int | float | None = None,
    include=None,
    exclude=None,
    ranks: dict | None = None,
    example_input: Tensor | tuple | None = None,
    rank_scale: dict | None = None,
    force_grouped: bool = False,
    **options,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` whose qualified name matches a glob in
    ``include`` (default all) and none in ``exclude`` for a feedback layer running ``rule``
    (its options as keywords), and return the model (changed in place).

    ``rank``: int, fraction of the layer's output width, or None (full rank); ``ranks``
    overrides it by pattern, first match wins, e.g. ``{"*.qkv": 72}``; ``rank_scale``
    multiplies it by pattern, e.g. ``{"*.qkv": 3}`` (the authors' 3r for qkv). A grouped
    conv gets a rank per group; where even rank 1 per group saves nothing (a depthwise conv:
    its W^T g costs T k^2 m) it stays on plain autograd unless ``force_grouped``. With
    ``example_input``, layers whose input needs no gradient (the first layer on the raw
    input, a ViT's patch_embed) stay plain ``nn`` layers; without it they are converted but
    still run plain autograd at run time, as their input needs no gradient. With
    ``use_targets=True`` only the last converted layer (the output layer) uses targets.
    :func:`conversion_report` tells what was swapped.
    """
    base_rule = make_rule(rule, **options)
    include = ["*"] if include is None else list(include)
    exclude = list(exclude or [])
    chosen = []
    for name, module in _candidates(model):
        spec = _rank_for(name, module, rank, ranks, rank_scale)
        if isinstance(module, _FUNCTIONAL_LINEARS):
            module.ldfa_note = "kept: used functionally by nn.MultiheadAttention"
        elif not _matches(name, include) or _matches(name, exclude):
            module.ldfa_note = "kept: not selected by include/exclude"
        elif (why := _kept_because(module, base_rule, spec, force_grouped)) is not None:
            module.ldfa_note = why
        else:
            chosen.append((name, module))
    broadcast = getattr(base_rule, "broadcast", False)
    if broadcast:
        if example_input is None:
            raise FeedbackConfigError(
                f"rule {base_rule.name!r} needs example_input= (a batch) to size its feedback"
            )
        chosen, rules, source = _broadcast_plan(model, base_rule, chosen, example_input)
    elif example_input is not None and chosen:
        no_grad = _inputs_without_grad(model, example_input, [n for n, _ in chosen])
        for name, module in chosen:
            if name in no_grad:
                module.ldfa_note = "kept: its input needs no gradient"
        chosen = [(n, m) for n, m in chosen if n not in no_grad]
    if not chosen:
        raise FeedbackConfigError(
            f"no Linear or Conv layer matched include={include} exclude={exclude} (or each "
            "was kept: conversion_report tells why)"
        )
    uses_targets = getattr(base_rule, "use_targets", False)
    for i, (name, module) in enumerate(chosen):
        layer_rule = rules[name] if broadcast else base_rule
        if uses_targets and i != len(chosen) - 1:
            layer_rule = make_rule(base_rule, use_targets=False)
        spec = _rank_for(name, module, rank, ranks, rank_scale)
        model.set_submodule(name, _swap(module, name, layer_rule, spec))
    if broadcast:  # after the swap: the source may itself have been swapped
        next(iter(rules.values())).channel.attach(model.get_submodule(source))
    return model


def _probe(model: nn.Module, example_input, names) -> dict[str, dict]:
    """For each named module reached by a forward pass on ``example_input``: its call
    order, whether its input needs a gradient, and its input and output shapes."""
    found: dict[str, dict] = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, args, out):
            if name not in found and args and isinstance(out, torch.Tensor):
                found[name] = {
                    "order": len(found),
                    "needs_grad": args[0].requires_grad,
                    "input": tuple(args[0].shape),
                    "output": tuple(out.shape),
                }

        return hook

    hooks = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    try:  # eval mode: the probe must not move BatchNorm statistics
        model.eval()
        with torch.enable_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def _broadcast_plan(model, rule, chosen, example_input):
    """Which layers a broadcast rule converts (those up to its source, in forward order,
    whose input needs a gradient), each layer's rule with its shapes, and the source hook."""
    from .broadcast import BroadcastChannel

    modules = dict(model.named_modules())
    candidates = [n for n, _ in _candidates(model)]
    seen = _probe(model, example_input, list(dict.fromkeys([*candidates, *modules])))
    order = sorted((n for n in candidates if n in seen), key=lambda n: seen[n]["order"])
    if rule.source in ("output", "penultimate"):
        index = -1 if rule.source == "output" else -2
        if len(order) < -index:
            raise FeedbackConfigError(f"source '{rule.source}': the model has too few layers")
        source = order[index]
    elif rule.source in seen:
        source = rule.source
    else:
        known = ", ".join(order)
        raise FeedbackConfigError(
            f"source '{rule.source}' is not a module the forward pass reaches; use output, "
            f"penultimate or a module name such as: {known}"
        )
    limit = seen[source]["order"]
    svd_form = getattr(rule, "svd_form", False)
    plan, rules = [], {}
    for name, module in chosen:
        info = seen.get(name)
        if info is None or info["order"] > limit:
            module.ldfa_note = f"kept: after the broadcast source '{source}'"
        elif not info["needs_grad"] and not svd_form:
            module.ldfa_note = "kept: its input needs no gradient"
        else:
            plan.append((name, module))
    channel = BroadcastChannel()
    for name, _ in plan:
        rules[name] = dataclasses.replace(rule, channel=channel,
                                          input_shape=seen[name]["input"][1:],
                                          source_shape=seen[source]["output"][1:])  # fmt: skip
        if svd_form and not seen[name]["needs_grad"]:  # trained in SVD form, sends nothing
            rules[name] = dataclasses.replace(rules[name], sends=False)
    return plan, rules, source


@dataclass(frozen=True)
class ConversionRow:
    name: str
    kind: str  # Linear | Conv1d | Conv2d
    n: int  # input features / channels
    m: int  # output features / channels
    rank: int | None  # feedback rank (per group); None for a full-rank or transpose feedback
    full_rank: int
    rule: str
    note: str
    groups: int = 1


class ConversionReport:
    """What a conversion swapped: one row per Linear/Conv layer of the model."""

    def __init__(self, rows: list[ConversionRow]):
        self.rows = rows

    @property
    def converted(self) -> list[ConversionRow]:
        return [r for r in self.rows if r.note == "converted"]

    @property
    def kept(self) -> list[ConversionRow]:
        return [r for r in self.rows if r.note != "converted"]

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def table(self, title: str = "feedback layers"):
        from rich.table import Table

        table = Table(title=title)
        for col in ("layer", "type", "n", "m", "rank r", "rule", "note"):
            table.add_column(col, justify="right" if col in ("n", "m", "rank r") else "left")
        for r in self.rows:
            rank = "full" if r.rank is None else f"{r.rank}"
            if r.rank is not None and r.rank >= r.full_rank:
                rank += " (full)"
            if r.rank is not None and r.groups > 1:
                rank += f" x {r.groups} groups"
            kind = r.kind + (f" g={r.groups}" if r.groups > 1 else "")
            table.add_row(r.name, kind, str(r.n), str(r.m), rank, r.rule, r.note)
        return table

    def __str__(self) -> str:
        lines = [
            f"{r.name}: {r.kind} {r.n}->{r.m} rule={r.rule} r={r.rank} ({r.note})"
            for r in self.rows
        ]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """Rows for every Linear/Conv layer of the model: converted layers with their rule and
    rank, the others (plain autograd, i.e. backprop) with the reason they were kept."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, CONVERTIBLE):
            continue
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        kind = next(c.__name__ for c in CONVERTIBLE if isinstance(module, c))
        n = module.in_channels if conv else module.in_features
        m = module.out_channels if conv else module.out_features
        groups = module.groups if conv else 1
        if isinstance(module, FeedbackLayer):
            rows.append(ConversionRow(name, kind, n, m, module.rank, module.full_rank,
                                      module.rule.name, "converted", groups))  # fmt: skip
        else:
            note = getattr(module, "ldfa_note", "kept: not converted")
            m_g = m // groups
            full = min(m_g, n // groups * (math.prod(module.kernel_size) if conv else 1))
            rows.append(ConversionRow(name, kind, n, m, None, full, "bp", note, groups))
    return ConversionReport(rows)


def feedback_layers(model: nn.Module):
    """(name, layer) for every feedback layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer)]


def learned_feedback(layer: nn.Module) -> list[nn.Parameter]:
    """One layer's learned feedback tensors (its P, Q or B that an optimizer steps)."""
    return [p for name, p in layer.named_parameters(recurse=False)
            if name.startswith("feedback_") and p.requires_grad]  # fmt: skip


def feedback_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned feedback tensors (P, Q, B), for the second optimizer."""
    return [p for _, layer in feedback_layers(model) for p in learned_feedback(layer)]


def forward_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a feedback tensor."""
    feedback = {id(p) for p in feedback_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in feedback]


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """The sum of the rules' loss terms on their own parameters (``svd_dfa``'s
    orthogonality term), to add to the task loss; None when no rule has one."""
    terms = [
        term
        for _, layer in feedback_layers(model)
        if (term := layer.rule.auxiliary_loss(layer)) is not None
    ]
    return sum(terms[1:], terms[0]) if terms else None


def backward_with_rules(model: nn.Module, loss: Tensor, step: int | None = None):
    """``loss.backward()`` plus what the rules add: their auxiliary loss terms in the same
    backward, then the normative feedback loss (eq. 8) where due at ``step`` (always when
    None). Returns the auxiliary loss (detached) or None, for logging."""
    from .normative import normative_update

    aux = auxiliary_loss(model)
    (loss if aux is None else loss + aux).backward()
    normative_update(model, step)  # eq. 9 into Q.grad, P.grad: feedback_loss's gradients
    return None if aux is None else aux.detach()


def set_feedback_targets(model: nn.Module, targets: Tensor | None) -> None:
    """Give the layers with ``use_targets`` this batch's targets (class indices or one-hot
    rows) for eq. 15's covariance; None clears them. Call before the forward pass."""
    for _, layer in feedback_layers(model):
        if not getattr(layer.rule, "use_targets", False):
            continue
        if targets is not None and targets.dim() == 1:
            targets = nn.functional.one_hot(targets.long(), layer.fan_out).float()
        layer.feedback_targets = targets
