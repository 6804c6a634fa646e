"""Eq. 9's update (the normative rule's Q.grad and P.grad) layer by layer against batched
over layers of one shape, on a recipe's model: median time of each, and how far apart
their gradients are.

A benchmark, not a test. The two paths take turns for ``--rounds`` rounds after warm-up;
CUDA events on a GPU, perf_counter elsewhere. Here W stays in the CPU's cache from one call
to the next, as it does not inside a training step: on a CPU this favours the batched path
(its copies of W), so ``normative_update``'s default there (batched for weights of at most
2^16 elements, layer by layer above) was chosen from whole steps instead
(``benchmarks/step_paths.py eq9``). On a GPU, where the default is batched, the update's
time here is what the step saves.

    python benchmarks/normative_update.py [RECIPE [OVERRIDES...]] [--device cuda] [--json]
    python benchmarks/normative_update.py vit_cifar10_r24 \\
        'model={name: timm, architecture: vit_small_patch16_224}' data.resize=224 \\
        feedback.rank=16
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ldfa_cli.analysis.bench import _timer as timer  # CUDA events on a GPU
from ldfa_cli.config import load_recipe
from ldfa_cli.engine.build import pick_device, synthetic_network
from ldfa_cli.feedback.normative import _alike_layers, normative_layers, normative_update


def grads(model, batched: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    normative_update(model, batched=batched)
    return [p.grad.clone() for n, p in model.named_parameters() if "feedback" in n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default="fmnist_vit_r16")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    recipe, path = load_recipe(args.recipe, args.overrides)
    device = pick_device(args.device)
    model, _, _ = synthetic_network(recipe, 1, device)
    layers = list(normative_layers(model))
    runs = sorted(len(run) for run in _alike_layers(layers))
    difference = max(
        (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)
        for a, b in zip(grads(model, False), grads(model, True), strict=True)
    )
    timed, times = timer(device), {False: [], True: []}
    for _ in range(5):  # warm-up: allocator, BLAS and CUDA kernels
        grads(model, False), grads(model, True)
    for _ in range(args.rounds):
        for batched in (False, True):
            model.zero_grad(set_to_none=True)
            times[batched].append(timed(lambda b=batched: normative_update(model, batched=b)))
    per_layer, batched = (statistics.median(times[b]) * 1e3 for b in (False, True))
    result = {"recipe": path.stem, "device": str(device), "layers": len(layers),
              "runs_of_one_shape": runs, "per_layer_ms": per_layer, "batched_ms": batched,
              "speedup": per_layer / batched, "max_relative_difference": difference,
              "threads": torch.get_num_threads()}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{path.stem} on {device}: {len(layers)} layers in runs {runs}; eq. 9 per layer "
              f"{per_layer:.3f} ms, batched {batched:.3f} ms ({per_layer / batched:.2f}x); "
              f"gradients differ by {difference:.1e} (relative)")  # fmt: skip


if __name__ == "__main__":
    main()
