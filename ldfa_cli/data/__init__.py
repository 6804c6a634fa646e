"""Datasets on the training device: one uint8 tensor per split, batches drawn by index,
augmentation (random crop with zero padding, horizontal flip) and normalisation applied to
whole batches on the device. No per-image Python work in the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import rgb_to_grayscale

from ldfa_cli.errors import DataError

from .sources import RawDataset, Split, read_dataset


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (stable across runs and machines)."""
    value = 0x9E3779B97F4A7C15
    for n in numbers:
        value = (value ^ (n + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return value


def _select_classes(raw: RawDataset, count: int, seed: int) -> RawDataset:
    """A fixed, seeded subset of ``count`` classes, relabelled 0..count-1 in label order."""
    total = len(raw.class_names)
    if count > total:
        raise DataError(f"data.classes={count} but the dataset has only {total} classes")
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort()[0]
    relabel = torch.full((total,), -1, dtype=torch.int64)
    relabel[chosen] = torch.arange(count)

    def keep(split: Split) -> Split:
        mask = relabel[split.labels] >= 0
        return Split(split.images[mask], relabel[split.labels[mask]])

    names = [raw.class_names[i] for i in chosen.tolist()]
    return RawDataset(keep(raw.train), keep(raw.test), names)


def _reshape_images(images: torch.Tensor, grayscale: bool, pad_to: int | None) -> torch.Tensor:
    if grayscale and images.shape[1] == 3:
        images = rgb_to_grayscale(images)
    if pad_to is not None:
        h, w = images.shape[-2:]
        if pad_to < max(h, w):
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        images = F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))
    return images.contiguous()


@dataclass
class DeviceData:
    """Both splits on ``device``; ``train_batches`` and ``eval_batches`` yield normalised
    float batches and labels."""

    train: Split
    test: Split
    class_names: list[str]
    mean: torch.Tensor  # 1 x C x 1 x 1, of the training images scaled to [0, 1]
    std: torch.Tensor
    crop_padding: int
    hflip: bool

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop after zero padding and random horizontal flip, per image, batch-wise."""
        n, _, h, w = images.shape
        device = images.device
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(images, (p, p, p, p)).permute(0, 2, 3, 1)  # N x H' x W' x C
            dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=device)
            dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator, device=device)
            rows = dy + torch.arange(h, device=device)[None, :, None]
            cols = dx + torch.arange(w, device=device)[None, None, :]
            batch = torch.arange(n, device=device)[:, None, None]
            images = padded[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        n = len(self.train.labels)
        return n // batch_size if world > 1 else -(-n // batch_size)

    def train_batches(
        self, epoch: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0
    ):
        """The epoch's batches from batch ``start`` on. The order depends on (seed, epoch)
        and each batch's augmentation on (seed, epoch, batch) only, so a resumed run sees
        exactly the data an uninterrupted one would. ``batch_size`` is global: rank r takes
        its slice of every global batch, so the ranks together see the single-process batch.
        With several ranks an incomplete last batch is dropped."""
        device = self.train.images.device
        generator = torch.Generator(device=device).manual_seed(_mix(seed, epoch))
        order = torch.randperm(len(self.train.labels), generator=generator, device=device)
        for step in range(start, self.steps_per_epoch(batch_size, world)):
            index = order[step * batch_size : (step + 1) * batch_size]
            if world > 1:
                index = index.tensor_split(world)[rank]
            images = self.train.images[index]
            if self.crop_padding or self.hflip:
                generator.manual_seed(_mix(seed, epoch, step, rank))
                images = self.augment(images, generator)
            yield self.normalise(images), self.train.labels[index]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1):
        """The test split in order; rank r takes every world-th batch."""
        n = len(self.test.labels)
        for i, start in enumerate(range(0, n, batch_size)):
            if i % world == rank:
                sl = slice(start, start + batch_size)
                yield self.normalise(self.test.images[sl]), self.test.labels[sl]


# channels, image size, classes of each dataset as read from its files
NATIVE_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "fashion_mnist": (1, 28, 10),
                 "mnist": (1, 28, 10), "digits": (1, 8, 10)}  # fmt: skip


def dataset_shape(config) -> tuple[int, int, int]:
    """(channels, size, classes) a recipe's data section yields, without reading the data:
    for FLOP counts and benchmarks on synthetic batches of the right shape."""
    channels, size, classes = NATIVE_SHAPES[config.dataset]
    if config.grayscale:
        channels = 1
    return channels, config.pad_to or size, config.classes or classes


def load_data(config, device: torch.device | str = "cpu") -> DeviceData:
    """Read the dataset of a recipe's ``data`` section and put it on ``device``."""
    raw = read_dataset(config.dataset, config.root, config.download)
    if config.classes is not None:
        raw = _select_classes(raw, config.classes, config.class_seed)
    train_images = _reshape_images(raw.train.images, config.grayscale, config.pad_to)
    test_images = _reshape_images(raw.test.images, config.grayscale, config.pad_to)
    train_labels = raw.train.labels
    if config.subset is not None:
        train_images, train_labels = train_images[: config.subset], train_labels[: config.subset]
    scaled = train_images.to(torch.float64) / 255.0
    mean = scaled.mean(dim=(0, 2, 3), keepdim=True)
    std = scaled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return DeviceData(
        train=Split(train_images.to(device), train_labels.to(device)),
        test=Split(test_images.to(device), raw.test.labels.to(device)),
        class_names=raw.class_names,
        mean=mean.to(device, torch.float32),
        std=std.to(device, torch.float32),
        crop_padding=config.augment.crop_padding,
        hflip=config.augment.hflip,
    )


__all__ = ["DeviceData", "dataset_shape", "load_data", "read_dataset"]
