"""FLOPs of what runs inside a counter, per layer and phase, by PyTorch's own counter.

``PhaseFlopCounter`` is ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add, forward and backward, custom autograd Functions and SDPA included) that also
files every count under the layer and phase the feedback layers mark (``forward``,
``input_grad``, ``broadcast``, ``weight_grad``, ``feedback_update``, a rule's reset; see
``feedback/accounting.py``) and charges elementwise work by ``costs.ELEMENTWISE``.
Operations outside feedback layers (attention, unconverted layers) go to ``(other)``.
``StepFlops`` holds one step's counts with the periodic work amortised.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ldfa_cli.feedback import accounting

from . import costs

PHASES = accounting.PHASES
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


class PhaseFlopCounter(accounting.Marking, FlopCounterMode):
    """FlopCounterMode (with :func:`attention_formulas` and the QR/SVD formulas) that also
    keeps ``counts[(layer, phase)]``, charges elementwise ops by ``costs.ELEMENTWISE`` under
    ``("(elementwise)", "forward" | "backward")`` (inside a feedback reset: under the
    reset), and remembers the names of the ops it charged nothing (``uncounted``). The
    optimizer steps' ops are not counted: their FLOPs come from
    :func:`~ldfa_cli.measure.costs.optimizer_flops`, by their algorithm."""

    def __init__(self):
        formulas = {**attention_formulas(), **costs.decomposition_formulas()}
        super().__init__(display=False, custom_mapping=formulas)
        self.counts: dict[tuple[str, str], float] = defaultdict(float)
        self.uncounted: set[str] = set()

    def _count_flops(self, func_packet, out, args, kwargs):
        where = accounting.where()
        if where[0] == accounting.OPTIMIZER:
            return out
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
        elif where[1] == accounting.RESET:
            self.counts[where] += flops
        else:
            self.counts[(ELEMENTWISE_ROW, "forward" if where[1] == "forward" else "backward")] += (
                flops
            )
        return out


@dataclass
class StepFlops:
    """FLOPs of one training step by (layer, phase), and each feedback layer's samples; the
    feedback update amortised over its interval, a feedback reset over its; the optimizer
    steps (``optimizer``: label -> FLOPs) from their algorithms."""

    counts: dict[tuple[str, str], float]
    samples: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    intervals: dict[str, int] = field(default_factory=dict)  # the rule's update_every
    resets: dict[str, int] = field(default_factory=dict)  # steps between feedback resets
    optimizer: dict[str, float] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)

    def get(self, layer: str, phase: str) -> float:
        value = self.counts.get((layer, phase), 0)
        if phase == "feedback_update":
            value /= self.intervals.get(layer, 1)  # amortised over the update interval
        elif phase == accounting.RESET:
            value /= self.resets.get(layer, 1)
        return value

    def layer_total(self, layer: str) -> float:
        return sum(self.get(layer, p) for p in ALL_PHASES)

    @property
    def layers(self) -> list[str]:
        """Feedback layers and ``(other)``: the rows of products."""
        names = (layer for layer, phase in self.counts if phase != accounting.RESET)
        return [n for n in dict.fromkeys(names) if n != ELEMENTWISE_ROW]

    @property
    def products(self) -> float:
        """Matmuls, convolutions and attention: what FlopCounterMode itself counts."""
        return sum(self.layer_total(layer) for layer in self.layers)

    @property
    def elementwise(self) -> dict[str, float]:
        return {p: self.get(ELEMENTWISE_ROW, p) for p in ("forward", "backward")}

    @property
    def reset(self) -> float:
        return sum(self.get(layer, p) for layer, p in self.counts if p == accounting.RESET)

    def extra_rows(self) -> dict[str, float]:
        """The step's costs beside the per-layer products, each its own row."""
        rows = {"(elementwise fwd)": self.elementwise["forward"],
                "(elementwise bwd)": self.elementwise["backward"],
                "(feedback reset)": self.reset}  # fmt: skip
        rows.update({f"(optimizer: {label})": v for label, v in self.optimizer.items()})
        return rows

    @property
    def total(self) -> float:
        return self.products + sum(self.extra_rows().values())
