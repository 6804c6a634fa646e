"""Optimizers and learning-rate schedules from a recipe's ``optim``/``schedule`` sections."""

from __future__ import annotations

import math

import torch


def _fused_ok(params) -> bool:
    """PyTorch's fused Adam/AdamW/SGD kernels (one pass over every tensor, on CPU and GPU)
    need floating-point tensors on one device of a supported kind."""
    devices = {p.device.type for p in params}
    return (
        bool(params)
        and devices <= {"cpu", "cuda"}
        and len(devices) == 1
        and all(
            p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params
        )
    )


def make_optimizer(config, params) -> torch.optim.Optimizer:
    params = list(params)
    common = dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.name in ("adam", "adamw", "sgd") and _fused_ok(params):
        common["fused"] = True
    if config.name == "adam":
        return torch.optim.Adam(params, betas=config.betas, eps=config.eps, amsgrad=config.amsgrad,
                                **common)  # fmt: skip
    if config.name == "adamw":
        return torch.optim.AdamW(params, betas=config.betas, eps=config.eps,
                                 amsgrad=config.amsgrad, **common)  # fmt: skip
    if config.name == "sgd":
        return torch.optim.SGD(params, momentum=config.momentum, **common)
    return torch.optim.RMSprop(params, alpha=config.alpha, eps=config.eps,
                               momentum=config.momentum, **common)  # fmt: skip


def lr_factor(config, base_lr: float, epoch: float, total_epochs: int) -> float:
    """The schedule's multiplier of the base lr at a fractional epoch."""
    warmup = config.warmup_epochs
    if warmup > 0 and epoch < warmup:
        start = config.warmup_start_factor
        return start + (1.0 - start) * epoch / warmup
    if config.name == "cosine":
        span = max(total_epochs - warmup, 1e-12)
        progress = min(max((epoch - warmup) / span, 0.0), 1.0)
        floor = min(config.min_lr / base_lr, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.name == "exponential":
        return config.gamma ** math.floor(max(epoch - warmup, 0.0))
    return 1.0


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
            if key in group:
                group[key] = getattr(config, key)
    schedule.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["lr"] = config.lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
