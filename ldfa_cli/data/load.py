"""A recipe's ``data`` section: the data it loads, and its shape and epoch length without
reading it (for FLOP counts and benchmarks on synthetic batches of the right shape)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldfa_cli.shapes import InputShape

from .device import DeviceData, held_out, load_device_data
from .folder import FolderData, folder_classes, load_folder
from .protocol import TrainingData
from .text import TextData, load_text, prepare, text_shape

# channels, image size, classes of each dataset as read from its files
NATIVE_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "fashion_mnist": (1, 28, 10),
                 "mnist": (1, 28, 10), "digits": (1, 8, 10)}  # fmt: skip

# training images of each dataset as read from its files (digits: the 80% train split)
NATIVE_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000,
                "mnist": 60_000, "digits": 1_438}  # fmt: skip


def load_data(config, device: torch.device | str = "cpu") -> TrainingData:
    """Read the dataset of a recipe's ``data`` section and put it on ``device`` (an image
    folder is streamed from disk instead)."""
    if config.dataset == "imagefolder":
        return load_folder(config, torch.device(device))
    if config.dataset == "text":
        return load_text(config, device)
    return load_device_data(config, device)


def dataset_shape(config) -> InputShape:
    """What a recipe's data section yields, without loading it onto the device (an image
    folder's classes and a text's vocabulary are read from disk)."""
    if config.dataset == "imagefolder":
        return InputShape(3, config.image_size, len(folder_classes(config)))
    if config.dataset == "text":
        return text_shape(config)
    channels, size, classes = NATIVE_SHAPES[config.dataset]
    if config.grayscale:
        channels = 1
    return InputShape(channels, config.pad_to or config.resize or size, config.classes or classes)


def steps_per_epoch(config, batch_size: int, world: int = 1) -> int:
    """Training steps per epoch of a recipe's data section, without reading the data, by
    the formula of the kind that will hold it."""
    if config.dataset == "text":
        windows = (len(prepare(config)[1][0]) - 1) // config.block_size
        return TextData.epoch_steps(windows, batch_size, world)
    kind = FolderData if config.dataset == "imagefolder" else DeviceData
    images = training_images(config)
    return kind.epoch_steps(images - held_out(images, config.val_fraction), batch_size, world)


def training_images(config) -> int:
    """The training images of a recipe's data section, without reading them: an image
    folder's files; else ``subset`` if given, or the native size (times d / classes for a
    class subset: exact for the balanced datasets, CIFAR and Fashion-MNIST; about right for
    MNIST)."""
    if config.dataset == "imagefolder":
        train = Path(config.root).expanduser() / "train"
        return sum(1 for c in folder_classes(config) for p in (train / c).rglob("*")
                   if p.is_file())  # fmt: skip
    images = NATIVE_SIZES[config.dataset]
    if config.classes:
        images = images * config.classes // NATIVE_SHAPES[config.dataset][2]
    if config.subset:
        images = min(images, config.subset)
    return images
