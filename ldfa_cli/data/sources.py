"""Read each dataset into uint8 tensors (N, C, H, W) with int64 labels, through
torchvision's dataset classes and file formats where they exist."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from ldfa_cli.errors import DataError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N


@dataclass
class RawDataset:
    train: Split
    test: Split
    class_names: list[str]


# --------------------------------------------------------------------------- CIFAR
class _Cifar10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader; present files are trusted without their md5 (so
    small files in the real pickle format load), a missing set is downloaded."""

    def _check_integrity(self) -> bool:
        files = [*self.train_list, *self.test_list]
        return all((Path(self.root) / self.base_folder / name).is_file() for name, _ in files)

    def _load_meta(self) -> None:  # torchvision's also checks the meta file's md5
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as handle:
            self.classes = pickle.load(handle, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _Cifar100(datasets.CIFAR100, _Cifar10):
    pass


CIFAR_SOURCES = {
    "cifar10": (_Cifar10, "CIFAR-10", "cifar-10-batches-py"),
    "cifar100": (_Cifar100, "CIFAR-100", "cifar-100-python"),
}


def _cifar(name: str, root: Path, download: bool) -> RawDataset:
    cls, label, folder = CIFAR_SOURCES[name]
    try:
        splits = [cls(str(root), train=t, download=download) for t in (True, False)]
    except Exception as error:
        if (root / folder).is_dir():
            raise DataError(
                f"{label} in {root / folder} could not be read ({type(error).__name__}: "
                f"{error}); it must hold CIFAR's python pickles (data_batch_*, test_batch, "
                "batches.meta / meta): replace the folder with a fresh extract"
            ) from None
        how = "download failed" if download else "data.download is false"
        raise DataError(
            f"{label} is not in {root / folder} and {how} ({type(error).__name__}): on a machine "
            f"with internet fetch {cls.url}, extract it into {root} (giving {root / folder}), "
            "or set data.root to where it is"
        ) from None

    def split(ds) -> Split:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64))

    return RawDataset(split(splits[0]), split(splits[1]), list(splits[0].classes))


# ---------------------------------------------------------------- MNIST, Fashion-MNIST
def _flat_idx_files(root: Path) -> dict[str, Path] | None:
    """The four IDX files directly in ``root``, gzipped or not (Debian's layout)."""
    found = {}
    for name in IDX_FILES:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    return found if len(found) == len(IDX_FILES) else None


def _unpack_to_cache(files: dict[str, Path], folder: str) -> Path:
    """Copy (un-gzipping) the IDX files into torchvision's layout under a cache folder."""
    cache = Path(os.environ.get("LDFA_CACHE", Path.home() / ".cache" / "ldfa"))
    raw = cache / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = raw / name
        if target.is_file():
            continue
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, tempfile.NamedTemporaryFile(dir=raw, delete=False) as tmp:
            shutil.copyfileobj(src, tmp)
        os.replace(tmp.name, target)
    return cache


def _mnist_like(name: str, root: Path, download: bool) -> RawDataset:
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    flat = _flat_idx_files(root)
    tv_root = _unpack_to_cache(flat, cls.__name__) if flat else root
    try:
        splits = [cls(str(tv_root), train=t, download=download) for t in (True, False)]
    except Exception as error:
        how = "download failed" if download else "data.download is false"
        hint = (
            " (Debian: apt-get install dataset-fashion-mnist, then "
            "data.root=/usr/share/datasets/fashion-mnist)"
            if name == "fashion_mnist"
            else ""
        )
        raise DataError(
            f"{cls.__name__} IDX files ({', '.join(f + '[.gz]' for f in IDX_FILES)}) are not in "
            f"{root} nor {root / cls.__name__ / 'raw'}, and {how} ({type(error).__name__}): "
            f"put them there or point data.root at them{hint}"
        ) from None

    def split(ds) -> Split:
        return Split(ds.data[:, None].contiguous(), ds.targets.to(torch.int64))

    return RawDataset(split(splits[0]), split(splits[1]), list(splits[0].classes))


# -------------------------------------------------------------------------- digits
def _digits(test_fraction: float = 0.2, seed: int = 0) -> RawDataset:
    """scikit-learn's 8x8 digits (offline), 0..16 scaled to 0..255, a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.clip(np.round(digits.images * 255.0 / 16.0), 0, 255))
    images = images.to(torch.uint8)[:, None]
    labels = torch.from_numpy(digits.target).to(torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return RawDataset(
        Split(images[train], labels[train]),
        Split(images[test], labels[test]),
        [str(d) for d in range(10)],
    )


def read_dataset(name: str, root: str, download: bool) -> RawDataset:
    if name == "digits":
        return _digits()
    if name in CIFAR_SOURCES:
        return _cifar(name, Path(root).expanduser(), download)
    return _mnist_like(name, Path(root).expanduser(), download)
