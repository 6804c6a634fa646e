"""Issue 32's dispatch targets on the tiny ViT of ``fmnist_vit_r16`` (r = 8): ATen ops of one
eager training step, after warm-up, counted as ``ldfa bench`` counts them, against
backprop's. Counts, not timings: they do not depend on the machine's load."""

import pytest
import torch

from ldfa_cli.analysis import bench
from ldfa_cli.config import load_recipe

# rule -> the most dispatches per step it may take, as a multiple of backprop's
TARGETS = {"lowrank_fa": 1.10, "ldfa": 1.25, "ldfa_local": 1.40}


@pytest.mark.parametrize("rule", sorted(TARGETS))
def test_the_tiny_vit_step_dispatches_within_the_target(rule):
    config, _ = load_recipe("fmnist_vit_r16", [f"feedback.rule={rule}", "feedback.options={}"])
    counts, _ = bench.step_dispatches(config, 8, 4, torch.device("cpu"))
    bp = counts.pop("bp")
    ((label, ops),) = counts.items()
    assert ops <= TARGETS[rule] * bp, f"{label}: {ops} dispatches against backprop's {bp}"
