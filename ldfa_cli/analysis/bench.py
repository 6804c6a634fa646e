"""Wall-clock of training steps under backprop and under feedback ranks, in one process.

Every variant is the recipe's model on a synthetic batch of its dataset's shape, trained by
the training step itself (``engine/step.py``: the recipe's precision, compile mode, Mixup,
targets and both optimizers; resets given in epochs are left out, as the batch is not an
epoch's). After warm-up the variants take turns, one step each per round, so that drifts
of the machine hit them alike; the median step time is reported beside the FLOP ratio,
and a profile by op shows where the time that the FLOPs do not explain goes. The ATen ops
one eager step dispatches (by phase) say what the step asks of the host: on a GPU, where a
small step waits on its launches, they rather than the FLOPs set its time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from ldfa_cli.analysis.figures import BP_COLOUR, PAGE_IN, colour, new_figure, styled_figure
from ldfa_cli.config.schema import compile_mode
from ldfa_cli.data import dataset_shape
from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.engine.metering import count_step
from ldfa_cli.engine.optim import build_optimizers
from ldfa_cli.engine.step import TrainStep
from ldfa_cli.feedback import accounting, feedback_layers
from ldfa_cli.feedback.model import update_period
from ldfa_cli.measure import costs
from ldfa_cli.measure.flops import ELEMENTWISE_ROW, StepFlops, attention_formulas

from .flops import backprop_twin


@dataclass
class Variant:
    label: str
    model: nn.Module
    step: callable
    flops: StepFlops
    times: list
    phase_step: callable = None  # the step timed by phase (backprop: its split twin's)
    period: int = 1  # steps in which each periodic update runs once (see update_period)

    def run_period(self, step: callable = None) -> None:
        for _ in range(self.period):
            (step or self.step)()

    @property
    def total_flops(self) -> float:
        return self.flops.total


RESET_PHASE = accounting.RESET
PHASE_ORDER = (
    "forward", "input_grad", "broadcast", "weight_grad", "feedback_update", RESET_PHASE,
    "backward (other layers)", "elementwise (forward)", "elementwise (backward)", "optimizer",
    "data movement", "python and dispatch",
)  # fmt: skip


def time_periods(variants: list[Variant], samples: int, timed) -> None:
    """``samples`` times per variant, taking turns, one period each (its time per step), so
    that the machine's drifts hit every variant alike. A period
    (:func:`~ldfa_cli.feedback.model.update_period`) is the steps in which every periodic
    update runs a whole number of times: with eq. 9 every 4 steps, the median of single
    steps would be a step without it, while the FLOPs count its amortised share."""
    for _ in range(samples):
        for variant in variants:
            variant.times.append(timed(variant.run_period) / variant.period)


def _row(layer: str, phase: str) -> str:
    """The phase row of a product op (a matmul, convolution or attention) at (layer, phase)."""
    if layer == "(other)":
        return "forward" if phase == "forward" else "backward (other layers)"
    return phase


class PhaseTimer(accounting.Marking, TorchDispatchMode):
    """Seconds of every op, filed in the rows the FLOP counter files its FLOPs in, so that
    each row's share of the time can stand beside its share of the FLOPs: products
    (matmuls, convolutions, attention) under the phase the feedback layers mark (forward,
    input gradient, weight gradient, feedback update, SVD reset) or under the forward /
    backward of layers that are not converted; ops the counter charges as elementwise under
    'elementwise'; the optimizer steps; ops it charges nothing (copies, views,
    concatenation) under 'data movement'. On a GPU every op is synchronised, so that each
    is timed alone."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)
        self.dispatches: dict[str, int] = defaultdict(int)  # ATen ops by row
        self.cuda = device.type == "cuda"
        self.products = {*flop_counter.flop_registry, *attention_formulas(),
                         *costs.decomposition_formulas()}  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        layer, phase = accounting.where()
        if layer == accounting.OPTIMIZER:
            row = "optimizer"
        elif phase == RESET_PHASE:
            row = RESET_PHASE
        elif func.overloadpacket in self.products:
            row = _row(layer, phase)
        elif costs.elementwise_flops(func.overloadpacket.__name__, args, out) is not None:
            row = "elementwise (forward)" if phase == "forward" else "elementwise (backward)"
        else:
            row = "data movement"
        self.seconds[row] += elapsed
        self.dispatches[row] += 1
        return out


def count_dispatches(variant: Variant, device, step: callable = None) -> dict[str, float]:
    """ATen ops dispatched in one eager step of ``variant`` (or of ``step``), by
    :class:`PhaseTimer`'s rows, averaged over a period. On a GPU most of them launch a
    kernel, and each costs host time whatever its size."""
    timer = PhaseTimer(device)
    with timer:
        variant.run_period(step)
    return {row: timer.dispatches[row] / variant.period
            for row in PHASE_ORDER if timer.dispatches.get(row)}  # fmt: skip


