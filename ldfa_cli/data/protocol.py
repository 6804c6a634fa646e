"""What the engine asks of a dataset, whichever kind holds it: ``DeviceData`` (the whole
dataset on the training device, ``device.py``) and ``FolderData`` (image folders streamed
from disk by DataLoader workers, ``folder.py``) both implement it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ldfa_cli.shapes import InputShape

Batch = tuple[torch.Tensor, torch.Tensor]  # normalised images, labels (on the device)


class TrainingData(Protocol):
    class_names: list[str]
    channels: int
    size: int  # square images, size x size

    @property
    def classes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def input_shape(self) -> InputShape:
        """What a model for this data is built for."""
        ...

    @property
    def has_val(self) -> bool:
        """Whether images were held out of the training set (``data.val_fraction``)."""
        ...

    @staticmethod
    def epoch_steps(images: int, batch_size: int, world: int = 1) -> int:
        """Steps in an epoch of ``images`` at the global ``batch_size`` over ``world``
        ranks: the one formula for the data itself and for a recipe not yet read."""
        ...

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int: ...

    def train_batches(self, epoch: int, batch_size: int, seed: int, rank: int = 0,
                      world: int = 1, start: int = 0) -> Iterator[Batch]:  # fmt: skip
        """The epoch's batches from batch ``start`` on, this rank's share of each global
        batch, in an order and with augmentations fixed by (seed, epoch, batch)."""
        ...

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1,
                     split: str = "test") -> Iterator[Batch]:  # fmt: skip
        """The test split (``val``: the images held out of training), this rank's share."""
        ...

    def example(self, n: int = 2) -> torch.Tensor:
        """A normalised batch of n images, for probing a model's conversion."""
        ...

    def probe(self, n: int, split: str = "train") -> Batch:
        """The first n images of a split as evaluation sees them, with their labels."""
        ...

    def run_files(self) -> dict[str, str]:
        """Files a run's folder keeps beside its config: name -> text (a tokenizer)."""
        ...

    def describe(self) -> str:
        """Where the data lives and what it takes, for --dry-run."""
        ...

    def with_train_as_test(self) -> TrainingData:
        """The same data evaluating on the training images."""
        ...
