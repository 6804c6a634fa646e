"""Whole eager training steps at r = 8 (1 thread) on two paths of one piece of the step,
interleaved rounds of 5 steps, the median per step. Pause other work on the machine first.

``oja``: ``ldfa_local``'s Oja update (eq. 15) finished after the backward, as the training
step does (batched over layers of one P shape, :mod:`ldfa_cli.feedback.deferred`), against
finished in each layer's backward.
``eq9``: ``ldfa``'s eq. 9 batched over layers of one shape (stacked copies of W, Q, P)
against layer by layer, whatever the layers' size.

    python benchmarks/step_paths.py oja fmnist_vit_r16 128      # path, recipe, batch
    python benchmarks/step_paths.py eq9 kjv_gpt_ldfa_r32 32
    python benchmarks/step_paths.py eq9 fmnist_mlp_ldfa_r10 256 'model.widths=[2048,2048,2048]'
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ldfa_cli.analysis import bench
from ldfa_cli.config import load_recipe
from ldfa_cli.feedback import deferred, normative

ROUNDS, STEPS = 6, 5

# (rule, the module and function that choose the path, the two paths' choices)
PATHS = {
    "oja": ("ldfa_local", deferred, "active",
            {"after the backward": deferred.active, "in the backward": lambda: False}),
    "eq9": ("ldfa", normative, "_worth_batching",
            {"batched": lambda layer: True, "layer by layer": lambda layer: False}),
}  # fmt: skip


def main(path: str, recipe: str, batch: str, *overrides: str) -> None:
    rule, module, name, choices = PATHS[path]
    torch.set_num_threads(1)
    config, _ = load_recipe(recipe, [f"feedback.rule={rule}", "feedback.options={}", *overrides])
    variant = bench.build_variants(config, [8], int(batch), torch.device("cpu"))[1]
    original = getattr(module, name)
    times: dict[str, list[float]] = {label: [] for label in choices}
    for _ in range(3):
        variant.step()
    try:
        for _ in range(ROUNDS):
            for label, choice in choices.items():
                setattr(module, name, choice)
                start = time.perf_counter()
                for _ in range(STEPS):
                    variant.step()
                times[label].append((time.perf_counter() - start) / STEPS * 1e3)
    finally:
        setattr(module, name, original)
    for label, values in times.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"{recipe}, batch {batch}, {label}: {statistics.median(values):.2f} ms ({spread})")


if __name__ == "__main__":
    main(*sys.argv[1:])
