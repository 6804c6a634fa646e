"""The rule protocol: what a credit-assignment rule is, the registry, and option checking.

A rule is a frozen dataclass whose fields are its options, registered by name. Everything
it does is declared here as a method or class attribute with a default, and overridden in
the rule's own file; the converter, the training step and the analyses only call these:

* conversion: :meth:`Rule.kept_because` (a layer the rule leaves on autograd),
  :meth:`Rule.plan` (which layers it converts, each with its own copy of the rule),
  ``layer_class`` (the layer it needs), :meth:`Rule.rank_limits`, :meth:`Rule.create_feedback`;
* inside the layer's autograd Function: :meth:`Rule.feedback_tensors`, :meth:`Rule.backward`
  (the input gradient through the feedback and the ``.grad`` of feedback tensors learned
  from the data), ``needs_weight_grad``, :attr:`Rule.needs_targets`;
* around the backward: :meth:`Rule.auxiliary_loss` (a term added to the task loss),
  :meth:`Rule.after_backward` (work over all the rule's layers once the backward is done:
  eq. 9, or eq. 15 finished from what the backward kept, :mod:`.deferred`),
  :attr:`Rule.update_every`, :meth:`Rule.reset_every` and :meth:`Rule.reset` (a periodic
  reset after the optimizer step);
* between epochs: :meth:`Rule.at_epoch_end` (e.g. a rank cut, with the optimizers' state)
  and :meth:`Rule.fit_to_state` (a layer shaped as a checkpoint's before it loads);
* distributed training: :meth:`Rule.ddp_ignored`;
* measurement: :meth:`Rule.analytic_flops`, :meth:`Rule.feedback_matrix`,
  :meth:`Rule.layer_measures`.

A layer is any :class:`~ldfa_cli.feedback.layers.FeedbackLayer`; it is typed ``nn.Module``
here, as this module sits below the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ldfa_cli.errors import FeedbackConfigError

from . import accounting
from .probe import inputs_without_grad

RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Register a rule class under its ``name``; a name already taken is refused."""
    if not cls.name:
        raise FeedbackConfigError(f"rule class {cls.__name__} has no name: set name = '...'")
    known = RULES.get(cls.name)
    if known is not None and known is not cls:
        raise FeedbackConfigError(
            f"rule {cls.name!r} is already registered (by {known.__module__}); give "
            f"{cls.__name__} another name"
        )
    RULES[cls.name] = cls
    return cls


@dataclass
class Selection:
    """What the converter hands :meth:`Rule.plan`: the model, the layers selected for
    conversion in module order, the name of every Linear/Conv layer the model holds
    (selected or not), and the example batch (or None)."""

    model: nn.Module
    chosen: list[tuple[str, nn.Module]]
    candidates: list[str]
    example_input: object = None


@dataclass
class ConversionPlan:
    """The layers to convert, each with the rule it gets, and what to do once they are
    swapped (``finish(model)``; a broadcast rule attaches its source hook there, and DFA at
    the blocks the feedback points of the modules named in ``points``)."""

    layers: list[tuple[str, nn.Module, Rule]]
    finish: Callable[[nn.Module], None] | None = field(default=None, repr=False)
    points: list[str] = field(default_factory=list)


def phase_flops(**counts: float) -> dict[str, float]:
    """FLOPs by phase (:data:`~ldfa_cli.feedback.accounting.PHASES`), 0 where not given."""
    return {phase: counts.get(phase, 0) for phase in accounting.PHASES}


