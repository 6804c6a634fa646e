"""FLOP costs PyTorch's counter does not know: elementwise work, matrix decompositions and
optimizer steps. 2 FLOPs per multiply-add, as FlopCounterMode; 1 per elementwise operation.

* Elementwise ops (norms, activations, softmax, residual adds, the rules' own elementwise
  arithmetic) are charged per element by :data:`ELEMENTWISE`, a table of my estimates of the
  arithmetic each op does (e.g. layer norm: mean, subtract, square, mean, scale, affine = 7
  per element). Which ops a PyTorch version runs for one module can differ (an add fused
  into another kernel, say); the table charges what runs.
* ``torch.linalg.qr`` and ``torch.linalg.svd`` (the SVD init and reset) by Golub & Van
  Loan's operation counts for Householder QR with Q formed and the R-SVD.
* An optimizer step by its algorithm, per parameter element (:func:`optimizer_flops`).

Not counted (0 FLOPs): data movement (copies, views, indexing, concatenation, padding),
random-number generation, the bias additions fused into ``addmm`` and ``convolution``
(FlopCounterMode counts their products only), the data pipeline and evaluation.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten

# op name -> (FLOPs per element, whose elements: "out" = the first output, "in" = the
# first tensor argument). Names absent here (and from the product formulas) count 0.
ELEMENTWISE: dict[str, tuple[float, str]] = {
    **{
        name: (1, "out")
        for name in (
            "add",
            "sub",
            "mul",
            "div",
            "neg",
            "abs",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "reciprocal",
            "pow",
            "sign",
            "erf",
            "maximum",
            "minimum",
            "where",
            "relu",
            "threshold_backward",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "clamp",
            "clamp_min",
            "clamp_max",
            "hardtanh_backward",
            "rsub",
            "square",
            "exp2",
            "log1p",
            "expm1",
        )
    },  # fmt: skip
    **{name: (3, "out") for name in ("addcmul", "addcdiv", "lerp")},  # a + v * b * c
    "tanh": (4, "out"),
    "sigmoid": (4, "out"),
    "tanh_backward": (2, "out"),
    "sigmoid_backward": (2, "out"),
    "gelu": (5, "out"),
    "gelu_backward": (10, "out"),
    "silu": (5, "out"),
    "silu_backward": (8, "out"),
    "_softmax": (5, "in"),  # max, subtract, exp, sum, divide
    "_log_softmax": (5, "in"),
    "_softmax_backward_data": (4, "in"),
    "_log_softmax_backward_data": (4, "in"),
    "native_layer_norm": (7, "in"),  # mean, subtract, square, mean, scale, affine (2)
    "native_layer_norm_backward": (12, "in"),
    "native_batch_norm": (7, "in"),
    "_native_batch_norm_legit": (7, "in"),
    "_native_batch_norm_legit_functional": (7, "in"),
    "native_batch_norm_backward": (12, "in"),
    "native_dropout": (2, "in"),  # compare a uniform draw, scale
    "native_dropout_backward": (1, "in"),
    "sum": (1, "in"),
    "mean": (1, "in"),
    "amax": (1, "in"),
    "var": (3, "in"),
    "var_mean": (4, "in"),
    "norm": (2, "in"),
    "linalg_vector_norm": (2, "in"),
    "max_pool2d_with_indices": (1, "in"),
    "max_pool2d_with_indices_backward": (1, "in"),
    "avg_pool2d": (1, "in"),
    "avg_pool2d_backward": (1, "in"),
    "_adaptive_avg_pool2d": (1, "in"),
    "_adaptive_avg_pool2d_backward": (1, "in"),
    "nll_loss_forward": (1, "out"),
    "nll_loss_backward": (1, "out"),
}


def elementwise_flops(name: str, args, out) -> float | None:
    """FLOPs of one elementwise op (by its aten name, without overload), or None if the
    table does not charge it."""
    entry = ELEMENTWISE.get(name.removesuffix("_"))  # in-place variants cost the same
    if entry is None:
        return None
    cost, basis = entry
    if basis == "in":
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    else:
        tensor = out[0] if isinstance(out, (tuple, list)) else out
    return cost * tensor.numel() if isinstance(tensor, torch.Tensor) else 0.0


# ------------------------------------------------------------------- decompositions
def qr_flops(m: int, n: int) -> float:
    """Householder QR of an m x n matrix (m >= n) with the thin Q formed: 4 m n^2 - 4 n^3/3
    (Golub & Van Loan, 2 m n^2 - 2 n^3/3 for R and as much again for Q)."""
    m, n = max(m, n), min(m, n)
    return 4 * m * n * n - 4 * n**3 / 3


def svd_flops(m: int, n: int, vectors: bool = True) -> float:
    """Thin SVD of an m x n matrix: the R-SVD with U, S, V, 6 m n^2 + 20 n^3 for m >= n
    (Golub & Van Loan), or 4 m n^2 - 4 n^3/3 for the singular values alone."""
    m, n = max(m, n), min(m, n)
    return 6 * m * n * n + 20 * n**3 if vectors else 4 * m * n * n - 4 * n**3 / 3


def _matrices(tensor) -> tuple[int, int, int]:
    *batch, m, n = tensor
    return math.prod(batch), m, n


def _qr_formula(a_shape, *args, out_shape=None, **kwargs) -> float:
    batch, m, n = _matrices(a_shape)
    return batch * qr_flops(m, n)


def _svd_formula(a_shape, full_matrices=True, compute_uv=True, *args, out_shape=None, **kw):
    batch, m, n = _matrices(a_shape)
    return batch * svd_flops(m, n, vectors=bool(compute_uv))


def _conv_backward_formula(grad_out, x, w, bias, stride, padding, dilation, transposed,
                           output_padding, groups, output_mask, *args, **kwargs):  # fmt: skip
    """``convolution_backward`` with groups: the input gradient and the weight gradient each
    cost the forward convolution's multiply-adds, N * C_out * positions * (C_in / g) * k...
    (PyTorch's own formula charges a grouped weight gradient g times that)."""
    if transposed:  # the forward was a transposed conv: x (N, C_in...) with w (C_in, C_out/g..)
        per = math.prod(x[:1]) * math.prod(x[2:]) * math.prod(w)
    else:  # grad_out (N, C_out, positions...), w (C_out, C_in / g, k...)
        per = grad_out[0] * math.prod(grad_out[2:]) * math.prod(w)
    return 2 * per * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def decomposition_formulas() -> dict:
    """FlopCounterMode formulas (shapes in) for the decompositions the SVD reset runs, and a
    group-aware ``convolution_backward``."""
    return {aten.linalg_qr: _qr_formula, aten._linalg_svd: _svd_formula,
            aten.convolution_backward: _conv_backward_formula}  # fmt: skip


# ----------------------------------------------------------------------- optimizers
def optimizer_flops(config, elements: int) -> float:
    """FLOPs of one step of a recipe's optimizer over ``elements`` parameter elements, per
    the algorithm as PyTorch states it (1 FLOP per elementwise operation):

    * sgd: p -= lr g (2); momentum: b = mu b + g (2) and the step uses b;
    * adam / adamw: m = b1 m + (1 - b1) g (3), v = b2 v + (1 - b2) g^2 (4), the
      denominator sqrt(v) / sqrt(bc2) + eps (3), p -= (lr / bc1) m / denom (3): 13;
      amsgrad adds max(v_max, v) (1);
    * rmsprop: v = a v + (1 - a) g^2 (4), sqrt(v) + eps (2), p -= lr g / denom (3): 9;
      momentum adds b = mu b + g / denom (2);
    * weight decay: g += wd p (2; adam, sgd, rmsprop) or p *= 1 - lr wd (1; adamw).
    """
    name = config.name
    if name == "sgd":
        per = 2 + (2 if config.momentum else 0)
    elif name in ("adam", "adamw"):
        per = 13 + (1 if config.amsgrad else 0)
    else:  # rmsprop
        per = 9 + (2 if config.momentum else 0)
    if config.weight_decay:
        per += 1 if name == "adamw" else 2
    return float(per * elements)
