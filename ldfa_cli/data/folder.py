"""Image folders streamed from disk: torchvision's ``ImageFolder`` layout (``train/`` and
``val/`` under ``data.root``, one folder per class), a class-list file (ImageNet-100) and
Tiny-ImageNet's layout (``val/images`` with ``val/val_annotations.txt``).

Worker processes decode and augment (timm's ``create_transform``: RandomResizedCrop, flip,
RandAugment/AutoAugment, random erasing, normalisation; resize + centre crop for
evaluation), with pinned memory, persistent workers and prefetching; under torchrun a
``DistributedSampler`` gives each rank its share. Every image's random augmentation is drawn
under a seed made of (run seed, epoch, image index), so it does not depend on which worker
loads it or where a run resumed: a resumed run draws the very batches an uninterrupted one
does. An unreadable image stops the run with its path (a corrupt file in a dataset is a
problem to fix, not to train around).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    Subset,
    get_worker_info,
)
from torchvision import datasets

from ldfa_cli.errors import DataError
from ldfa_cli.shapes import InputShape

from .device import _mix, held_out

BAD_IMAGE = "ldfa-unreadable-image:"  # a worker's error, turned into one line here


def _load_image(path: str):
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except Exception as error:  # PIL raises several kinds for a broken file
        raise DataError(f"{BAD_IMAGE}{path}:{type(error).__name__}") from None


def _classes_of(folder: Path, class_list: list[str] | None) -> list[str]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if class_list is None:
        return found
    missing = [c for c in class_list if c not in found]
    if missing:
        raise DataError(f"data.class_list names {missing[0]!r}, which is not a folder in "
                        f"{folder} ({len(missing)} missing); fix the list or the tree")  # fmt: skip
    return list(class_list)


class _Folder(datasets.ImageFolder):
    """ImageFolder restricted to ``classes`` (in that order), with the path-naming loader."""

    def __init__(self, root: Path, classes: list[str], transform):
        self._chosen = classes
        super().__init__(str(root), transform=transform, loader=_load_image)

    def find_classes(self, directory):
        return self._chosen, {c: i for i, c in enumerate(self._chosen)}


class _TinyImageNetVal(Dataset):
    """Tiny-ImageNet's validation split: ``val/images/*`` labelled by
    ``val/val_annotations.txt`` (file, class, box)."""

    def __init__(self, root: Path, classes: list[str], transform):
        index = {c: i for i, c in enumerate(classes)}
        self.samples = []
        for line in (root / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in index:
                self.samples.append((str(root / "images" / parts[0]), index[parts[1]]))
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return self.transform(_load_image(path)), target


class SeededSamples(Dataset):
    """``dataset[i]`` for a sampler item (i, epoch), drawn under an RNG seeded from
    (seed, epoch, i) in every library timm and torchvision draw from."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch = item
        seed = _mix(self.seed, epoch, index)
        if get_worker_info() is not None:  # a worker's RNGs serve only its own images
            _seed_all(seed)
            return self.dataset[index]
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        _seed_all(seed)
        try:
            return self.dataset[index]
        finally:  # in the main process the training loop's streams go on undisturbed
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


def _seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's CPU generator (not torch.manual_seed, which also
    visits every accelerator's generators: 0.4 ms an image, more than decoding one)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)


class ResumableSampler(Sampler):
    """(index, epoch) items of this rank's share of the epoch (``DistributedSampler``'s
    permutation of (seed, epoch)), from sample ``start`` on."""

    def __init__(self, size: int, seed: int, rank: int, world: int):
        self.inner = DistributedSampler(range(size), num_replicas=world, rank=rank,
                                        shuffle=True, seed=seed, drop_last=True)  # fmt: skip
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.inner)[self.start :]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return len(self.inner) - self.start


