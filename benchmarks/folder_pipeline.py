"""Images/s of ldfa's image-folder pipeline (per-image seeded augmentation, a resumable
DistributedSampler) against a plain torchvision DataLoader over the same ImageFolder with
the same timm transform, workers and batch size. A benchmark, not a test:

    scripts/make-image-folder fashion_mnist /usr/share/datasets/fashion-mnist data/fmnist-folder
    python benchmarks/folder_pipeline.py --root data/fmnist-folder --workers 2 --batches 40
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from ldfa_cli.config import validate
from ldfa_cli.data import load_data


def rate(batches, count: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # warm-up (worker start-up)
    start = time.perf_counter()
    for _ in range(count):
        x, _ = next(iterator)
        x.sum()
    return count * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/fmnist-folder")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = validate({"data": {"dataset": "imagefolder", "root": args.root,
                                "image_size": args.image_size, "workers": args.workers,
                                "augment": {"hflip": True, "rand_augment": "rand-m9-mstd0.5-inc1",
                                            "random_erasing": 0.25}}}).data  # fmt: skip
    data = load_data(config)
    ours = rate(data.train_batches(0, args.batch_size, seed=0), args.batches, args.batch_size)
    plain = DataLoader(data.train_set, batch_size=args.batch_size, shuffle=True,
                       num_workers=args.workers, drop_last=True,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    theirs = rate(plain, args.batches, args.batch_size)
    print(
        f"ldfa image-folder pipeline: {ours:,.0f} images/s; plain DataLoader with the same "
        f"transform: {theirs:,.0f} images/s ({ours / theirs:.2f}x), {args.workers} workers, "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}"
    )


if __name__ == "__main__":
    main()
