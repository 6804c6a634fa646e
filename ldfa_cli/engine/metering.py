"""The training step's FLOPs, counted by running it (on a copy of the model) inside
PyTorch's counter: what ``ldfa train`` adds to ``train_flops`` at every step, and what
``ldfa flops`` and ``ldfa bench`` report."""

from __future__ import annotations

import torch
from torch import nn

from ldfa_cli.feedback import accounting, feedback_layers
from ldfa_cli.feedback.model import resettable_layers, run_reset
from ldfa_cli.measure import costs
from ldfa_cli.measure.flops import PhaseFlopCounter, StepFlops

from .step import TrainStep


def count_step(step: TrainStep, x, y, optimizers: list[tuple[str, object, float]] = ()
               ) -> StepFlops:  # fmt: skip
    """One step (forward, loss, backward, the rules' after-backward work, their resets
    amortised) counted on a copy of the step's model, the RNG state restored afterwards, so
    training is untouched. It runs as the first step (index 0), where every periodic update
    is due; ``StepFlops`` amortises each over its interval. ``optimizers``: (label, config,
    parameter elements) of each optimizer step to add by its algorithm (the plan of
    :meth:`~ldfa_cli.engine.optim.Optimizers.flop_plan`)."""
    work = step.on_a_copy()
    samples: dict[str, int] = {}
    batches: dict[str, int] = {}
    hooks = _samples_hooks(work.model, samples, batches)
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), PhaseFlopCounter() as counter:
            work(x, y, 0)
            resets = _reset_every_resettable_layer(work, counter)
    finally:
        for h in hooks:
            h.remove()
    intervals = {name: layer.rule.update_every for name, layer in feedback_layers(work.model)}
    steps = {label: costs.optimizer_flops(config, n) for label, config, n in optimizers}
    return StepFlops(dict(counter.counts), samples, batches, intervals, resets, steps,
                     sorted(counter.uncounted))  # fmt: skip


def _samples_hooks(model: nn.Module, samples: dict, batches: dict):
    def hook(module, args, out):
        channels = out.shape[1] if isinstance(module, nn.Conv1d | nn.Conv2d) else out.shape[-1]
        samples[module.layer_name] = out.numel() // channels
        batches[module.layer_name] = out.shape[0]

    return [layer.register_forward_hook(hook) for _, layer in feedback_layers(model)]


def _reset_every_resettable_layer(step: TrainStep, counter: PhaseFlopCounter) -> dict[str, int]:
    """Run once, under the counter, every layer's reset the step did not run (they are due
    every so many steps); return each such layer's interval, to amortise it over."""
    intervals = {}
    for layer in resettable_layers(step.model, step.steps_per_epoch):
        if (layer.layer_name, accounting.RESET) not in counter.counts:
            run_reset(layer)
        intervals[layer.layer_name] = layer.rule.reset_every(step.steps_per_epoch)
    return intervals


class FlopMeter:
    """The FLOPs of each training step: every distinct batch shape's step counted once (on
    a copy of the model), times the ranks that each run one."""

    def __init__(self, step: TrainStep, plan: list, ranks: int = 1):
        self.step, self.plan, self.ranks = step, plan, ranks
        self._by_shape: dict[tuple, float] = {}

    def __call__(self, x, y) -> float:
        key = tuple(x.shape)
        if key not in self._by_shape:
            self._by_shape[key] = count_step(self.step, x, y, self.plan).total * self.ranks
        return self._by_shape[key]
