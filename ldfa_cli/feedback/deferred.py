"""Feedback updates that a rule's backward leaves for its after-backward work.

Within the training step's eager backward (:func:`~ldfa_cli.feedback.model.backward_with_rules`
without ``params``, outside torchrun), a rule's backward may keep a layer's statistics for its
feedback update (:func:`keep`) instead of finishing the update there; its
:meth:`~ldfa_cli.feedback.rule.Rule.after_backward` takes them (:func:`take`) and finishes the
update of all its layers at once, batched over layers of one shape. Each op a layer no longer
runs is a dispatch per layer and step, host time on a GPU.

Everywhere else the rule finishes its update inside the backward, so that no gradient depends
on work that may not follow: a compiled backward (no Python side effect survives tracing), DDP
(which averages only the gradients a backward produces), and any backward the step does not
run, such as ``ldfa eval``'s probe. A statistic kept and never taken is an error, not a lost
update.
"""

from __future__ import annotations

import contextlib

import torch

_kept: dict[int, list] | None = None


@contextlib.contextmanager
def collecting(enabled: bool = True):
    """The block in which backwards may keep statistics and the after-backward work takes
    them (no-op when not ``enabled``). Every statistic kept must be taken by its end."""
    global _kept
    previous, _kept = _kept, ({} if enabled else None)
    try:
        yield
        if _kept:
            raise RuntimeError(f"{len(_kept)} layer(s) kept feedback statistics in the "
                               "backward that no after-backward work took: their update "
                               "was lost")  # fmt: skip
    finally:
        _kept = previous


def active() -> bool:
    """Whether a backward running now may keep its statistics (not while compiling)."""
    return _kept is not None and not torch.compiler.is_compiling()


def keep(ops, statistics: tuple) -> None:
    """Keep ``statistics`` for the layer whose products ``ops`` are (its own object, which
    the autograd Function holds as it is: a saved tensor may come back as another object,
    e.g. under ``saved_tensors_hooks``); a layer run twice in one forward keeps two."""
    _kept.setdefault(id(ops), []).append(statistics)


def take(layer) -> list[tuple]:
    """The statistics ``layer`` kept since the block began, removed (none outside it)."""
    return [] if _kept is None else _kept.pop(id(layer.ops), [])
