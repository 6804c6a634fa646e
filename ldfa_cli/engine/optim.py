"""Optimizers and learning-rate schedules from a recipe's ``optim``/``schedule`` sections,
and the run's pair of them (:class:`Optimizers`): the forward one and the feedback one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ldfa_cli.feedback.model import (
    feedback_elements_per_step,
    feedback_parameters,
    forward_parameters,
)

from .regularise import parameter_groups


def _flat(params) -> list:
    """The tensors of a parameter list or of parameter groups."""
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def _fused_ok(params) -> bool:
    """PyTorch's fused Adam/AdamW/SGD kernels (one pass over every tensor, on CPU and GPU)
    need floating-point tensors on one device of a supported kind."""
    params = _flat(params)
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and devices <= {"cpu", "cuda"}
        and len(devices) == 1
        and all(
            p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params
        )
    )


# name -> (torch optimizer, the config's keys it takes besides lr and weight_decay, fused)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, ("betas", "eps", "amsgrad"), True),
    "adamw": (torch.optim.AdamW, ("betas", "eps", "amsgrad"), True),
    "sgd": (torch.optim.SGD, ("momentum",), True),
    "rmsprop": (torch.optim.RMSprop, ("alpha", "eps", "momentum"), False),
}


def make_optimizer(config, params) -> torch.optim.Optimizer:
    """The config's optimizer: PyTorch's fused kernel where it has one for these tensors,
    else its foreach implementation (a few ops over all tensors, never one op per tensor:
    PyTorch's default on a CPU is the loop)."""
    params = list(params)
    kind, keys, fusable = OPTIMIZERS[config.name]
    options = {key: getattr(config, key) for key in keys}
    if fusable and _fused_ok(params):
        options["fused"] = True
    else:
        options["foreach"] = True
    return kind(params, lr=config.lr, weight_decay=config.weight_decay, **options)


def _constant(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    return 1.0


def _cosine(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    span = max(total_epochs - config.warmup_epochs, 1e-12)
    progress = min(max((epoch - config.warmup_epochs) / span, 0.0), 1.0)
    floor = min(config.min_lr / base_lr, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _exponential(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    return config.gamma ** math.floor(max(epoch - config.warmup_epochs, 0.0))


def _multistep(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    """Milestones are epochs of the whole run, warmup included."""
    return config.gamma ** sum(epoch >= m for m in config.milestones)


# a schedule's multiplier of the base lr after its warmup, by name
SCHEDULES = {"constant": _constant, "cosine": _cosine, "exponential": _exponential,
             "multistep": _multistep}  # fmt: skip


def lr_factor(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    """The schedule's multiplier of the base lr at a fractional epoch."""
    warmup = config.warmup_epochs
    if warmup > 0 and epoch < warmup:
        start = config.warmup_start_factor
        return start + (1.0 - start) * epoch / warmup
    return SCHEDULES[config.name](config, base_lr, epoch, total_epochs)


def make_schedule(config, optimizer, steps_per_epoch: int, total_epochs: int):
    """A ``LambdaLR`` stepped once per training step."""
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(config, base_lr, step / steps_per_epoch, total_epochs),
    )


def reapply_hyperparameters(config, optimizer, schedule) -> None:
    """After loading a checkpoint's optimizer and schedule states, put the recipe's values
    back (a resume may override lr, weight decay or epochs); the step count is kept."""
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
        for key in ("weight_decay", "betas", "eps", "amsgrad", "momentum", "alpha"):
            if key in group and not (key == "weight_decay" and group.get("no_decay")):
                group[key] = getattr(config, key)
    schedule.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["lr"] = config.lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def clip_gradients(params, config) -> None:
    """The config's clipping: of the gradients' joint norm (``grad_clip``), then of every
    element to [-v, v] (``grad_clip_value``, as the authors' code clamps LDFA gradients)."""
    if config.grad_clip:
        nn.utils.clip_grad_norm_(params, config.grad_clip)
    if config.grad_clip_value:
        nn.utils.clip_grad_value_(params, config.grad_clip_value)


@dataclass
class Optimizers:
    """The run's optimizers and schedules. The forward optimizer holds the forward
    parameters, and the feedback tensors too when the recipe says ``feedback.optimizer:
    forward`` (App. C.3: W, P and Q in one Adam); otherwise the feedback tensors have their
    own optimizer and schedule (App. C.2), or none when the rule learns nothing."""

    forward: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    forward_config: object
    feedback: torch.optim.Optimizer | None = None
    feedback_schedule: torch.optim.lr_scheduler.LambdaLR | None = None
    feedback_config: object = None

    def zero_grad(self) -> None:
        """Every gradient to None, as ``Optimizer.zero_grad(set_to_none=True)`` does, written
        out: torch.compile traces this (it skips ``Optimizer.zero_grad``, a graph break in a
        compiled step) and it dispatches no profiler ops."""
        for optimizer, _, _ in self.pairs():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None

    def step(self) -> None:
        """Clip, step and advance the schedule of each optimizer."""
        for optimizer, schedule, config in self.pairs():
            clip_gradients([p for g in optimizer.param_groups for p in g["params"]], config)
            optimizer.step()
            schedule.step()

    def pairs(self):
        yield self.forward, self.schedule, self.forward_config
        if self.feedback is not None:
            yield self.feedback, self.feedback_schedule, self.feedback_config

    def state_dict(self) -> dict:
        fb = self.feedback is not None
        return {
            "optimizer": self.forward.state_dict(),
            "schedule": self.schedule.state_dict(),
            "feedback_optimizer": self.feedback.state_dict() if fb else None,
            "feedback_schedule": self.feedback_schedule.state_dict() if fb else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint's states, then put the recipe's values back (a resume may
        override lr, weight decay or epochs); the step count is kept."""
        self.forward.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback_optimizer"])
            self.feedback_schedule.load_state_dict(state["feedback_schedule"])
        for optimizer, schedule, config in self.pairs():
            reapply_hyperparameters(config, optimizer, schedule)

    @property
    def lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def flop_plan(self, model: nn.Module) -> list[tuple[str, object, float]]:
        """(label, config, parameter elements stepped in an average step) per optimizer, for
        the FLOP count: the forward one over the forward parameters (and the feedback
        tensors when it holds them), the feedback one over the feedback tensors, each
        counted in the steps in which it has a gradient."""
        forward = sum(p.numel() for p in forward_parameters(model))
        feedback = feedback_elements_per_step(model)
        if self.feedback is None:  # shared with the forward optimizer, or nothing learned
            return [("forward", self.forward_config, forward + feedback)]
        return [("forward", self.forward_config, forward),
                ("feedback", self.feedback_config, feedback)]  # fmt: skip


def shares_forward_optimizer(feedback_config) -> bool:
    return feedback_config.optimizer == "forward"


def build_optimizers(recipe, model: nn.Module, steps_per_epoch: int) -> Optimizers:
    epochs = recipe.train.epochs
    feedback = feedback_parameters(model)
    shared = shares_forward_optimizer(recipe.feedback)
    params = forward_parameters(model) + (feedback if shared else [])
    groups = parameter_groups(model, params, recipe.optim.weight_decay,
                              recipe.optim.no_decay_bias_norm)  # fmt: skip
    forward = make_optimizer(recipe.optim, groups)
    optimizers = Optimizers(forward, make_schedule(recipe.schedule, forward, steps_per_epoch,
                                                   epochs), recipe.optim)  # fmt: skip
    if feedback and not shared:
        config = recipe.feedback.optimizer
        groups = parameter_groups(model, feedback, config.weight_decay, config.no_decay_bias_norm)
        optimizers.feedback = make_optimizer(config, groups)
        optimizers.feedback_schedule = make_schedule(
            recipe.feedback.schedule, optimizers.feedback, steps_per_epoch, epochs
        )
        optimizers.feedback_config = config
    return optimizers
