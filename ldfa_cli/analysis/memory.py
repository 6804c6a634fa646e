"""Memory of one training step, split by what holds it.

Every tensor is counted once, by its storage. Before the step: the forward parameters, the
feedback tensors (P, Q, B and the rules' buffers), the optimizer state of both optimizers.
During the step, a dispatch mode sees every tensor an op creates and follows it until its
storage is freed (a weak reference to the storage dies exactly then), so on any device it
knows the bytes alive after each op:

- saved for backward: the tensors autograd keeps from the forward for the backward
  (``saved_tensors_hooks``; parameters and the input batch left out, they live anyway);
- backward transient: the most the backward holds at once beyond what was alive when it
  started and beyond the gradients it leaves (input gradients in flight, products like
  W^T g or P g, the rules' temporaries);
- gradients: the ``.grad`` of every parameter after the backward;
- peak: the most alive at once over the step (forward, backward, optimizer step), plus
  what was alive before it. On CUDA the allocator's ``max_memory_allocated`` is reported
  beside it (everything allocated on the device, block rounding included).

Beside it, what the shapes predict: parameters and gradients one copy each, the optimizer's
state per element (Adam/AdamW 2, AMSGrad 3, SGD with momentum 1), and every Linear/Conv
layer's input saved for its weight gradient (a lower bound on what autograd saves:
activations such as ReLU's output, norms' statistics and attention's probabilities come on
top).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # FlopCounterMode's base too
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ldfa_cli.engine.build import synthetic_network
from ldfa_cli.engine.optim import build_optimizers
from ldfa_cli.feedback import feedback_layers
from ldfa_cli.feedback.model import update_period

from .bench import recipe_step, variant_specs

STATE_PER_ELEMENT = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2, "amsgrad": 3}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]  # fmt: skip


class LiveBytes(TorchDispatchMode):
    """Follows every storage that an op under this mode creates, until it is freed: the
    bytes alive now, their peak, and a log of (serial, +bytes) on creation and
    (serial, -bytes) on release to replay for any subset of storages."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.serial = WeakIdKeyDictionary()
        self.existing = WeakIdKeyDictionary({t.untyped_storage(): True for t in existing})
        self.log: list[tuple[int, int]] = []
        self.live = 0
        self.peak = 0

    def _release(self, serial: int, nbytes: int) -> None:
        self.live -= nbytes
        self.log.append((serial, -nbytes))

    def serial_of(self, tensor: torch.Tensor) -> int | None:
        return self.serial.get(tensor.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.live

    def peak_of(self, start: int, end: int, leave_out: set[int]) -> int:
        """The most bytes alive at once between log positions ``start`` and ``end`` of the
        storages created there, ``leave_out`` (serials) not counted."""
        live = peak = 0
        born = set()
        for serial, delta in self.log[start:end]:
            if serial in leave_out or (delta < 0 and serial not in born):
                continue
            born.add(serial)
            live += delta
            peak = max(peak, live)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                nbytes = storage.nbytes()
                if nbytes and storage not in self.serial and storage not in self.existing:
                    serial = len(self.log)
                    self.serial[storage] = serial
                    self.log.append((serial, nbytes))
                    self.live += nbytes
                    weakref.finalize(storage, self._release, serial, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class StepMemory:
    parameters: int
    feedback_tensors: int
    optimizer_state: int
    saved_for_backward: int
    backward_transient: int
    gradients: int
    peak: int
    allocator_peak: int | None
    expected: dict


def _optimizer_kind(config) -> str:
    name = config.name
    if name == "sgd":
        return "sgd_momentum" if getattr(config, "momentum", 0) else "sgd"
    if getattr(config, "amsgrad", False):
        return "amsgrad"
    return name if name in STATE_PER_ELEMENT else "adam"


def expected_memory(model: nn.Module, optimizers, x: torch.Tensor, feedback: list) -> dict:
    """What the shapes say: one copy of each tensor and of each trainable one's gradient,
    the optimizers' state per element, and each Linear/Conv input (but the batch itself)
    saved for its weight gradient."""
    batch = x.untyped_storage().data_ptr()
    inputs = []  # held until counted, so that no freed storage's address is reused

    def note_input(_module, args) -> None:
        if args[0].untyped_storage().data_ptr() != batch:
            inputs.append(args[0])

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    hooks = [m.register_forward_pre_hook(note_input) for m in model.modules()
             if isinstance(m, layers)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    feedback_ids = {id(t) for t in feedback}
    tensors = [*model.parameters(), *model.buffers()]
    state = sum(STATE_PER_ELEMENT[_optimizer_kind(config)]
                * storage_bytes(p for g in optimizer.param_groups for p in g["params"])
                for optimizer, _, config in optimizers.pairs())  # fmt: skip
    return {
        "parameters": storage_bytes(t for t in tensors if id(t) not in feedback_ids),
        "feedback_tensors": storage_bytes(feedback),
        "gradients": storage_bytes(p for p in model.parameters() if p.requires_grad),
        "optimizer_state": state,
        "saved_for_backward_at_least": storage_bytes(inputs),
    }


class StepPhases:
    """The observer of the measured step (``TrainStep.observer``): what autograd saves in
    the forward, where the backward starts, and what the backward holds beyond the
    gradients it leaves."""

    def __init__(self, live: LiveBytes, model: nn.Module, keep: set[int]):
        self.live, self.model, self.keep = live, model, keep
        self.saved: list[torch.Tensor] = []
        self.saved_bytes = self.forward_peak = self.transient = 0
        self.backward_start = 0
        self.grads: list[torch.Tensor] = []

    def _pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in self.keep:
            self.saved.append(t)
        return t

    @contextlib.contextmanager
    def phase(self, name: str):
        if name == "forward":
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
            self.saved_bytes = storage_bytes(self.saved)
            self.saved.clear()
            self.forward_peak, self.backward_start = self.live.peak, len(self.live.log)
            self.live.reset_peak()
        elif name == "backward":  # the backward and the rules' after-backward work
            yield
            self.grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            serials = {self.live.serial_of(g) for g in self.grads}
            self.transient = self.live.peak_of(self.backward_start, len(self.live.log), serials)
        else:
            yield


def measure_step(recipe, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 warmup: int = 2) -> StepMemory:  # fmt: skip
    """Run ``warmup`` training steps (so the optimizer state exists), then measure one in
    which every periodic update (eq. 9 every k steps) runs, the step of the period's peak."""
    optimizers = build_optimizers(recipe, model, steps_per_epoch=1)
    step = recipe_step(recipe, model, optimizers, compiled=False)  # the mode sees each op
    for index in range(warmup):
        step(x, y, index)
    period = update_period(model)
    measured = -(-warmup // period) * period  # every periodic update is due at a multiple
    optimizers.zero_grad()
    feedback_ids = {id(t) for _, layer in feedback_layers(model)
                    for name, t in [*layer.named_parameters(recurse=False),
                                    *layer.named_buffers(recurse=False)]
                    if name.startswith("feedback_")}  # fmt: skip
    tensors = [*model.parameters(), *model.buffers()]
    feedback = [t for t in tensors if id(t) in feedback_ids]
    params = [t for t in tensors if id(t) not in feedback_ids]
    state = [*optimizer_state_tensors(optimizers.forward),
             *optimizer_state_tensors(optimizers.feedback)]  # fmt: skip
    expected = expected_memory(model, optimizers, x, feedback)
    existing = [*tensors, *state, x, y]
    before = storage_bytes(existing)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    live = LiveBytes(existing)
    step.observer = phases = StepPhases(
        live, model, {t.untyped_storage().data_ptr() for t in [*tensors, x]}
    )
    try:
        with live:
            step(x, y, measured)
    finally:
        step.observer = None
    step_peak = max(phases.forward_peak, live.peak)
    allocator_peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        allocator_peak = torch.cuda.max_memory_allocated(x.device)  # everything on the device
    return StepMemory(
        parameters=storage_bytes(params),
        feedback_tensors=storage_bytes(feedback),
        optimizer_state=storage_bytes(state),
        saved_for_backward=phases.saved_bytes,
        backward_transient=phases.transient,
        gradients=storage_bytes(phases.grads),
        peak=before + step_peak,
        allocator_peak=allocator_peak,
        expected=expected,
    )


def run_memory(recipe, ranks: list[int], batch_size: int, device: torch.device) -> dict:
    """``measure_step`` for backprop and the recipe's rule at each rank."""
    rows = []
    for label, spec in variant_specs(recipe, ranks):
        model, x, y = synthetic_network(spec, batch_size, device)
        model.train()
        rows.append({"variant": label, **asdict(measure_step(spec, model, x, y))})
    return {"batch_size": batch_size, "device": str(device), "rows": rows}
