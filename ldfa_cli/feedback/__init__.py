"""Feedback layers and credit-assignment rules: low-dimensional error feedback (LDFA).

Every rule replaces the W^T of a layer's backward pass (Hanut & Kadmon, Sec. 2). A rule is
one file of this folder (``backprop.py``, ``fa.py``, ``sign.py``, ``normative.py``,
``local.py``, ``broadcast.py``, ``svd.py``): a registered frozen dataclass whose fields are
its options and whose methods are everything it does (``rule.py`` lists the hooks). Every
module here is imported below, so a new file registers its rules; ``plugins.py`` imports
rule files from elsewhere. ``ldfa rules`` lists them with their equations and options.

Layouts: W is m x n (out x in). B = Q P approximates W^T with Q n x r and P r x m
(a conv's Q is an r x n x kh x kw transposed-conv kernel, its P a 1x1 conv); the input
gradient is (g P^T) Q^T. A full-rank B (fa, kp) is stored in W's own layout. Layers:
nn.Linear, nn.Conv1d, nn.Conv2d (zero padding).

Grouped convs (groups g > 1) keep their groups in the feedback: one (P_j, Q_j) pair per
group, P a grouped 1x1 conv and Q a grouped transposed conv, the rank per group (clipped to
the group's full rank min(m_g, n_g kh kw)), Oja's covariance, the Hebbian update and the
factorisation loss formed per group. Where a low-rank map cannot save anything, because even
rank 1 per group costs more than the group's W^T (a depthwise conv: its W^T g costs
T k^2 m, rank 1 costs T m (1 + k^2)), the converter keeps the layer on plain autograd and
says so ("kept: depthwise, its transpose is already cheaper than rank 1 per group");
``force_grouped=True`` converts it anyway.

Random feedback defaults to ``init: matched`` for every low-rank rule and ``fa``/``kp``:
random directions scaled from the layer's own W (||QP||_F that of W's best rank-r
approximation, ||B||_F = ||W||_F), so models that initialise their weights otherwise than
nn.Linear's default (timm's truncated normals) get feedback of their own gradients' size
instead of a gain that compounds with depth; the paper-faithful recipes pin App. B's
``kaiming``. The broadcast rules' maps (dfa, dldfa) stand for no single W^T and keep their
own draw.

Sign convention, once for every rule. The paper writes updates with the error
delta = y - y_hat, a negative gradient. Here every update of a feedback tensor reaches it as
the ``.grad`` that a *descent* step applies, so optimizers, gradient clipping, weight decay
and DDP's all-reduce treat feedback tensors like any parameter:

* W.grad = g^T h (g = dL/d output), the standard gradient;
* kp:         B.grad = W.grad + lambda B;
* ldfa:       Q.grad, P.grad = gradients of 1/2 ||QP - W^T||^2 (:func:`normative_update`,
              equal to ``feedback_loss(model).backward()``);
* ldfa_local: P.grad = -(P C/gamma)(I - P^T P) + lambda P  (Oja, eq. 15),
              Q.grad = h^T (g P^T) + lambda Q            (Hebbian, eq. 18);
* svd_dfa:    U.grad, s.grad, V.grad = gradients of W = U diag(s) V^T for the projected
              error, + lambda_align d L_align/dU; the orthogonality term by autograd.

Gradients that come from the data (Oja, Hebbian, kp) are returned by the layer's
``autograd.Function.backward``; the normative one from :func:`normative_update`.
"""

import importlib
import pkgutil

from .convert import ConversionReport, conversion_report, convert
from .diagnostics import alignment_diagnostics, feedback_alignment
from .layers import FeedbackLayer, LDFAConv2d, LDFALinear, backprop_reference
from .model import (
    after_backward,
    auxiliary_loss,
    backward_with_rules,
    changes_shape,
    epoch_end,
    feedback_layers,
    feedback_parameters,
    fit_to_state,
    forward_parameters,
    reset_due,
    set_feedback_targets,
)
from .normative import feedback_loss, normative_update
from .plugins import load_plugins
from .rule import RULES, FeedbackConfigError, Rule, make_rule, register, resolve_rank

# Every module of this folder is imported, so that a rule registers itself by having its
# file here: adding a rule is one file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "RULES",
    "ConversionReport",
    "FeedbackConfigError",
    "FeedbackLayer",
    "LDFAConv2d",
    "LDFALinear",
    "Rule",
    "after_backward",
    "alignment_diagnostics",
    "auxiliary_loss",
    "backward_with_rules",
    "backprop_reference",
    "changes_shape",
    "conversion_report",
    "convert",
    "epoch_end",
    "feedback_alignment",
    "feedback_layers",
    "feedback_loss",
    "feedback_parameters",
    "fit_to_state",
    "forward_parameters",
    "load_plugins",
    "make_rule",
    "normative_update",
    "register",
    "reset_due",
    "resolve_rank",
    "set_feedback_targets",
]