def step_dispatches(recipe, rank: int, batch_size: int, device,
                    warmup: int = 3) -> tuple[dict[str, float], int]:  # fmt: skip
    """({variant label: ATen ops of one eager step}, converted layers) for backprop and
    the recipe's rule at ``rank``, each counted after ``warmup`` steps (the optimizers'
    state exists); deterministic, whatever the machine's load."""
    variants = build_variants(recipe, [rank], batch_size, device)
    for variant in variants:
        for _ in range(warmup):
            variant.step()
    counts = {v.label: sum(count_dispatches(v, device).values()) for v in variants}
    return counts, converted_layers(variants[1].model)


def converted_layers(model: nn.Module) -> int:
    """Layers whose rule is not backprop: the denominator of the dispatches per layer."""
    return sum(1 for _, layer in feedback_layers(model) if not layer.rule.plain_autograd)


def flop_rows(step: StepFlops) -> dict[str, float]:
    """A step's FLOPs in :class:`PhaseTimer`'s rows."""
    rows: dict[str, float] = defaultdict(float)
    for layer, phase in step.counts:
        if layer != ELEMENTWISE_ROW and phase != RESET_PHASE:
            rows[_row(layer, phase)] += step.get(layer, phase)
    rows["elementwise (forward)"] = step.elementwise["forward"]
    rows["elementwise (backward)"] = step.elementwise["backward"]
    rows[RESET_PHASE] = step.reset
    rows["optimizer"] = sum(step.optimizer.values())
    return {row: value for row, value in rows.items() if value}


def phase_times(variants: list[Variant], device, rounds: int = 5) -> dict[str, dict]:
    """Milliseconds per step by row for each variant: the variants take turns, one period
    each under the timer per round (as the median steps were timed), and each row is its
    median over the rounds. 'python and dispatch' is the rest of the variant's median step
    (Python, autograd's bookkeeping, kernel launches); it is negative where the per-op
    timings add up to more than the median step, i.e. where the machine's noise exceeds it."""
    seconds: dict[str, dict[str, list]] = {v.label: defaultdict(list) for v in variants}
    for _ in range(rounds):
        for variant in variants:
            timer = PhaseTimer(device)
            with timer:
                variant.run_period(variant.phase_step)
            for row in PHASE_ORDER:
                seconds[variant.label][row].append(timer.seconds.get(row, 0.0) / variant.period)
    result = {}
    for variant in variants:
        ms = {row: statistics.median(values) * 1e3
              for row, values in seconds[variant.label].items() if any(values)}  # fmt: skip
        ms["python and dispatch"] = statistics.median(variant.times) * 1e3 - sum(ms.values())
        result[variant.label] = {row: ms[row] for row in PHASE_ORDER if row in ms}
    return result


def gap_by_row(variant_ms, variant_flops, bp_ms, bp_flops) -> dict[str, float]:
    """How much each row adds to the variant's gap, time/BP - FLOPs/BP: the row's time as a
    share of backprop's step less its FLOPs as a share of backprop's, relative to the same
    for backprop's own row. The rows sum to the gap (the time rows sum to the median step)."""
    time_total, flop_total = sum(bp_ms.values()), sum(bp_flops.values())
    rows = [r for r in PHASE_ORDER if r in variant_ms or r in bp_ms or r in variant_flops]
    return {r: (variant_ms.get(r, 0.0) - bp_ms.get(r, 0.0)) / time_total
            - (variant_flops.get(r, 0.0) - bp_flops.get(r, 0.0)) / flop_total
            for r in rows}  # fmt: skip


def gap_floor(bp_ms: dict[str, float], flop_ratio: float) -> float:
    """The least gap that work on the rule's own ops can reach: its gap if the products it
    puts in place of W^T g, its feedback update and its extra optimizer work took no time
    and every row it shares with backprop kept backprop's time, i.e. backprop's step less
    its input-gradient products. Above 0 where those products, which the rule removes, run
    faster than backprop's step on average (a larger share of its FLOPs than of its time)."""
    step = sum(bp_ms.values())
    return 1.0 - bp_ms.get("input_grad", 0.0) / step - flop_ratio


class RepeatedStep:
    """The training step again and again on one batch, counting the steps it takes."""

    def __init__(self, step: TrainStep, x, y):
        self.step, self.x, self.y, self.index = step, x, y, 0

    def __call__(self) -> None:
        self.step(self.x, self.y, self.index)
        self.index += 1


