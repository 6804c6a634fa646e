"""Whole eager training steps of ``ldfa_local`` at r = 8 (1 thread), with Oja's update
(eq. 15) finished after the backward as the training step does (batched over layers of one
P shape, :mod:`ldfa_cli.feedback.deferred`) against finished in each layer's backward:
interleaved rounds of 5 steps, the median per step. Pause other work on the machine first.

    python benchmarks/oja_after_backward.py fmnist_vit_r16 128      # recipe, batch
    python benchmarks/oja_after_backward.py fmnist_mlp_ldfa_r10 256
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ldfa_cli.analysis import bench
from ldfa_cli.config import load_recipe
from ldfa_cli.feedback import deferred

ROUNDS, STEPS = 6, 5


def main(recipe: str, batch: str) -> None:
    torch.set_num_threads(1)
    config, _ = load_recipe(recipe, ["feedback.rule=ldfa_local", "feedback.options={}"])
    variant = bench.build_variants(config, [8], int(batch), torch.device("cpu"))[1]
    keeps = deferred.active
    paths = {"after the backward": keeps, "in the backward": lambda: False}
    times: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(3):
        variant.step()
    try:
        for _ in range(ROUNDS):
            for label, active in paths.items():
                deferred.active = active  # what the layers' backward asks
                start = time.perf_counter()
                for _ in range(STEPS):
                    variant.step()
                times[label].append((time.perf_counter() - start) / STEPS * 1e3)
    finally:
        deferred.active = keeps
    for label, values in times.items():
        spread = ", ".join(f"{v:.1f}" for v in values)
        print(f"{recipe}, batch {batch}, {label}: {statistics.median(values):.2f} ms ({spread})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