@dataclass(frozen=True)
class Rule:
    """Base of every credit-assignment rule. Fields of a subclass are its options."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    equations: ClassVar[str] = ""
    uses_rank: ClassVar[bool] = False
    plain_autograd: ClassVar[bool] = False  # True only for ``bp``
    needs_weight_grad: ClassVar[bool] = False  # its feedback update uses dL/dW (``kp``)
    # the FeedbackLayer subclass the rule's layers are (its classmethod ``replacing`` builds
    # one from an nn layer); None: LDFALinear, LDFAConv1d or LDFAConv2d, by the layer
    layer_class: ClassVar[type | None] = None

    # ------------------------------------------------------------------ conversion
    def kept_because(self, module: nn.Module, rank, force_grouped: bool) -> str | None:
        """Why a selected layer stays on plain autograd ("kept: ..."), or None."""
        return None

    def plan(self, selection: Selection) -> ConversionPlan:
        """Which selected layers to convert, and each one's rule. By default every one
        whose input needs a gradient on the example batch (all of them without one)."""
        chosen = selection.chosen
        if selection.example_input is not None and chosen:
            names = [n for n, _ in chosen]
            no_grad = inputs_without_grad(selection.model, selection.example_input, names)
            for name, module in chosen:
                if name in no_grad:
                    module.ldfa_note = "kept: its input needs no gradient"
            chosen = [(n, m) for n, m in chosen if n not in no_grad]
        return ConversionPlan([(n, m, self) for n, m in chosen])

    def rank_limits(self, layer) -> tuple[int, int]:
        """(width a fractional rank refers to, full rank): a group's output width and the
        rank of its W^T (the layer's, ungrouped), except for broadcast rules."""
        return layer.group_out, layer.full_rank

    def create_feedback(self, layer) -> None:
        """Register the rule's feedback parameters or buffers on ``layer``."""

    # ---------------------------------------------- inside the layer's autograd Function
    def feedback_tensors(self, layer) -> tuple[Tensor, ...]:
        """Tensors handed to the autograd Function, as they are: the backward returns None
        for those it does not learn (a learned tensor that another update trains, eq. 9's Q
        and P, needs no detach, which would cost a dispatch per tensor, layer and step)."""
        return ()

    def backward(
        self,
        ops,
        g: Tensor,
        x: Tensor,
        x_shape: torch.Size,
        feedback: tuple[Tensor, ...],
        targets: Tensor | None,
        need_input: bool,
        need_feedback: tuple[bool, ...],
        grad_weight: Tensor | None,
    ) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """Return the input gradient through the feedback and the feedback tensors' grads."""
        raise TypeError(f"rule {self.name!r} has no custom backward: it runs on plain autograd")

    @property
    def needs_targets(self) -> bool:
        """Whether the layer's backward reads the batch's targets (set before the forward
        by :func:`~ldfa_cli.feedback.set_feedback_targets`)."""
        return False

    # ------------------------------------------------------------- around the backward
    def auxiliary_loss(self, layer) -> Tensor | None:
        """A loss term on the layer's own parameters that training adds to the task loss."""
        return None

    @classmethod
    def after_backward(cls, layers: list, step: int | None) -> None:
        """Work over all of this rule's layers after the backward and before the optimizer
        step, e.g. a gradient that needs no data (eq. 9) or one finished from statistics
        the backward kept (:mod:`~ldfa_cli.feedback.deferred`); ``step`` is the index of the
        step (optimizer steps already taken), None for "every periodic update is due"."""

    @property
    def update_every(self) -> int:
        """Steps between updates of the learned feedback tensors (they have a gradient one
        step in this many): a timing period and the FLOP count's amortisation."""
        return 1

    def reset_every(self, steps_per_epoch: int | None) -> int | None:
        """Steps between :meth:`reset` calls, or None (never)."""
        return None

    def reset(self, layer, seed: int) -> None:
        """The periodic reset of the layer's feedback, run after the optimizer step when
        :meth:`reset_every` divides the steps taken; ``seed`` for any random draw."""

    # -------------------------------------------------------------------- between epochs
    @classmethod
    def at_epoch_end(cls, layers: list, epochs_done: int, optimizers: list) -> bool:
        """Work over all of this rule's layers once ``epochs_done`` epochs are done (after
        their evaluation, before the checkpoint), with the training's optimizers; True when
        a layer's tensors changed shape (the step's FLOPs are counted again)."""
        return False

    @property
    def changes_shape(self) -> bool:
        """Whether :meth:`at_epoch_end` may change a layer's tensors' shapes (which DDP's
        buckets and an EMA copy do not follow)."""
        return False

    def fit_to_state(self, layer, state: dict, prefix: str) -> None:
        """Shape the layer's tensors as a saved state dict's (``prefix`` its key prefix)
        before that state is loaded into a freshly built model."""

    # -------------------------------------------------------------------- distributed
    def ddp_ignored(self, layer) -> tuple[str, ...]:
        """Names of the layer's tensors whose gradient never comes from a backward through
        DDP's forward (identical on every rank), so DDP must not wait for them."""
        return ()

    # -------------------------------------------------------------------- measurement
    def analytic_flops(self, layer, samples: int, batch: int) -> dict[str, float]:
        """One step's FLOPs of the layer by phase from its shapes (2 per multiply-add),
        ``samples`` rows of its output (batch x tokens, or batch x pixels), ``batch``
        examples; ``ldfa flops`` warns where the counter measures otherwise. This default
        is backprop's cost, the input gradient a product with an m x N matrix as W^T g."""
        dense = 2 * samples * layer.fan_out * layer.patch_size
        return phase_flops(forward=dense, weight_grad=dense, input_grad=dense)

    def feedback_matrix(self, layer) -> Tensor | None:
        """The feedback map B in the layout of W (so B^T stands where W^T would), or None."""
        return None

    def layer_measures(self, layer) -> dict:
        """Rule-specific numbers for ``ldfa eval``'s per-layer report."""
        return {}

    # ------------------------------------------------------------------------ options
    def options(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def overrides(rule: Rule | type[Rule], hook: str) -> bool:
    """Whether the rule's class defines ``hook`` otherwise than :class:`Rule`."""
    cls = rule if isinstance(rule, type) else type(rule)
    mine, base = getattr(cls, hook), getattr(Rule, hook)
    return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)


def make_rule(rule: str | Rule, **options) -> Rule:
    """A rule instance from its name and options; unknown names and options are refused."""
    if isinstance(rule, Rule):
        return dataclasses.replace(rule, **options) if options else rule
    cls = RULES.get(rule)
    if cls is None:
        raise FeedbackConfigError(f"unknown rule {rule!r}; known rules: {', '.join(sorted(RULES))}")
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        known = ", ".join(cls.option_names()) or "none"
        raise FeedbackConfigError(
            f"rule {rule!r} has no option {unknown[0]!r}; its options are: {known}"
        )
    return cls(**options)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FeedbackConfigError(message)


RANK_NOTE = ("rank: an int is the rank itself (1 is rank 1); a float in (0, 1] is a fraction "
             "of a layer's output width (0.125 is m/8, 1.0 is full rank); null is full rank. "
             "A rank above a layer's full rank is clipped to it, and the conversion report "
             "(--dry-run) says so.")  # fmt: skip


def resolve_rank(spec: int | float | None, *, name: str, m: int, full_rank: int) -> int:
    """A layer's rank from an int (absolute), a float in (0, 1] (a fraction of the output
    width m, e.g. 0.125 -> m/8; 1.0 is full rank) or None (full rank), clipped to
    [1, full_rank] (see :data:`RANK_NOTE`)."""
    where = f"layer {name!r} (output width m={m}, full rank {full_rank})"
    if spec is None:
        return full_rank
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise FeedbackConfigError(f"{where}: rank must be an int or a fraction, got {spec!r}")
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise FeedbackConfigError(
                f"{where}: a fractional rank must be in (0, 1] (1.0 is full rank), got "
                f"{spec}; give an integer for an absolute rank (1 is rank 1)"
            )
        spec = round(spec * m)
    elif spec <= 0:
        raise FeedbackConfigError(f"{where}: rank must be >= 1, got {spec}")
    return int(min(max(spec, 1), full_rank))