def recipe_step(recipe, model: nn.Module, optimizers, compiled: bool = True) -> TrainStep:
    """The recipe's training step on ``model``, compiled as the recipe says unless not
    ``compiled``: on a GPU, bf16 and a compiled model are the settings whose times a user
    meets."""
    mode = compile_mode(recipe.train, "model") if compiled else None
    net = model if mode is None else torch.compile(model, mode=mode)
    return TrainStep.for_recipe(recipe, model, optimizers, dataset_shape(recipe.data).classes,
                                net=net, compiled=compiled)  # fmt: skip


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


def with_ranks_used(label: str, rank, model: nn.Module) -> str:
    """The variant's label, with the ranks its layers use where they are not the one asked
    for (clipped to a layer's full rank)."""
    used = sorted({layer.rank for _, layer in feedback_layers(model) if layer.rank is not None})
    return label if not used or used == [rank] else f"{label} (used {', '.join(map(str, used))})"


def build_variants(recipe, ranks: list[int], batch_size: int, device) -> list[Variant]:
    """Backprop and the rule at each rank, each with its whole step counted (both
    optimizers included). Backprop's counts and phase timings come from its split twin
    (the rule's model with W^T g computed inside the feedback Function, see
    :func:`_split_backprop`), so that its input and weight gradients get rows too; its
    median step is plain autograd's."""
    variants, plans = [], {}
    (_, bp_spec), *rule_specs = variant_specs(recipe, ranks)
    for label, spec in [("bp", bp_spec), *rule_specs]:
        model, x, y = synthetic_network(spec, batch_size, device)
        model.train()
        optimizers = build_optimizers(spec, model, steps_per_epoch=1)
        step = recipe_step(spec, model, optimizers)
        label = with_ranks_used(label, spec.feedback.rank, model)
        variants.append(Variant(label, model, RepeatedStep(step, x, y), None, [],
                                period=update_period(model)))  # fmt: skip
        plans[label] = optimizers.flop_plan(model)
        if label == "bp":
            continue
        variants[-1].flops = count_step(step, x, y, plans[label])
        bp = variants[0]
        if bp.flops is None:  # backprop's split twin, from the first rule's model
            twin = _split_backprop(model)
            counted = recipe_step(bp_spec, twin, None, compiled=False)
            bp.flops = count_step(counted, x, y, plans["bp"])
            if not recipe.train.compile:  # compiled steps are not timed by phase
                twin_step = recipe_step(bp_spec, twin, build_optimizers(bp_spec, twin, 1))
                bp.phase_step = RepeatedStep(twin_step, x, y)
    return variants


def _split_backprop(model: nn.Module) -> nn.Module:
    """Backprop on ``model``'s layout with W^T g inside the feedback Function (where the
    counter and the timer see it apart from dW) and no feedback tensors (so its optimizer
    steps only what backprop's does)."""
    twin = backprop_twin(model)
    for _, layer in feedback_layers(twin):
        tensors = [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
        for name in [n for n, _ in tensors if n.startswith("feedback_")]:
            delattr(layer, name)
    return twin


def profile_summary(variant: Variant, device, steps: int = 3, top: int = 8) -> list[dict]:
    """The ops that take the most self time over a few periods, per step."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        # Kineto, the profiler's C++ side, logs its start and stop and, in a CUDA build on
        # a machine without a GPU, "ERROR ... gpuGetDeviceCount failed" to stderr: noise
        # in the bench's output. It reads this once, at its first use; a user's own wins.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])  # fmt: skip
    with profile(activities=activities) as prof:
        for _ in range(steps):
            variant.run_period()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    steps *= variant.period
    return [{"op": e.key, "ms_per_step": getattr(e, key) / 1e3 / steps,
             "share": getattr(e, key) / total} for e in events[:top]]  # fmt: skip


def kernel_ms(variant: Variant, device, steps: int = 3) -> float:
    """Milliseconds a step keeps the GPU busy: the sum of its kernels' (and copies') device
    time, by the profiler. Beside the step's wall-clock it says whether the step waits on
    the GPU (kernel time near the step time) or on the host's launches and Python."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            variant.run_period()
        torch.cuda.synchronize(device)
    return device_busy_ms(prof.key_averages(), steps * variant.period)


def device_busy_ms(events, steps: int) -> float:
    """The device time of the events that run on the device (kernels, memcpy, memset), per
    step; the CPU-side ops that launch them carry the same time again and are left out."""
    busy = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
    return busy / 1e3 / steps


