"""ATen ops dispatched by one eager training step (after 3 warm-up steps) under backprop
and under lowrank_fa, ldfa and ldfa_local at one rank, counted as ``ldfa bench`` counts
them (forward, backward with the rules' work, both optimizers), and the difference per
converted layer. ``ldfa`` is counted three times: by default on this CPU (eq. 9 batched
over layers of one shape where W has at most 2^16 elements), on an accelerator's path
(``batched: true``, every shape) and layer by layer (``batched: false``).
Deterministic: it needs no idle machine.

    python benchmarks/dispatches.py fmnist_mlp_ldfa_r10 8 32    # recipe, rank, batch
    python benchmarks/dispatches.py fmnist_vit_r16 8 8
    python benchmarks/dispatches.py vit_cifar10_r24 16 2 \
        'model={name: timm, architecture: vit_small_patch16_224}' data.resize=224  # overrides
"""

from __future__ import annotations

import sys

import torch

from ldfa_cli.analysis import bench
from ldfa_cli.config import load_recipe

# (rule, its options, what the row is called)
RULES = (("lowrank_fa", "{}", ""), ("ldfa", "{}", " (default on this CPU)"),
         ("ldfa", "{batched: true}", " (batched: true, an accelerator's default)"),
         ("ldfa", "{batched: false}", " (batched: false, layer by layer)"),
         ("ldfa_local", "{}", ""))  # fmt: skip


def dispatch_counts(recipe: str, rule: str, options: str, rank: int, batch: int,
                    overrides: list[str]):  # fmt: skip
    """({variant label: ATen ops per step}, converted layers) for backprop and ``rule``."""
    config, _ = load_recipe(recipe, [*overrides, f"feedback.rule={rule}",
                                     f"feedback.options={options}"])  # fmt: skip
    return bench.step_dispatches(config, rank, batch, torch.device("cpu"))


def main(recipe: str, rank: str, batch: str, *overrides: str) -> None:
    for index, (rule, options, note) in enumerate(RULES):
        counts, layers = dispatch_counts(recipe, rule, options, int(rank), int(batch),
                                         list(overrides))  # fmt: skip
        bp = counts.pop("bp")
        if index == 0:
            print(f"{recipe}, batch {batch}: bp {bp:.0f}")
        ((label, ops),) = counts.items()
        print(f"  {label}{note}: {ops:.0f} ({ops / bp:.2f}x, {(ops - bp) / layers:+.1f} per layer, "
              f"{layers} converted layers)")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
