"""``bp``: exact backpropagation through W^T by plain autograd (Sec. 2), the reference every
other rule is tested against. A ``bp`` layer adds no feedback tensors and no custom Function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .rule import Rule, register


@register
@dataclass(frozen=True)
class Backprop(Rule):
    """delta_l = W_{l+1}^T delta_{l+1} * f'(a_l): the transpose of the forward weights."""

    name: ClassVar[str] = "bp"
    summary: ClassVar[str] = "backpropagation: W^T by plain autograd (the reference)"
    equations: ClassVar[str] = "Sec. 2"
    plain_autograd: ClassVar[bool] = True

    def feedback_matrix(self, layer):
        return layer.weight.detach()
