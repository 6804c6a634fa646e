"""Receptive fields of a layer's channels (Sec. 6) and three measures of their shape.

Field of channel c: the gradient of the channel's centre unit with respect to the input at a
blank mean-grey image (zero after normalisation), or, with ``method="maximize"``, the input
found by L2-regularised gradient ascent on that unit (Erhan et al.). Measures, on the field
cropped to where it is non-zero:

* rotational symmetry: the mean correlation of the field with its rotations by 45, 90, ...,
  315 degrees (1: isotropic);
* orientation selectivity: from the 2-D Fourier power P(theta) by angle (DC excluded),
  |sum P e^{2 i theta}| / sum P (0: no preferred orientation, 1: one orientation);
* centre-surround index: with c and s the field summed over a centre disk (radius a third
  of the support's) and over the annulus around it, the sign contrast -2 c s / (c^2 + s^2)
  times the surround's sign consistency |s| / sum |field| over the annulus (+1: a uniform
  surround that cancels the centre, as in a balanced difference of Gaussians; about 0: no
  surround, or one of mixed sign such as a Gabor's side lobes; negative: centre and
  surround of one sign).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ldfa_cli.feedback import backprop_reference


def _capture(model: nn.Module, layer: str):
    store = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, a, out: store.__setitem__("out", out))
    return store, handle


def receptive_fields(model: nn.Module, layer: str, input_shape: tuple[int, int, int],
                     method: str = "gradient", steps: int = 200, lr: float = 0.05,
                     l2: float = 1e-2) -> np.ndarray:  # fmt: skip
    """Fields of every channel of ``layer``: an array channels x H x W (input channels
    averaged), for inputs of ``input_shape`` (C, H, W). A field belongs to the forward map,
    so its gradients are exact (``backprop_reference``), whatever feedback trained the
    layers: a rule's backward would give its feedback pathway instead, and a broadcast
    rule none at all."""
    was_training = model.training
    model.eval()
    store, handle = _capture(model, layer)
    device = next(model.parameters()).device
    try:
        with backprop_reference():
            fields = _fields(model, store, input_shape, device, method, steps, lr, l2)
    finally:
        handle.remove()
        model.train(was_training)
    return fields.mean(dim=1).cpu().numpy()


def _fields(model, store, input_shape, device, method, steps, lr, l2) -> torch.Tensor:
    """Per channel c, the gradient of c's centre unit at a blank input, or the input that
    maximises it (L2-regularised): channels x C x H x W."""
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    channels = store["out"].shape[1]
    cy, cx = (s // 2 for s in store["out"].shape[2:])
    index = torch.arange(channels)

    def centre_units(x):
        model(x)
        return store["out"][index, index, cy, cx].sum()

    if method == "gradient":
        x = torch.zeros(channels, *input_shape, device=device, requires_grad=True)
        return torch.autograd.grad(centre_units(x), x)[0]
    generator = torch.Generator().manual_seed(0)
    x = (0.01 * torch.randn(channels, *input_shape, generator=generator)).to(device)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        objective = -centre_units(x) + l2 * x.pow(2).sum()
        (x.grad,) = torch.autograd.grad(objective, x)  # the model's .grad stay untouched
        optimizer.step()
    return x.detach() - x.detach().mean(dim=(1, 2, 3), keepdim=True)


def crop_to_support(field: np.ndarray, rel: float = 1e-6) -> np.ndarray:
    """The smallest centred square holding every value above rel x max |field|."""
    h, w = field.shape
    mask = np.abs(field) > rel * max(np.abs(field).max(), 1e-30)
    if not mask.any():
        return field
    ys, xs = np.nonzero(mask)
    cy, cx = h // 2, w // 2
    half = int(max(abs(ys - cy).max(), abs(xs - cx).max()))
    return field[max(cy - half, 0) : cy + half + 1, max(cx - half, 0) : cx + half + 1]


def rotational_symmetry(field: np.ndarray) -> float:
    base = field - field.mean()
    scores = []
    for angle in range(45, 360, 45):
        turned = ndimage.rotate(field, angle, reshape=False, order=1, mode="constant")
        turned = turned - turned.mean()
        denom = np.linalg.norm(base) * np.linalg.norm(turned)
        scores.append(float((base * turned).sum() / denom) if denom > 0 else 0.0)
    return float(np.mean(scores))


def orientation_selectivity(field: np.ndarray) -> float:
    power = np.abs(np.fft.fftshift(np.fft.fft2(field - field.mean()))) ** 2
    h, w = field.shape
    fy, fx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    theta = np.arctan2(fy, fx)
    keep = (fy != 0) | (fx != 0)
    total = power[keep].sum()
    if total <= 0:
        return 0.0
    return float(np.abs((power[keep] * np.exp(2j * theta[keep])).sum()) / total)


def centre_surround_index(field: np.ndarray) -> float:
    h, w = field.shape
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    radius = np.hypot(yy, xx)
    outer = min(h, w) / 2
    centre = radius <= outer / 3
    surround = (radius > outer / 3) & (radius <= outer)
    c, s = field[centre].sum(), field[surround].sum()
    denom = c * c + s * s
    magnitude = np.abs(field[surround]).sum()
    if denom <= 0 or magnitude <= 0:
        return 0.0
    return float(-2 * c * s / denom * abs(s) / magnitude)


def measures(field: np.ndarray) -> dict:
    cropped = crop_to_support(field)
    return {"rotational_symmetry": rotational_symmetry(cropped),
            "orientation_selectivity": orientation_selectivity(cropped),
            "centre_surround_index": centre_surround_index(cropped),
            "size": int(cropped.shape[0])}  # fmt: skip


def summary(fields: np.ndarray) -> dict:
    per_channel = [measures(f) for f in fields]
    keys = ("rotational_symmetry", "orientation_selectivity", "centre_surround_index")
    return {"channels": per_channel,
            "mean": {k: float(np.mean([m[k] for m in per_channel])) for k in keys}}  # fmt: skip


def plot_fields(rows: list[tuple[str, np.ndarray]], path, per_line: int = 8) -> None:
    """Each run's channels as tiles, ``per_line`` to a line, labelled on its first line;
    diverging colours centred at zero, each tile on its own scale."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldfa_cli.engine.checkpoint import atomic_write_bytes

    cols = min(per_line, max(len(f) for _, f in rows))
    lines = [(label if start == 0 else "", fields[start : start + cols])
             for label, fields in rows for start in range(0, len(fields), cols)]  # fmt: skip
    fig, axes = plt.subplots(len(lines), cols, figsize=(1.1 * cols + 2.5, 1.1 * len(lines) + 0.4),
                             squeeze=False)  # fmt: skip
    for r, (label, fields) in enumerate(lines):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(fields):
                ax.axis("off")
                continue
            field = crop_to_support(fields[c])
            vmax = max(float(np.abs(field).max()), 1e-12)
            ax.imshow(field, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


def difference_of_gaussians(size: int = 15, sigma: float = 1.5, ratio: float = 2.0):
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r2 = x * x + y * y
    centre = np.exp(-r2 / (2 * sigma**2)) / sigma**2
    surround = np.exp(-r2 / (2 * (ratio * sigma) ** 2)) / (ratio * sigma) ** 2
    return centre - surround


def gabor(size: int = 15, wavelength: float = 6.0, theta: float = 0.3, sigma: float = 3.0):
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    along = x * math.cos(theta) + y * math.sin(theta)
    return np.exp(-(x * x + y * y) / (2 * sigma**2)) * np.cos(2 * math.pi * along / wavelength)
