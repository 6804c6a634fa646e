"""Evaluation of the test set (or the held-out validation set, or the training set): loss,
top-1 (``acc``) and top-5 accuracy, per-class accuracy, summed over ranks; for a language
model every token's prediction, with bits per token (``bpc``) and perplexity (``ppl``). The
``score`` (accuracy, or minus the loss of a language model) is what best.pt is chosen on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .distributed import World, sum_across


@torch.no_grad()
def evaluate(model, data, batch_size: int, world: World | None = None, autocast=None,
             split: str = "test") -> dict:  # fmt: skip
    world = world or World()
    was_training = model.training
    model.eval()
    classes = data.classes
    device = data.device
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-5 hits
    correct = torch.zeros(classes, dtype=torch.float64, device=device)
    count = torch.zeros(classes, dtype=torch.float64, device=device)
    k = min(5, classes)
    sequences = False
    for x, y in data.eval_batches(batch_size, world.rank, world.size, split=split):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = model(x)
        if logits.dim() == 3:  # a language model: every token is a prediction
            logits, y = logits.flatten(0, 1), y.flatten()
            sequences = True
        loss_sum[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        loss_sum[1] += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()
        hit = (logits.argmax(1) == y).double()
        correct.index_add_(0, y, hit)
        count.index_add_(0, y, torch.ones_like(hit))
    totals = sum_across(world, torch.cat([loss_sum, correct, count]))
    model.train(was_training)
    loss_sum, top5 = totals[0], totals[1]
    correct, count = totals[2 : classes + 2], totals[classes + 2 :]
    n = count.sum().clamp_min(1)
    per_class = (correct / count.clamp_min(1)).tolist()
    loss = float(loss_sum / n)
    result = {"loss": loss, "acc": float(correct.sum() / n), "top5": float(top5 / n),
              "per_class_acc": per_class, "samples": int(n)}  # fmt: skip
    if sequences:  # bits per token (a character or a byte) and perplexity; lower is better
        result.update(bpc=loss / math.log(2), ppl=math.exp(min(loss, 700.0)), score=-loss)
    else:
        result["score"] = result["acc"]  # what best.pt is chosen on: higher is better
    return result
