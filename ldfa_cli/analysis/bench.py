"""Wall-clock of training steps under backprop and under feedback ranks, in one process.

Every variant is the recipe's model on a synthetic batch of its dataset's shape. After
warm-up the variants take turns, one step each per round, so that drifts of the machine hit
them alike; the median step time is reported beside the FLOP ratio, and a profile by op
shows where the time that the FLOPs do not explain goes.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.engine.optim import build_optimizers
from ldfa_cli.feedback import accounting, backward_with_rules

from .flops import count_training_step


@dataclass
class Variant:
    label: str
    model: nn.Module
    step: callable
    flops: float
    times: list


OPTIMIZER = "(optimizer)"
PHASE_ORDER = (
    "forward", "input_grad", "broadcast", "weight_grad", "feedback_update", "svd_reset",
    "backward (other layers)", "optimizer", "python and dispatch",
)  # fmt: skip


class PhaseTimer(accounting.Marking, TorchDispatchMode):
    """Seconds of every op, filed under the phase the feedback layers mark (the FLOP
    counter's ``accounting.where()``): forward, input gradient, weight gradient, feedback
    update, the backward of layers that are not converted, the optimizer steps. On a GPU
    every op is synchronised, so that each is timed alone."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.cuda:
            torch.cuda.synchronize()
        layer, phase = accounting.where()
        if layer == OPTIMIZER:
            phase = "optimizer"
        elif layer == "(other)" and phase == "backward":
            phase = "backward (other layers)"
        self.seconds[phase] += time.perf_counter() - start
        return out


def phase_times(variant: Variant, device, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step by phase; 'python and dispatch' is the rest of the variant's
    median step time (Python, autograd's bookkeeping, kernel launches)."""
    timer = PhaseTimer(device)
    with timer:
        for _ in range(steps):
            variant.step()
    ms = {phase: seconds * 1e3 / steps for phase, seconds in timer.seconds.items()}
    ms["python and dispatch"] = max(0.0, statistics.median(variant.times) * 1e3 - sum(ms.values()))
    return {phase: ms[phase] for phase in PHASE_ORDER if phase in ms}


def _stepper(recipe, model: nn.Module, x, y):
    optimizers = build_optimizers(recipe, model, steps_per_epoch=1)
    count = [0]

    def step() -> None:  # the training loop's step, on a fixed batch
        optimizers.zero_grad()
        backward_with_rules(model, F.cross_entropy(model(x), y), count[0])
        count[0] += 1
        if accounting.ACTIVE:  # under PhaseTimer: file the optimizers' ops as their own
            previous = accounting.enter(OPTIMIZER, "optimizer")
        optimizers.step()
        if accounting.ACTIVE:
            accounting.leave(previous)

    return step


def _timer(device: torch.device):
    """Seconds of one call: CUDA events on a GPU, perf_counter elsewhere."""
    if device.type == "cuda":

        def timed(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3

        return timed

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return timed


def variant_specs(recipe, ranks: list[int]) -> list[tuple[str, object]]:
    """(label, recipe) for backprop and for the recipe's rule (ldfa if it is bp) at each
    rank."""
    rule = recipe.feedback.rule if recipe.feedback.rule != "bp" else "ldfa"
    bp = recipe.feedback.model_copy(update={"rule": "bp", "options": {}})
    specs = [("bp", recipe.model_copy(update={"feedback": bp}))]
    for r in ranks:
        fb = recipe.feedback.model_copy(update={"rule": rule, "rank": r})
        specs.append((f"{rule} r={r}", recipe.model_copy(update={"feedback": fb})))
    return specs


def build_variants(recipe, ranks: list[int], batch_size: int, device) -> list[Variant]:
    variants = []
    for label, spec in variant_specs(recipe, ranks):
        model, x, y = synthetic_network(spec, batch_size, device)
        model.train()
        flops = count_training_step(model, x, y).total
        variants.append(Variant(label, model, _stepper(spec, model, x, y), flops, []))
    return variants


def profile_summary(variant: Variant, device, steps: int = 3, top: int = 8) -> list[dict]:
    """The ops that take the most self time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])  # fmt: skip
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total} for e in events[:top]]  # fmt: skip


def run_bench(recipe, ranks: list[int], steps: int, warmup: int, batch_size: int,
              device: torch.device) -> dict:  # fmt: skip
    variants = build_variants(recipe, ranks, batch_size, device)
    timed = _timer(device)
    for variant in variants:
        for _ in range(warmup):
            variant.step()
    for _ in range(steps):
        for variant in variants:
            variant.times.append(timed(variant.step))
    base = variants[0]
    base_time = statistics.median(base.times)
    rows = []
    for v in variants:
        median = statistics.median(v.times)
        rows.append({"variant": v.label, "median_ms": median * 1e3,
                     "time_ratio": median / base_time, "flop_ratio": v.flops / base.flops,
                     "gflops_per_step": v.flops / 1e9})  # fmt: skip
    profiles = {v.label: profile_summary(v, device) for v in (variants[0], variants[1])}
    phases = {v.label: phase_times(v, device) for v in variants}
    return {"batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(device),
            "threads": torch.get_num_threads(), "rows": rows, "profile": profiles,
            "phases_ms": phases}  # fmt: skip
