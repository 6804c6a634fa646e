"""Where FLOPs and time go: which layer and which phase an operation belongs to, for the
FLOP counter (``ldfa_cli.measure``) and ``ldfa bench``'s phase timer.

The markers are plain assignments guarded by ``ACTIVE``, which is False except inside a
counter or timer, so training (and torch.compile, which guards on the flag) never runs them.
"""

from __future__ import annotations

import torch

# The phases of a feedback layer's work: its forward, the input gradient through its
# feedback (or a broadcast error's), its weight gradient and its feedback's own update.
PHASES = ("forward", "input_grad", "broadcast", "weight_grad", "feedback_update")
RESET = "feedback_reset"  # a rule's periodic reset (Rule.reset), after the optimizer step
OPTIMIZER = "(optimizer)"  # the layer name under which the optimizer steps run

ACTIVE = False
_where: list = [None, None]  # layer name, phase


def enter(layer: str | tuple[str, ...], phase: str) -> tuple:
    """Mark the ops that follow as ``layer``'s, in ``phase``. A tuple of names stands for
    layers of one shape whose ops run batched: each op's FLOPs are theirs in equal shares."""
    previous = tuple(_where)
    _where[0], _where[1] = layer, phase
    return previous


def set_phase(phase: str) -> None:
    _where[1] = phase


def leave(previous: tuple) -> None:
    _where[0], _where[1] = previous


def where() -> tuple[str, str]:
    """(layer, phase) of the operation running now; outside feedback layers the layer is
    '(other)' and the phase 'forward' or 'backward'."""
    layer, phase = _where
    if layer is None:
        in_backward = torch._C._current_autograd_node() is not None
        return "(other)", "backward" if in_backward else "forward"
    return layer, phase


def set_active(active: bool) -> None:
    global ACTIVE
    ACTIVE = active
    _where[0] = _where[1] = None


class Marking:
    """Mixin for a dispatch mode that reads ``where()``: the markers are on while it is
    entered (and off again however it exits)."""

    def __enter__(self):
        set_active(True)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            set_active(False)


class marked:
    """``with marked(layer_name, phase):`` files the ops inside under that layer and phase
    for the FLOP counter and the phase timer; nothing at all when neither is on."""

    __slots__ = ("layer", "phase", "previous")

    def __init__(self, layer: str, phase: str):
        self.layer, self.phase, self.previous = layer, phase, None

    def __enter__(self) -> None:
        if ACTIVE:
            self.previous = enter(self.layer, self.phase)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            leave(self.previous)
