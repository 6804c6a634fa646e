"""The training step: the only place a step is written.

``ldfa train`` runs it for every batch, ``ldfa bench`` times it, ``ldfa bench --memory``
follows its tensors and ``ldfa flops`` counts it; they observe it (the accounting markers,
a dispatch mode around it, an observer's phases), none of them writes its own. One step:

1. Mixup/CutMix (seeded by the step, so a resume mixes the same) and the batch's targets
   for the rules that read them;
2. the forward under the recipe's precision and the task loss;
3. one backward of the task loss plus the rules' auxiliary terms, then the rules' work
   after the backward (eq. 9 where due);
4. clipping, both optimizers and their schedules; the rules' periodic resets; the EMA.

``train.compile_scope: step`` compiles 2 and 3 as one graph (:meth:`TrainStep.compute`);
the optimizers stay eager: each is one fused kernel already, and PyTorch ends a graph
around every ``Optimizer.step`` on purpose (its no-grad mode must reach AOTAutograd).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldfa_cli.config.schema import compile_mode
from ldfa_cli.feedback import accounting, backward_with_rules, reset_due, set_feedback_targets
from ldfa_cli.feedback.model import needs_targets

from .regularise import correct, make_mixup, mix_batch, predictions, task_loss

_NO_PHASE = contextlib.nullcontext()


def _tracing_autograd():
    """Dynamo's (experimental) tracing of ``torch.autograd.grad`` into the graph, on while
    the compiled step traces; ``.backward()`` under it mixes up gradients in torch 2.14.1,
    even of a plain nn.Linear model, so the step calls ``autograd.grad`` itself."""
    return torch._dynamo.config.patch(trace_autograd_ops=True)


@dataclass
class StepOutput:
    loss: Tensor  # the task loss (detached), without the rules' auxiliary terms
    logits: Tensor  # (detached)
    targets: Tensor  # class indices, or soft rows where Mixup/CutMix mixed the batch
    aux_loss: Tensor | None  # the rules' auxiliary loss (detached), or None

    @property
    def correct(self) -> Tensor:
        """Correct predictions in the batch (for the logs: not part of the step's work)."""
        return correct(self.logits, self.targets)

    @property
    def predictions(self) -> int:
        """How many predictions the loss averages: examples, or every token of a sequence."""
        return predictions(self.logits, self.targets)


def mix_seed(seed: int, index: int) -> int:
    """The step's Mixup seed: fixed by (run seed, step), so a resume mixes the same."""
    return (seed * 1_000_003 + index) % (1 << 31)


class TrainStep:
    """One training step of ``model`` (run through ``net``: the model itself, or its DDP or
    compiled wrapper). ``optimizers`` may be None (the step then ends after the rules'
    after-backward work, with the gradients in place). ``steps_per_epoch`` sizes the
    rules' resets given in epochs (None: those never run). ``observer``, when set, is asked
    for a context around each phase: ``observer.phase(name)`` for "forward", "backward"
    and "optimizer" ("forward and backward" in one where ``compiled_step``, a
    ``torch.compile`` mode, compiles them as one graph: :meth:`compute`)."""

    def __init__(
        self,
        model: nn.Module,
        optimizers=None,
        *,
        net: nn.Module | None = None,
        mixer=None,
        label_smoothing: float = 0.0,
        precision: str = "fp32",
        seed: int = 0,
        steps_per_epoch: int | None = None,
        ema=None,
        compiled_step: str | None = None,
    ):
        self.model, self.optimizers = model, optimizers
        self.net = model if net is None else net  # (a compiled module has no truth value)
        self.mixer, self.label_smoothing, self.precision = mixer, label_smoothing, precision
        self.seed, self.steps_per_epoch, self.ema = seed, steps_per_epoch, ema
        self.targets_wanted = needs_targets(model)
        self.observer = None
        self._compute = None if compiled_step is None else torch.compile(
            self.compute, mode=compiled_step)  # fmt: skip
        self._params = [p for p in model.parameters() if p.requires_grad]

    @classmethod
    def for_recipe(cls, recipe, model, optimizers, classes: int, steps_per_epoch=None,
                   net=None, ema=None, compiled: bool = True) -> TrainStep:  # fmt: skip
        """The step a recipe's ``train`` and ``data.augment`` sections describe; with
        ``train.compile_scope: step`` (unless not ``compiled``) its forward and backward
        compiled as one graph (``net`` is then the model itself)."""
        cfg = recipe.train
        mixer = make_mixup(recipe.data.augment, classes, cfg.label_smoothing)
        whole = compile_mode(cfg, "step") if compiled else None
        return cls(model, optimizers, net=net, mixer=mixer, label_smoothing=cfg.label_smoothing,
                   precision=cfg.precision, seed=cfg.seed, steps_per_epoch=steps_per_epoch,
                   ema=ema, compiled_step=whole)  # fmt: skip

    def __call__(self, x: Tensor, y: Tensor, index: int) -> StepOutput:
        """The step on batch (x, y); ``index`` is the number of optimizer steps taken."""
        x, targets = self.inputs(x, y, index)
        if self._compute is not None:
            self.zero_grad()  # outside the graph: it would guard on the optimizers' lr
            with self._phase("forward and backward"), _tracing_autograd():
                logits, loss, aux = self._compute(x, targets, index)
        else:
            with self._phase("forward"):
                logits, loss = self.forward(x, targets)
            with self._phase("backward"):
                aux = self.backward(loss, index)
        with self._phase("optimizer"):
            self.update(index)
        return StepOutput(loss.detach(), logits.detach(), targets, aux)

    def compute(self, x: Tensor, targets: Tensor, index: int):
        """The forward and the backward with the rules' work, the gradients taken by
        ``torch.autograd.grad`` (which torch.compile traces, where ``.backward()`` ends a
        graph): what ``compile_scope: step`` compiles. Returns (logits, loss, aux loss),
        detached."""
        logits, loss = self.forward(x, targets)
        aux = backward_with_rules(self.model, loss, index, self._params)
        return logits.detach(), loss.detach(), aux

    def inputs(self, x: Tensor, y: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """(x, targets): mixed with soft targets when Mixup/CutMix is on; the targets handed
        to the rules that read them."""
        x, targets = mix_batch(self.mixer, x, y, mix_seed(self.seed, index))
        if self.targets_wanted:
            set_feedback_targets(self.model, targets)
        return x, targets

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):  # fmt: skip
            logits = self.net(x)
            return logits, task_loss(logits.float(), targets, self.label_smoothing)

    def backward(self, loss: Tensor, index: int) -> Tensor | None:
        """Zero the gradients; one backward of the loss and the rules' auxiliary terms (the
        weight gradients, the input gradients through the feedback, the feedback grads that
        come from the data); then the rules' after-backward work due at this step."""
        self.zero_grad()
        return backward_with_rules(self.model, loss, index)

    def zero_grad(self) -> None:
        if self.optimizers is not None:
            self.optimizers.zero_grad()
        else:
            self.model.zero_grad(set_to_none=True)

    def update(self, index: int) -> None:
        """Clip, step and schedule both optimizers; the resets due once this step is taken
        (``index`` + 1 steps); the EMA."""
        if self.optimizers is not None:
            counting = accounting.ACTIVE  # a timer files the optimizers' ops as their own
            if counting:
                previous = accounting.enter(accounting.OPTIMIZER, "optimizer")
            self.optimizers.step()
            if counting:
                accounting.leave(previous)
        reset_due(self.model, index + 1, self.steps_per_epoch)
        if self.ema is not None:
            self.ema.update(self.model, step=index + 1)

    def _phase(self, name: str):
        return _NO_PHASE if self.observer is None else self.observer.phase(name)

    def on_a_copy(self) -> TrainStep:  # (eager: the FLOP counter reads every op)
        """This step on a deep copy of the model, without optimizers and EMA: for counting
        its FLOPs while the model itself stays untouched."""
        model = copy.deepcopy(self.model)
        model.train(self.model.training)
        return TrainStep(model, mixer=self.mixer, label_smoothing=self.label_smoothing,
                         precision=self.precision, seed=self.seed,
                         steps_per_epoch=self.steps_per_epoch)  # fmt: skip
