"""Swap a model's ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers for feedback layers,
and report what was swapped and what was kept, and why.

The converter selects layers (include/exclude, functional uses), asks the rule which it
keeps (:meth:`~ldfa_cli.feedback.rule.Rule.kept_because`) and which it converts with which
copy of itself (:meth:`~ldfa_cli.feedback.rule.Rule.plan`), then builds each layer with the
rule's ``layer_class``. It knows no rule by name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fnmatch import fnmatch

from torch import Tensor, nn

from .blocks import BLOCK_NOTE, BroadcastPoint
from .conv1d import linearise_conv1d
from .layers import FeedbackLayer
from .rule import FeedbackConfigError, Rule, Selection, make_rule

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
    return rule.kept_because(module, rank, force_grouped)


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
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` (and transformers' ``Conv1D``, first made
    the nn.Linear it is) whose qualified name matches a glob in
    ``include`` (default all) and none in ``exclude`` for a feedback layer running ``rule``
    (its options as keywords), and return the model (changed in place).

    ``rank``: int, fraction of the layer's output width, or None (full rank); ``ranks``
    overrides it by pattern, first match wins, e.g. ``{"*.qkv": 72}``; ``rank_scale``
    multiplies it by pattern, e.g. ``{"*.qkv": 3}`` (the authors' 3r for qkv). A grouped
    conv gets a rank per group; where even rank 1 per group saves nothing (a depthwise conv:
    its W^T g costs T k^2 m) it stays on plain autograd unless ``force_grouped``. With
    ``example_input``, layers whose input needs no gradient (the first layer on the raw
    input, a ViT's patch_embed) stay plain ``nn`` layers; without it they are converted but
    still run plain autograd at run time, as their input needs no gradient. The rule's
    ``plan`` may convert fewer or give layers their own copy of it (a broadcast rule stops
    at its source; ``use_targets=True`` reaches only the output layer).
    :func:`conversion_report` tells what was swapped.
    """
    base_rule = make_rule(rule, **options)
    linearise_conv1d(model)  # GPT-2's Conv1D: the same layer as an nn.Linear
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
    plan = base_rule.plan(Selection(model, chosen, [n for n, _ in _candidates(model)],
                                    example_input))  # fmt: skip
    if not plan.layers and not plan.points:
        raise FeedbackConfigError(
            f"no Linear or Conv layer matched include={include} exclude={exclude} (or each "
            "was kept: conversion_report tells why)"
        )
    for name, module, layer_rule in plan.layers:
        spec = _rank_for(name, module, rank, ranks, rank_scale)
        kind = layer_rule.layer_class or FeedbackLayer
        layer = kind.replacing(module, name, layer_rule, spec)
        if hasattr(module, "ldfa_was"):  # the report says what it was (GPT-2's Conv1D)
            layer.ldfa_was = module.ldfa_was
        model.set_submodule(name, layer)
    if plan.finish is not None:  # after the swap: it may refer to swapped layers
        plan.finish(model)
    return model


@dataclass(frozen=True)
class ConversionRow:
    name: str
    kind: str  # Linear | Conv1d | Conv2d | Block (a feedback point on a block's output)
    n: int  # input features / channels (a block: its width)
    m: int  # output features / channels (a block: the source's width)
    rank: int | None  # feedback rank (per group); None for a full-rank or transpose feedback
    full_rank: int
    rule: str
    note: str
    groups: int = 1
    asked: int | None = None  # the rank asked for, where it was above full rank (clipped)
    tied_to: str | None = None  # another module whose weight is this layer's (a tied head)


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
            if r.asked is not None:
                rank += f" (full; {r.asked} asked)"
            elif r.rank is not None and r.rank >= r.full_rank:
                rank += " (full)"
            if r.rank is not None and r.groups > 1:
                rank += f" x {r.groups} groups"
            kind = r.kind + (f" g={r.groups}" if r.groups > 1 else "")
            note = r.note if r.tied_to is None else (
                f"{r.note}; weight tied to {r.tied_to}: its own feedback, which learns "
                "from that shared matrix")  # fmt: skip
            if r.kind == "Block":
                note = f"{r.note}: {BLOCK_NOTE}"
            table.add_row(r.name, kind, str(r.n), str(r.m), rank, r.rule, note)
        return table

    def clipped_note(self) -> str | None:
        """A line naming the layers whose asked rank was above their full rank, or None."""
        clipped = [r for r in self.rows if r.asked is not None]
        if not clipped:
            return None
        names = ", ".join(f"{r.name} ({r.asked} -> {r.rank})" for r in clipped[:6])
        more = f" and {len(clipped) - 6} more" if len(clipped) > 6 else ""
        return (f"rank above the full rank of {len(clipped)} layer(s), clipped to it: "
                f"{names}{more}")  # fmt: skip

    def __str__(self) -> str:
        lines = [
            f"{r.name}: {r.kind} {r.n}->{r.m} rule={r.rule} r={r.rank} ({r.note})"
            for r in self.rows
        ]
        return "\n".join(lines)


EMBEDDING_NOTE = ("kept: looked up by token id (its input needs no gradient, its weight's is a "
                  "scatter): no W^T g to replace")  # fmt: skip


def conversion_report(model: nn.Module) -> ConversionReport:
    """Rows for every Linear/Conv layer of the model: converted layers with their rule and
    rank, the others (plain autograd, i.e. backprop) with the reason they were kept."""
    rows = []
    owners: dict[int, list[str]] = {}  # a weight Parameter -> the modules holding it
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            owners.setdefault(id(module.weight), []).append(name)
    for name, module in model.named_modules():
        if isinstance(module, BroadcastPoint):  # DFA at the blocks: a row for the block
            rows.append(ConversionRow(module.point_name, "Block", module.width,
                                      module.rule.source_width, None, module.width,
                                      module.rule.name, "converted"))  # fmt: skip
        if isinstance(module, nn.Embedding):
            rows.append(ConversionRow(name, "Embedding", module.num_embeddings,
                                      module.embedding_dim, None, module.embedding_dim, "bp",
                                      EMBEDDING_NOTE))  # fmt: skip
        if not isinstance(module, CONVERTIBLE):
            continue
        conv = isinstance(module, nn.Conv1d | nn.Conv2d)
        kind = next(c.__name__ for c in CONVERTIBLE if isinstance(module, c))
        if getattr(module, "ldfa_was", None):
            kind += f" (was {module.ldfa_was})"
        n = module.in_channels if conv else module.in_features
        m = module.out_channels if conv else module.out_features
        groups = module.groups if conv else 1
        if isinstance(module, FeedbackLayer):
            tied = [o for o in owners.get(id(getattr(module, "weight", None)), []) if o != name]
            rows.append(ConversionRow(name, kind, n, m, module.rank, module.full_rank,
                                      module.rule.name, "converted", groups,
                                      module.rank_clipped_from,
                                      tied[0] if tied else None))  # fmt: skip
        else:
            note = getattr(module, "ldfa_note", "kept: not converted")
            m_g = m // groups
            full = min(m_g, n // groups * (math.prod(module.kernel_size) if conv else 1))
            rows.append(ConversionRow(name, kind, n, m, None, full, "bp", note, groups))
    return ConversionReport(rows)
