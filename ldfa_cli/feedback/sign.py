"""Sign-concordant feedback: B takes W's signs, rebuilt from the current W at every
training step, with magnitudes that never depend on W's own (Liao, Leibo & Poggio 2016;
Moskovitz et al. 2018; as BioTorch implements them):

* ``usf`` (uniform sign-concordant feedback): B = s * sign(W);
* ``brsf`` (batchwise random magnitudes): B = |R| * sign(W), R redrawn every step;
* ``frsf`` (fixed random magnitudes): B = |M| * sign(W), M drawn once at conversion.

The layer sends B^T g upstream where backprop sends W^T g (B in W's layout, as ``fa``), and
its weight gradient is the standard one. The scale s is the RMS of W at conversion (for a
default-initialised layer 1/sqrt(3 fan_in), BioTorch's "PyTorch default" scaling factor;
for a Xavier-initialised one its std, BioTorch's other), which keeps sign(W) from blowing up
the gradients (Moskovitz et al. 2018); random magnitudes are |U(-sqrt(3) s, sqrt(3) s)|, of
RMS s. W's sign is read when the step's forward runs (BioTorch rebuilds B in every forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .rule import Rule, register


def _rms(weight: Tensor) -> float:
    return float(weight.detach().double().square().mean().sqrt())


@dataclass(frozen=True)
class SignConcordant(Rule):
    """Shared by usf, brsf and frsf: B = magnitudes * sign(W), sent as B^T g."""

    magnitudes: ClassVar[str] = "uniform"  # uniform | batchwise | fixed

    def create_feedback(self, layer) -> None:
        scale = _rms(layer.weight) or 1.0 / math.sqrt(3 * layer.patch_size)  # a zero W
        w = layer.weight
        layer.register_buffer("feedback_scale", torch.tensor(scale, dtype=w.dtype, device=w.device))
        if self.magnitudes != "uniform":
            # fixed: part of the state; batchwise: the last draw (redrawn every step)
            layer.register_buffer("feedback_M", self._draw(layer),
                                  persistent=self.magnitudes == "fixed")  # fmt: skip

    def _draw(self, layer) -> Tensor:
        bound = math.sqrt(3.0) * float(layer.feedback_scale)
        return torch.empty_like(layer.weight.detach()).uniform_(-bound, bound).abs_()

    def _magnitude(self, layer):
        return layer.feedback_scale if self.magnitudes == "uniform" else layer.feedback_M

    def feedback_tensors(self, layer):
        """B from the current W (called once per training forward)."""
        if self.magnitudes == "batchwise":
            layer.feedback_M = self._draw(layer)
        return (self.feedback_matrix(layer),)

    def feedback_matrix(self, layer):
        """B in W's layout: the magnitudes with W's current signs."""
        return self._magnitude(layer) * torch.sign(layer.weight.detach())

    def backward(self, ops, g, x, x_shape, feedback, targets, need_input, need_feedback, gw):
        (B,) = feedback
        return (ops.through(g, B.to(g.dtype), x_shape) if need_input else None), (None,)


@register
@dataclass(frozen=True)
class UniformSignConcordant(SignConcordant):
    """uSF (Liao et al. 2016): B = s sign(W), s the RMS of W at conversion."""

    name: ClassVar[str] = "usf"
    summary: ClassVar[str] = "uniform sign-concordant feedback: B = s sign(W)"
    equations: ClassVar[str] = "Liao et al. 2016"
    magnitudes: ClassVar[str] = "uniform"


@register
@dataclass(frozen=True)
class BatchwiseRandomSignConcordant(SignConcordant):
    """brSF (Liao et al. 2016): B = |R| sign(W), R ~ U(+-sqrt(3) s) redrawn every step."""

    name: ClassVar[str] = "brsf"
    summary: ClassVar[str] = "sign-concordant feedback, random magnitudes redrawn every batch"
    equations: ClassVar[str] = "Liao et al. 2016"
    magnitudes: ClassVar[str] = "batchwise"


@register
@dataclass(frozen=True)
class FixedRandomSignConcordant(SignConcordant):
    """frSF (Liao et al. 2016): B = |M| sign(W), M ~ U(+-sqrt(3) s) drawn once."""

    name: ClassVar[str] = "frsf"
    summary: ClassVar[str] = "sign-concordant feedback, fixed random magnitudes"
    equations: ClassVar[str] = "Liao et al. 2016"
    magnitudes: ClassVar[str] = "fixed"
