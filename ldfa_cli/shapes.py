"""What a model is built for and what a dataset yields: images (channels x size x size, a
class each) or token sequences (``size`` tokens of a ``classes``-word vocabulary, the next
token the target of each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputShape:
    channels: int  # 1 for token sequences
    size: int  # square images' side; a token sequence's length (the context)
    classes: int  # classes; the vocabulary of a token sequence
    tokens: bool = False  # token sequences: input and target both (batch, size) token ids

    def blank(self, batch: int = 2) -> torch.Tensor:
        """An input of this shape (zeros), for checking that a model takes it."""
        if self.tokens:
            return torch.zeros(batch, self.size, dtype=torch.long)
        return torch.zeros(batch, self.channels, self.size, self.size)

    def random_batch(self, batch: int, generator: torch.Generator):
        """A random (input, target) batch of this shape: for counts and timings."""
        if self.tokens:
            x = torch.randint(0, self.classes, (batch, self.size), generator=generator)
            return x, torch.randint(0, self.classes, (batch, self.size), generator=generator)
        x = torch.randn(batch, self.channels, self.size, self.size, generator=generator)
        return x, torch.randint(0, self.classes, (batch,), generator=generator)
