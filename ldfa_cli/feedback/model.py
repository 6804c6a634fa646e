"""What a training step asks of a converted model: its feedback layers and parameters, the
batch's targets for the rules that read them, the rules' loss terms, and the rules' work
outside their layers' backward (after the backward; periodic resets after the optimizer
step). Each function calls the rules' hooks (:mod:`ldfa_cli.feedback.rule`) and never
asks which rule a layer runs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import accounting, deferred
from .layers import FeedbackLayer
from .rule import overrides


def feedback_layers(model: nn.Module) -> list[tuple[str, FeedbackLayer]]:
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


def feedback_elements_per_step(model: nn.Module) -> float:
    """The learned feedback tensors' elements an optimizer steps in an average step: a
    layer's tensors have a gradient one step in its rule's ``update_every`` (``zero_grad``
    sets it to None in between, and PyTorch's optimizers skip a parameter without one)."""
    return sum(p.numel() / layer.rule.update_every
               for _, layer in feedback_layers(model) for p in learned_feedback(layer))  # fmt: skip


def needs_targets(model: nn.Module) -> bool:
    return any(layer.rule.needs_targets for _, layer in feedback_layers(model))


def set_feedback_targets(model: nn.Module, targets: Tensor | None) -> None:
    """Give the layers whose rule reads targets this batch's (class indices or one-hot
    rows, e.g. for eq. 15's covariance); None clears them. Call before the forward pass."""
    for _, layer in feedback_layers(model):
        if not layer.rule.needs_targets:
            continue
        if targets is not None and targets.dim() == 1:
            targets = nn.functional.one_hot(targets.long(), layer.fan_out).float()
        layer.feedback_targets = targets


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """The sum of the rules' loss terms on their own parameters (``svd_dfa``'s
    orthogonality term), to add to the task loss; None when no rule has one."""
    terms = []
    for _, layer in feedback_layers(model):  # a loop: torch.compile breaks on the walrus
        term = layer.rule.auxiliary_loss(layer)  # in a comprehension ("uninitialized cell")
        if term is not None:
            terms.append(term)
    return sum(terms[1:], terms[0]) if terms else None


def after_backward(model: nn.Module, step: int | None = None) -> None:
    """Every rule's :meth:`~ldfa_cli.feedback.rule.Rule.after_backward` over its layers
    (eq. 9 into Q.grad and P.grad where due at ``step``; every periodic update when None)."""
    for rule_class, layers in _by_rule(model, "after_backward").items():
        rule_class.after_backward(layers, step)


def _by_rule(model: nn.Module, hook: str) -> dict[type, list]:
    """The feedback layers whose rule overrides ``hook``, grouped by rule class."""
    groups: dict[type, list] = {}
    for _, layer in feedback_layers(model):
        if overrides(layer.rule, hook):
            groups.setdefault(type(layer.rule), []).append(layer)
    return groups


def epoch_end(model: nn.Module, epochs_done: int, optimizers: list) -> bool:
    """Every rule's :meth:`~ldfa_cli.feedback.rule.Rule.at_epoch_end` over its layers; True
    when a layer changed shape."""
    changed = False
    for rule_class, layers in _by_rule(model, "at_epoch_end").items():
        changed = rule_class.at_epoch_end(layers, epochs_done, optimizers) or changed
    return changed


def changes_shape(model: nn.Module) -> bool:
    return any(layer.rule.changes_shape for _, layer in feedback_layers(model))


def fit_to_state(model: nn.Module, state: dict) -> None:
    """Shape every feedback layer as ``state`` (a saved ``model.state_dict()``) has it,
    before ``model.load_state_dict(state)``: a rule that cut a layer's rank in training."""
    for name, layer in feedback_layers(model):
        layer.rule.fit_to_state(layer, state, f"{name}." if name else "")


def backward_with_rules(model: nn.Module, loss: Tensor, step: int | None = None,
                        params: list[Tensor] | None = None):  # fmt: skip
    """``loss.backward()`` plus what the rules add: their auxiliary loss terms in the same
    backward, then their after-backward work (eq. 9 where due at ``step``; always when
    None). Returns the auxiliary loss (detached) or None, for logging.

    Given ``params``, the gradients come from ``torch.autograd.grad`` of those tensors and
    are added to their ``.grad`` as ``.backward()`` would: torch.compile traces that call
    into the step's graph (with dynamo's ``trace_autograd_ops``), not ``.backward()``,
    which ends a graph. DDP's hooks do not see it.

    An eager backward outside torchrun lets the rules keep their layers' statistics for
    the after-backward work to finish in a batch (:mod:`~ldfa_cli.feedback.deferred`)."""
    aux = auxiliary_loss(model)
    total = loss if aux is None else loss + aux
    with deferred.collecting(enabled=params is None and not _distributed()):
        if params is None:
            total.backward()
        else:
            grads = torch.autograd.grad(total, params, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                if grad is not None:
                    param.grad = grad if param.grad is None else param.grad + grad
        after_backward(model, step)
    return None if aux is None else aux.detach()


def _distributed() -> bool:
    """Under torchrun DDP averages the gradients a backward produces, and only those."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def reset_due(model: nn.Module, step: int, steps_per_epoch: int | None = None) -> int:
    """Run :meth:`~ldfa_cli.feedback.rule.Rule.reset` in the layers whose reset interval
    divides ``step`` (the optimizer steps taken; never at 0). Returns how many were reset."""
    reset = 0
    for index, layer in enumerate(resettable_layers(model, steps_per_epoch)):
        every = layer.rule.reset_every(steps_per_epoch)
        if step > 0 and step % every == 0:
            run_reset(layer, seed=step * 1_000_003 + index)
            reset += 1
    return reset


def resettable_layers(model: nn.Module, steps_per_epoch: int | None) -> list[FeedbackLayer]:
    """The feedback layers whose rule resets them every so many steps."""
    return [layer for _, layer in feedback_layers(model)
            if layer.rule.reset_every(steps_per_epoch)]  # fmt: skip


def run_reset(layer: FeedbackLayer, seed: int = 0) -> None:
    """The layer's reset, its ops marked for the FLOP counter and the phase timer."""
    counting = accounting.ACTIVE
    if counting:
        previous = accounting.enter(layer.layer_name, accounting.RESET)
    layer.rule.reset(layer, seed)
    if counting:
        accounting.leave(previous)


def update_period(model: nn.Module) -> int:
    """Steps in which every periodic feedback update runs a whole number of times: the
    least common multiple of the rules' ``update_every`` (1 when none is periodic)."""
    return math.lcm(1, *(layer.rule.update_every for _, layer in feedback_layers(model)))


def ddp_ignored(model: nn.Module) -> list[str]:
    """Qualified names of the tensors DDP must not wait for (see ``Rule.ddp_ignored``)."""
    return [f"{name}.{tensor}" for name, layer in feedback_layers(model)
            for tensor in layer.rule.ddp_ignored(layer)]  # fmt: skip
