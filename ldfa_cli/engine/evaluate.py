"""Test-set evaluation: loss, accuracy and per-class accuracy, summed over ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import World, sum_across


@torch.no_grad()
def evaluate(model, data, batch_size: int, world: World | None = None, autocast=None) -> dict:
    world = world or World()
    was_training = model.training
    model.eval()
    classes = data.classes
    device = data.test.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(classes, dtype=torch.float64, device=device)
    count = torch.zeros(classes, dtype=torch.float64, device=device)
    for x, y in data.eval_batches(batch_size, world.rank, world.size):
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        hit = (logits.argmax(1) == y).double()
        correct.index_add_(0, y, hit)
        count.index_add_(0, y, torch.ones_like(hit))
    totals = sum_across(world, torch.cat([loss_sum[None], correct, count]))
    model.train(was_training)
    loss_sum, correct, count = totals[0], totals[1 : classes + 1], totals[classes + 1 :]
    n = count.sum().clamp_min(1)
    per_class = (correct / count.clamp_min(1)).tolist()
    return {"loss": float(loss_sum / n), "acc": float(correct.sum() / n),
            "per_class_acc": per_class, "samples": int(n)}  # fmt: skip
