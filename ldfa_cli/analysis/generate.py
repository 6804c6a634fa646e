"""Text from a trained language model: tokens drawn one at a time from its next-token
distribution (temperature, top-k), each conditioned on the last ``block_size`` tokens."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, context: torch.Tensor, tokens: int, block_size: int,
             temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """``context`` (1-D token ids) followed by ``tokens`` drawn ones; temperature 0 takes the
    likeliest token each time."""
    was_training = model.training
    model.eval()
    sequence = context.clone()
    try:
        for _ in range(tokens):
            logits = model(sequence[-block_size:][None])[0, -1].float()
            if temperature <= 0:
                chosen = logits.argmax()
            else:
                logits = logits / temperature
                if top_k is not None and top_k < len(logits):
                    floor = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < floor, -float("inf"))
                probabilities = torch.softmax(logits, dim=-1)
                chosen = torch.multinomial(probabilities, 1, generator=generator)[0]
            sequence = torch.cat([sequence, chosen.view(1)])
    finally:
        model.train(was_training)
    return sequence
