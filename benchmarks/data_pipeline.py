"""Images/s of ldfa's on-device batch pipeline against a torchvision DataLoader doing the
same augmentation (random crop with 4-pixel zero padding, horizontal flip, normalisation).

A benchmark, not a test. Both read real Fashion-MNIST from the IDX files:

    python benchmarks/data_pipeline.py [--root /usr/share/datasets/fashion-mnist] [--batches 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ldfa_cli.config import validate
from ldfa_cli.data import load_data
from ldfa_cli.data.sources import _flat_idx_files, _unpack_to_cache


def rate(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # warm-up (worker start-up, first allocation)
    start = time.perf_counter()
    for _ in range(count):
        x, _ = next(iterator)
        x.sum()  # touch the batch
    return count * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    args = parser.parse_args()

    config = validate({"data": {"dataset": "fashion_mnist", "root": args.root,
                                "augment": {"crop_padding": 4, "hflip": True}}})  # fmt: skip
    data = load_data(config.data, "cpu")
    ours = rate(data.train_batches(0, args.batch_size, seed=0), args.batches, args.batch_size)
    print(f"ldfa on-device pipeline:            {ours:12,.0f} images/s")

    flat = _flat_idx_files(__import__("pathlib").Path(args.root))
    root = _unpack_to_cache(flat, "FashionMNIST") if flat else args.root
    mean, std = float(data.mean.flatten()[0]), float(data.std.flatten()[0])
    augment = transforms.Compose([
        transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize((mean,), (std,)),
    ])  # fmt: skip
    dataset = datasets.FashionMNIST(str(root), train=True, transform=augment)
    for workers in args.workers:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                            num_workers=workers, persistent_workers=workers > 0)  # fmt: skip
        theirs = rate(loader, args.batches, args.batch_size)
        print(
            f"torchvision DataLoader, {workers} workers: {theirs:12,.0f} images/s "
            f"(ldfa is {ours / theirs:.1f}x)"
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