@dataclass
class FolderData:
    """The streamed train and val splits (:class:`~ldfa_cli.data.protocol.TrainingData`)."""

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]
    size: int
    channels: int
    workers: int
    pin_memory: bool
    device: torch.device
    mixup: object = None
    holdout_set: Dataset | None = None  # held out of train/ (data.val_fraction), or None

    @property
    def has_val(self) -> bool:
        return self.holdout_set is not None

    @property
    def input_shape(self) -> InputShape:
        return InputShape(self.channels, self.size, self.classes)

    def run_files(self) -> dict[str, str]:
        return {}

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @staticmethod
    def epoch_steps(images: int, batch_size: int, world: int = 1) -> int:
        """Whole batches only: each rank takes batch_size // world images a step from its
        share of the epoch (DistributedSampler's, the last incomplete batch dropped)."""
        return images // world // max(batch_size // world, 1)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return self.epoch_steps(len(self.train_set), batch_size, world)

    def _loader(self, dataset, batch: int, sampler, persistent: bool) -> DataLoader:
        workers = self.workers
        return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                          pin_memory=self.pin_memory, drop_last=False,
                          persistent_workers=persistent and workers > 0,
                          prefetch_factor=4 if workers > 0 else None)  # fmt: skip

    def train_batches(self, epoch, batch_size, seed, rank=0, world=1, start=0):
        """Batches from batch ``start`` of the epoch on; ``batch_size`` is global."""
        local = max(batch_size // world, 1)
        key = (seed, rank, world, local)
        if getattr(self, "_train_key", None) != key:  # one loader (and its workers) a run
            self._train_key = key
            self._sampler = ResumableSampler(len(self.train_set), seed, rank, world)
            self._train_loader = self._loader(SeededSamples(self.train_set, seed), local,
                                              self._sampler, persistent=True)  # fmt: skip
        self._sampler.set_epoch(epoch, start * local)
        steps = self.steps_per_epoch(batch_size, world)
        for step, (x, y) in enumerate(_named_errors(self._train_loader), start=start):
            if step >= steps:
                break
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield x, y

    def eval_batches(self, batch_size: int, rank: int = 0, world: int = 1, split: str = "test"):
        """The val/ folder (the test split's role), or the images held out of train/."""
        dataset = self.holdout_set if split == "val" else self.val_set
        indices = list(range(rank, len(dataset), world))
        loader = self._loader(dataset, batch_size, indices, persistent=False)
        for x, y in _named_errors(loader):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.probe(n, split="val")[0]

    def probe(self, n: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """The first n images of a split as evaluation sees them (no augmentation)."""
        dataset = self.val_set if split == "val" else _eval_view(self.train_set, self.val_set)
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        x = torch.stack([t for t, _ in items]).to(self.device)
        return x, torch.tensor([c for _, c in items], device=self.device)

    def describe(self) -> str:
        """Where the data lives and what it would take on the device, for --dry-run."""
        n = len(self.train_set) + len(self.val_set)
        on_device = n * self.channels * self.size * self.size / 1e9
        return (f"data: streamed from disk by {self.workers} worker(s), {len(self.train_set):,} "
                f"training and {len(self.val_set):,} val images, {self.classes} classes, "
                f"{self.size}x{self.size} (held on the device as uint8 they would take "
                f"{on_device:,.2f} GB)")  # fmt: skip

    def with_train_as_test(self) -> FolderData:
        import dataclasses

        return dataclasses.replace(self, val_set=_eval_view(self.train_set, self.val_set))


def _eval_view(train_set, val_set):
    """The training images through the evaluation transform."""
    import copy

    if isinstance(train_set, Subset):
        return Subset(_eval_view(train_set.dataset, val_set), train_set.indices)
    view = copy.copy(train_set)
    view.transform = val_set.transform
    return view


def _named_errors(loader):
    """Iterate a loader; a worker's unreadable-image error becomes one line naming it."""
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except DataError as error:
            text = str(error)
            if BAD_IMAGE not in text:
                raise
            path, _, kind = text.split(BAD_IMAGE, 1)[1].splitlines()[0].rpartition(":")
            raise DataError(f"{path} is not a readable image ({kind}): remove or replace the "
                            "file, then --resume the run") from None  # fmt: skip


def folder_classes(config) -> list[str]:
    """The class names of an image-folder recipe, checking the tree's layout (one line
    naming the problem, before anything is written)."""
    root = Path(config.root).expanduser()
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir():
            raise DataError(f"data.root {root} has no {split.name}/ folder: an image folder "
                            "holds train/<class>/*.jpg and val/<class>/*.jpg (or Tiny-"
                            "ImageNet's val/images with val_annotations.txt)")  # fmt: skip
    class_list = None
    if config.class_list:
        path = Path(config.class_list).expanduser()
        if not path.is_file():
            raise DataError(f"data.class_list {path} is not a file (one class folder per line)")
        class_list = [c.strip() for c in path.read_text().splitlines() if c.strip()]
    classes = _classes_of(train, class_list)
    if not classes:
        raise DataError(f"{train} holds no class folders")
    tiny = (val / "val_annotations.txt").is_file()
    if not tiny:
        val_classes = set(_classes_of(val, None))
        missing = [c for c in classes if c not in val_classes]
        if missing:
            raise DataError(f"classes differ between train/ and val/: {missing[0]!r} is in "
                            f"{train} but not in {val} ({len(missing)} missing)")  # fmt: skip
    for c in classes:
        if not any(p.is_file() for p in (train / c).rglob("*")):
            raise DataError(f"class folder {train / c} is empty; remove it or add its images")
    return classes


def load_folder(config, device: torch.device) -> FolderData:
    from timm.data import create_transform

    classes = folder_classes(config)
    root = Path(config.root).expanduser()
    aug = config.augment
    train_tf = create_transform(
        config.image_size, is_training=True, hflip=0.5 if aug.hflip else 0.0,
        auto_augment=aug.rand_augment, re_prob=aug.random_erasing,
        interpolation="bicubic", color_jitter=0.0,
    )  # fmt: skip
    eval_tf = create_transform(config.image_size, is_training=False, interpolation="bicubic",
                               crop_pct=config.crop_pct)  # fmt: skip
    train_set = _Folder(root / "train", classes, train_tf)
    if (root / "val" / "val_annotations.txt").is_file():
        val_set = _TinyImageNetVal(root / "val", classes, eval_tf)
    else:
        val_set = _Folder(root / "val", classes, eval_tf)
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    holdout = None
    if count := held_out(len(train_set), config.val_fraction):
        generator = torch.Generator().manual_seed(config.val_seed)
        order = torch.randperm(len(train_set), generator=generator)
        holdout = Subset(_eval_view(train_set, val_set), order[:count].sort()[0].tolist())
        train_set = Subset(train_set, order[count:].sort()[0].tolist())
    return FolderData(train_set, val_set, classes, config.image_size, 3, workers,
                      device.type == "cuda", device, holdout_set=holdout)  # fmt: skip
