"""The DeiT-style regularisers, from timm: Mixup/CutMix with soft targets, the loss and
accuracy that take them, an EMA of the weights, and weight decay only where it belongs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_mixup(augment, classes: int, label_smoothing: float):
    """timm's Mixup (per batch: Mixup or CutMix, targets smoothed), or None when off."""
    if not (augment.mixup or augment.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                 label_smoothing=label_smoothing, num_classes=classes)  # fmt: skip


def mix_batch(mixer, x: torch.Tensor, y: torch.Tensor, seed: int):
    """(mixed x, soft targets): timm draws from numpy's global RNG, seeded here from the
    step so that a resumed run mixes as an uninterrupted one (the state is restored)."""
    if mixer is None:
        return x, y
    state = np.random.get_state()
    np.random.seed(seed % (1 << 32))
    try:
        if len(y) % 2:  # timm mixes a batch with its flip and wants it even: smooth only
            off = mixer.label_smoothing / mixer.num_classes
            rows = F.one_hot(y, mixer.num_classes).to(x.dtype)
            return x, rows * (1.0 - mixer.label_smoothing) + off
        return mixer(x.clone(), y)  # (timm mixes in place)
    finally:
        np.random.set_state(state)


def task_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float):
    """Cross-entropy with class indices (label smoothing) or soft target rows (Mixup); for a
    language model's (batch, length, vocabulary) logits, the mean over every token."""
    if logits.dim() == 3:  # next-token prediction: every position is a prediction
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                               label_smoothing=label_smoothing)  # fmt: skip
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def plain_task_loss(logits: torch.Tensor, targets: torch.Tensor):
    """The task loss without label smoothing: what the diagnostics differentiate."""
    return task_loss(logits, targets, 0.0)


def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions (every token of a sequence one); a soft target's class is its
    largest entry."""
    if logits.dim() == 3:
        return (logits.argmax(-1) == targets).sum()
    labels = targets.argmax(1) if targets.dim() == 2 else targets
    return (logits.argmax(1) == labels).sum()


def predictions(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many predictions a batch makes: its examples, or every token of a sequence."""
    return targets.numel() if logits.dim() == 3 else len(targets)


def make_ema(model: nn.Module, decay: float | None):
    """timm's ModelEmaV3 of the model (the feedback tensors averaged too), or None. Its
    update at step s: ema = d ema + (1 - d) w, with d = 0 at the first step (a copy)."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def parameter_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float,
                     exclude: bool) -> list:  # fmt: skip
    """``params`` as they are, or (``exclude``) in timm's two groups: no weight decay on
    biases, norms and 1-d tensors and on what the model lists in ``no_weight_decay()``
    (a ViT's pos_embed and cls_token); the decay on the rest."""
    if not exclude:
        return params
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    wanted = {id(p) for p in params}
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip):
        chosen = [p for p in group["params"] if id(p) in wanted]
        if chosen:
            groups.append({"params": chosen, "weight_decay": group["weight_decay"],
                           "no_decay": group["weight_decay"] == 0.0})  # fmt: skip
    return groups
