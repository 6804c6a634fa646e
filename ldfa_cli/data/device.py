"""Datasets on the training device: one uint8 tensor per split, batches drawn by index,
augmentation (random crop with zero padding, horizontal flip) and normalisation applied to
whole batches on the device. AutoAugment, when asked for, is the one per-image step: each
image gets its own draw of torchvision's policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import resize as resize_image
from torchvision.transforms.v2.functional import rgb_to_grayscale

from ldfa_cli.errors import DataError
from ldfa_cli.shapes import InputShape

from .sources import RawDataset, Split, read_dataset


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (stable across runs and machines)."""
    value = 0x9E3779B97F4A7C15
    for n in numbers:
        value = (value ^ (n + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return value


def _select_classes(raw: RawDataset, count: int, seed: int | None) -> RawDataset:
    """A fixed, seeded subset of ``count`` classes (``seed`` None: the first ``count``
    labels, as the authors' code), relabelled 0..count-1 in label order."""
    total = len(raw.class_names)
    if count > total:
        raise DataError(f"data.classes={count} but the dataset has only {total} classes")
    if seed is None:
        chosen = torch.arange(count)
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(total, generator=generator)[:count].sort()[0]
    relabel = torch.full((total,), -1, dtype=torch.int64)
    relabel[chosen] = torch.arange(count)

    def keep(split: Split) -> Split:
        mask = relabel[split.labels] >= 0
        return Split(split.images[mask], relabel[split.labels[mask]])

    names = [raw.class_names[i] for i in chosen.tolist()]
    return RawDataset(keep(raw.train), keep(raw.test), names)


def _reshape_images(
    images: torch.Tensor, grayscale: bool, pad_to: int | None, resize: int | None = None
) -> torch.Tensor:
    if grayscale and images.shape[1] == 3:
        images = rgb_to_grayscale(images)
    if resize is not None:  # bilinear with antialiasing (BioTorch's Resize((32, 32)))
        images = resize_image(images, [resize, resize], antialias=True)
    if pad_to is not None:
        h, w = images.shape[-2:]
        if pad_to < max(h, w):
            raise DataError(f"data.pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        images = F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))
    return images.contiguous()


def per_image_transforms(rotation: float = 0.0, autoaugment: str | None = None,
                         rand_augment: str | None = None, random_erasing: float = 0.0):  # fmt: skip
    """torchvision v2 transforms drawn for each image on its own: RandomRotation(+-degrees),
    AutoAugment with the named policy (the authors' CIFAR pipelines), RandAugment (n ops of
    magnitude m from timm's ``rand-m<m>-n<n>`` string; its other fields are timm's own) and
    random erasing; None if none."""
    from torchvision.transforms import v2

    steps = []
    if rotation:
        steps.append(v2.RandomRotation(rotation))
    if autoaugment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(autoaugment)))
    if rand_augment:
        fields = dict((f[0], f[1:]) for f in rand_augment.split("-")[1:] if f[:1] in "mn")
        steps.append(v2.RandAugment(num_ops=int(fields.get("n", 2)),
                                    magnitude=int(float(fields.get("m", 9)))))  # fmt: skip
    if random_erasing:
        steps.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(steps) if steps else None


def apply_per_image(images: torch.Tensor, transform, generator: torch.Generator) -> torch.Tensor:
    """``transform`` applied to each uint8 image on its own (its own random draws: never one
    op for the whole batch), reproducibly: the global RNG torchvision draws from is seeded
    from ``generator`` inside a forked RNG state, so training's RNG is untouched."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for image in images])


def auto_augment(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """torchvision's AutoAugment (``policy``: cifar10, imagenet or svhn), per image."""
    return apply_per_image(images, per_image_transforms(autoaugment=policy), generator)


@dataclass
class DeviceData:
    """Both splits on ``device`` (:class:`~ldfa_cli.data.protocol.TrainingData`);
    ``train_batches`` and ``eval_batches`` yield normalised float batches and labels."""

    train: Split
    test: Split
    class_names: list[str]
    mean: torch.Tensor  # 1 x C x 1 x 1 (or 1 x C x H x W per pixel), images scaled to [0, 1]
    std: torch.Tensor
    crop_padding: int
    hflip: bool
    per_image: object = None  # torchvision transforms drawn per image (rotation, AutoAugment)
    val: Split | None = None  # held out of the training set (data.val_fraction), or None

    @property
    def device(self) -> torch.device:
        return self.train.images.device

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
        if self.per_image is not None:
            images = apply_per_image(images, self.per_image, generator)
        return images

    @property
    def augments(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.per_image is not None)

    def example(self, n: int = 2) -> torch.Tensor:
        """A normalised batch of training images, for probing a model's conversion."""
        return self.normalise(self.train.images[:n])

    def probe(self, n: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The first n images of a split, normalised, not augmented, with their labels."""
        part = self.train if split == "train" else self.test
        return self.normalise(part.images[:n]), part.labels[:n]

    @property
    def has_val(self) -> bool:
        return self.val is not None

    @property
    def input_shape(self) -> InputShape:
        return InputShape(self.channels, self.size, self.classes)

    def run_files(self) -> dict[str, str]:
        return {}

    def describe(self) -> str:
        """Where the data lives and what it takes, for --dry-run."""
        n = len(self.train.labels) + len(self.test.labels)
        shape = "x".join(map(str, self.train.images.shape[1:]))
        size = (self.train.images.numel() + self.test.images.numel()) / 1e6
        return (f"data: on the device ({self.device}), {n:,} images {shape} uint8 = "
                f"{size:,.1f} MB, {self.classes} classes (the built-in datasets fit; an "
                "imagefolder streams from disk)")  # fmt: skip

    def with_train_as_test(self) -> DeviceData:
        import dataclasses

        return dataclasses.replace(self, test=self.train)

    @staticmethod
    def epoch_steps(images: int, batch_size: int, world: int = 1) -> int:
        """Steps in an epoch of ``images``: every batch, the last one partial, for one
        process; whole global batches only under torchrun (each rank takes its slice)."""
        return images // batch_size if world > 1 else -(-images // batch_size)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return self.epoch_steps(len(self.train.labels), batch_size, world)

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
            if self.augments:
                generator.manual_seed(_mix(seed, epoch, step, rank))
                images = self.augment(images, generator)
            yield self.normalise(images), self.train.labels[index]

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1, split: str = "test"):
        """The test split (or the held-out ``val``) in order; rank r takes every world-th
        batch."""
        part = self.val if split == "val" else self.test
        n = len(part.labels)
        for i, start in enumerate(range(0, n, batch_size)):
            if i % world == rank:
                sl = slice(start, start + batch_size)
                yield self.normalise(part.images[sl]), part.labels[sl]


def _normalisation(images: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) that ``DeviceData.normalise`` applies to images scaled to [0, 1]: per
    channel (1 x C x 1 x 1) or per pixel (1 x C x H x W) from the training images, or the
    fixed 0.5, 0.5 (``symmetric``)."""
    if how == "symmetric":
        half = torch.full((1, images.shape[1], 1, 1), 0.5, dtype=torch.float64)
        return half, half
    scaled = images.to(torch.float64) / 255.0
    dims = (0, 2, 3) if how == "channel" else (0,)
    mean, std = scaled.mean(dim=dims, keepdim=True), scaled.std(dim=dims, keepdim=True)
    # a pixel that never varies (an MNIST corner) is centred only (scikit-learn's rule)
    return mean, torch.where(std > 1e-8, std, torch.ones_like(std))


def held_out(images: int, fraction: float) -> int:
    """How many of ``images`` training images a validation split of ``fraction`` takes: at
    least one where the fraction is above 0."""
    return 0 if fraction <= 0 else min(images - 1, max(1, round(images * fraction)))


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """(training, validation): a seeded random ``fraction`` of the images held out, each
    part in the images' own order; (split, None) for fraction 0."""
    count = held_out(len(split.labels), fraction)
    if not count:
        return split, None
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:count].sort()[0], order[count:].sort()[0]
    return (Split(split.images[train], split.labels[train]),
            Split(split.images[val], split.labels[val]))  # fmt: skip


def load_device_data(config, device: torch.device | str = "cpu") -> DeviceData:
    """Read the dataset of a recipe's ``data`` section and put it on ``device``."""
    raw = read_dataset(config.dataset, config.root, config.download)
    if config.classes is not None:
        raw = _select_classes(raw, config.classes, config.class_seed)
    shape = (config.grayscale, config.pad_to, config.resize)
    train_images = _reshape_images(raw.train.images, *shape)
    test_images = _reshape_images(raw.test.images, *shape)
    train_labels = raw.train.labels
    if config.subset is not None:
        train_images, train_labels = train_images[: config.subset], train_labels[: config.subset]
    train, val = hold_out(Split(train_images, train_labels), config.val_fraction, config.val_seed)
    mean, std = _normalisation(train.images, config.normalise)
    return DeviceData(
        train=Split(train.images.to(device), train.labels.to(device)),
        val=None if val is None else Split(val.images.to(device), val.labels.to(device)),
        test=Split(test_images.to(device), raw.test.labels.to(device)),
        class_names=raw.class_names,
        mean=mean.to(device, torch.float32),
        std=std.to(device, torch.float32),
        crop_padding=config.augment.crop_padding,
        hflip=config.augment.hflip,
        per_image=per_image_transforms(
            config.augment.rotation,
            config.augment.autoaugment,
            config.augment.rand_augment,
            config.augment.random_erasing,
        ),  # fmt: skip
    )