def timed_rows(variants: list[Variant], steps: int, warmup: int, device) -> list[dict]:
    """Warm every variant up (its phase twin too), time ``steps`` periods of each, taking
    turns, and give a row per variant: its median step, its time and FLOP ratios to the
    first variant's (backprop's) and their gap."""
    for variant in variants:
        for _ in range(warmup):
            variant.step()
            if variant.phase_step is not None:
                variant.phase_step()
    time_periods(variants, steps, _timer(device))
    base = variants[0]
    base_time = statistics.median(base.times)
    rows = []
    for v in variants:
        median = statistics.median(v.times)
        time_ratio, flop_ratio = median / base_time, v.total_flops / base.total_flops
        rows.append({"variant": v.label, "median_ms": median * 1e3, "time_ratio": time_ratio,
                     "flop_ratio": flop_ratio, "gap": time_ratio - flop_ratio,
                     "gflops_per_step": v.total_flops / 1e9,
                     "steps_per_sample": v.period})  # fmt: skip
    return rows


def run_bench(recipe, ranks: list[int], steps: int, warmup: int, batch_size: int,
              device: torch.device) -> dict:  # fmt: skip
    variants = build_variants(recipe, ranks, batch_size, device)
    rows = timed_rows(variants, steps, warmup, device)
    base = variants[0]
    if device.type == "cuda":
        busy = {v.label: kernel_ms(v, device) for v in variants}
        for row in rows:
            row["kernel_ms"] = busy[row["variant"]]
            row["kernel_ratio"] = row["kernel_ms"] / busy[base.label]
    profiles = {v.label: profile_summary(v, device) for v in (variants[0], variants[1])}
    flops = {v.label: flop_rows(v.flops) for v in variants}
    phases = gaps = dispatches = None
    if not recipe.train.compile:  # a dispatch mode sees no op inside a compiled graph
        # the totals from each variant's own step (plain autograd for backprop), the rows
        # from the step the phase table times (backprop's split twin)
        dispatches, totals = {}, {}
        for v in variants:
            own = count_dispatches(v, device)
            totals[v.label] = sum(own.values())
            dispatches[v.label] = (
                own if v.phase_step is None else count_dispatches(v, device, v.phase_step)
            )
        bp_total = totals[base.label]
        for row, v in zip(rows, variants, strict=True):
            row["dispatches"] = totals[v.label]
            layers = converted_layers(v.model)
            if v is not base and layers:
                row["dispatches_per_layer"] = (row["dispatches"] - bp_total) / layers
        phases = phase_times(variants, device)
        gaps = {v.label: gap_by_row(phases[v.label], flops[v.label], phases["bp"],
                                    flops["bp"]) for v in variants[1:]}  # fmt: skip
        for row in rows[1:]:
            row["gap_floor"] = gap_floor(phases["bp"], row["flop_ratio"])
    return {"batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(device),
            "precision": recipe.train.precision, "compiled": compile_mode(recipe.train),
            "threads": torch.get_num_threads(),
            "rows": rows, "profile": profiles,
            "phases_ms": phases, "phases_gflops": {k: {r: f / 1e9 for r, f in v.items()}
                                                   for k, v in flops.items()},
            "gap_by_phase": gaps, "dispatches_by_phase": dispatches}  # fmt: skip


def width_sweep(recipe, widths: list[int], ranks: list[int], steps: int, warmup: int,
                batch_size: int, device: torch.device) -> list[dict]:  # fmt: skip
    """For an MLP recipe, at each hidden width (every hidden layer that wide): the rows of
    :func:`timed_rows` for backprop and the rule at each rank, each with its width."""
    rows = []
    depth = len(recipe.model.widths)
    for width in widths:
        sized = recipe.model_copy(update={"model": recipe.model.model_copy(
            update={"widths": [width] * depth})})  # fmt: skip
        variants = build_variants(sized, ranks, batch_size, device)
        rows += [{"width": width, **row} for row in timed_rows(variants, steps, warmup, device)]
    return rows


@styled_figure
def draw_width_sweep(rows: list[dict], title: str):
    """Time ratio (solid) and FLOP ratio (dashed) to backprop against the hidden width, a
    colour per rank; below 1, the rule's step is the cheaper."""
    fig = new_figure(0.75 * PAGE_IN, 3.4)
    ax = fig.subplots()
    labels = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "bp"))
    for index, label in enumerate(labels):
        mine = [r for r in rows if r["variant"] == label]
        widths = [r["width"] for r in mine]
        ax.plot(widths, [r["time_ratio"] for r in mine], marker="o", color=colour(index),
                label=f"{label}: time")  # fmt: skip
        ax.plot(widths, [r["flop_ratio"] for r in mine], ls="--", color=colour(index),
                label=f"{label}: FLOPs")  # fmt: skip
    ax.axhline(1.0, color=BP_COLOUR, lw=0.8, ls=":", label="backprop")
    ax.set_xscale("log", base=2)
    widths = sorted({r["width"] for r in rows})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set(xlabel="hidden width (every hidden layer)", ylabel="step / backprop's step",
           title=title.replace(": ", ":\n", 1))  # fmt: skip
    fig.legend(loc="outside lower center", ncols=2)
    return fig
