"""Forward+backward time of a feedback layer against the plain layer, beside the FLOP ratio.

A benchmark, not a test. Every configuration is timed side by side in one process: the
plain layer and each rank are run in interleaved rounds after warm-up, and the median of
the rounds is reported.

    python benchmarks/layer_speed.py [--rule ldfa] [--rounds 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ldfa_cli.feedback import LDFAConv2d, LDFALinear


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(g)


def flops(layer, x, g) -> int:
    with FlopCounterMode(display=False) as counter:
        step(layer, x, g)
    return counter.get_total_flops()


def compare(label, plain, variants, x, rounds):
    """Median seconds per forward+backward of ``plain`` and each variant, interleaved."""
    x = x.requires_grad_(True)
    g = torch.randn_like(plain(x))
    layers = {"plain": plain, **variants}
    for layer in layers.values():  # warm-up
        for _ in range(3):
            step(layer, x, g)
    times = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer, x, g)
            times[name].append(time.perf_counter() - start)
    base_t, base_f = statistics.median(times["plain"]), flops(plain, x, g)
    rows = []
    for name, layer in variants.items():
        t = statistics.median(times[name])
        rows.append((label, name, f"{t * 1e3:.2f}", f"{t / base_t:.2f}",
                     f"{flops(layer, x, g) / base_f:.2f}"))  # fmt: skip
    return [(label, "plain", f"{base_t * 1e3:.2f}", "1.00", "1.00"), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="ldfa")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--conv-batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    plain = nn.Linear(512, 512)
    ranks = (8, 32, 128)
    variants = {f"{args.rule} r={r}": LDFALinear(512, 512, rule=args.rule, rank=r) for r in ranks}
    rows += compare("Linear 512->512, batch 256", plain, variants, torch.randn(256, 512),
                    args.rounds)  # fmt: skip
    plain = nn.Conv2d(128, 128, 3, padding=1)
    variants = {
        f"{args.rule} r={r}": LDFAConv2d(128, 128, 3, padding=1, rule=args.rule, rank=r)
        for r in ranks
    }
    x = torch.randn(args.conv_batch, 128, 32, 32)
    rows += compare(f"Conv 128->128 3x3, 32x32, batch {args.conv_batch}", plain, variants, x,
                    max(5, args.rounds // 3))  # fmt: skip

    table = Table(title=f"forward+backward, {torch.get_num_threads()} threads, rule {args.rule}")
    for col in ("layer", "variant", "median ms", "time / plain", "FLOPs / plain"):
        table.add_column(col, justify="left" if col in ("layer", "variant") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
