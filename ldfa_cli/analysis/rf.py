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
import os
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ldfa_cli.analysis.figures import PAGE_IN, colour, new_figure, styled_figure
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


MEASURES = (("rotational_symmetry", "rotational symmetry", "sym", (-1, 1)),
            ("orientation_selectivity", "orientation selectivity", "ori", (0, 1)),
            ("centre_surround_index", "centre-surround index", "csi", (-1, 1)))  # fmt: skip
CAPTION = ("sym: rotational symmetry, -1 to 1 (1: the same under rotation); ori: orientation "
           "selectivity, 0 to 1 (1: one orientation); csi: centre-surround index, -1 to 1 (+1: a "
           "surround that cancels the centre; 0: none); means over channels")  # fmt: skip
METHODS = {"gradient": "the gradient of each channel's centre unit at a blank input",
           "maximize": "the input that maximises each channel's centre unit"}  # fmt: skip


@dataclass
class FieldPanel:
    """One run's fields (channels x H x W) and what the figure says of it."""

    title: str
    fields: np.ndarray
    means: dict
    condition: str = ""  # its setting but for the seed: the summary's groups


@styled_figure
def draw_fields(panels: list[FieldPanel], layer: str, method: str):
    """The channels of one run per condition (its first seed given) as tiles, channel
    numbers above them, runs side by side (four to a row), each titled with what it is and
    its mean measures; one symmetric colour bar, every tile scaled to its own largest value;
    a caption line that spells the measures out. Several runs add a summary row over all of
    them: each measure's mean ± sd over the seeds of each condition, the seeds as dots (Fig.
    5's comparison)."""
    first = {}
    for panel in panels:
        first.setdefault(panel.condition, panel)
    shown = list(first.values())
    channels = max(len(p.fields) for p in shown)
    per_row = min(4 if channels <= 8 else 3, len(shown))
    run_rows = -(-len(shown) // per_row)
    cols = min(8, math.ceil(math.sqrt(channels)))
    tiles = -(-channels // cols)
    tile = PAGE_IN / (per_row + 0.28) / cols  # a tile's side in inches
    summary = 2.0 if len(panels) > 1 else 0.0
    height = run_rows * (0.75 + tiles * (tile + 0.12)) + summary + 0.7
    fig = new_figure(PAGE_IN, height)
    ratios = [height - summary, summary] if summary else None
    parts = fig.subfigures(len(ratios or [1]), 1, squeeze=False, height_ratios=ratios)
    grid = parts[0][0].subfigures(run_rows, per_row + 1, squeeze=False,
                                  width_ratios=[1.0] * per_row + [0.28])  # fmt: skip
    image = None
    for index, panel in enumerate(shown):
        sub = grid[index // per_row][index % per_row]  # four runs to a row
        axes = sub.subplots(tiles, cols, squeeze=False)
        for c, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.spines[:].set_visible(False)
            if c >= len(panel.fields):
                ax.axis("off")
                continue
            field = crop_to_support(panel.fields[c])
            field = field / max(float(np.abs(field).max()), 1e-12)
            image = ax.imshow(field, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
            ax.set_title(f"{c}", fontsize=6, pad=1)
        stats = "  ".join(f"{short} {panel.means[key]:+.2f}" for key, _, short, _ in MEASURES)
        sub.suptitle(f"{panel.title}\n{stats}", fontsize=6)
    bar = grid[0][per_row].add_axes((0.05, 0.15, 0.15, 0.7))  # the column at the right
    grid[0][per_row].colorbar(image, cax=bar, ticks=[-1, 0, 1], label="field / max |field|")
    if len(panels) > 1:
        _draw_summary(parts[1][0], panels)
    fig.suptitle(f"receptive fields of layer {layer}: {METHODS[method]}")
    fig.supxlabel(CAPTION, fontsize=6, wrap=True)
    return fig


def _draw_summary(sub, panels: list[FieldPanel]) -> None:
    conditions = list(dict.fromkeys(p.condition for p in panels))
    axes = sub.subplots(1, len(MEASURES))
    for ax, (key, name, _, (low, high)) in zip(axes, MEASURES, strict=True):
        for x, condition in enumerate(conditions):
            values = [p.means[key] for p in panels if p.condition == condition]
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.bar(x, float(np.mean(values)), yerr=sd, color=colour(x), alpha=0.5, capsize=2)
            ax.plot([x] * len(values), values, "k.", markersize=3)
        ax.set_xticks(range(len(conditions)), _shortened(conditions), rotation=35, ha="right",
                      fontsize=6)  # fmt: skip
        ax.set(title=name, ylim=(low, high))
        ax.axhline(0.0, color="grey", lw=0.5)
    counts = sorted({sum(p.condition == c for p in panels) for c in conditions})
    seeds = "/".join(map(str, counts))
    sub.suptitle(f"mean over channels, per condition: bar mean ± 1 sd over seeds "
                 f"({seeds} per condition), dots the seeds", fontsize=7)  # fmt: skip


def _shortened(names: list[str]) -> list[str]:
    """Names without the part they all begin with (up to an underscore): the summary's
    x labels, e.g. ``bp_narrow4`` for ``retina_fmnist_bp_narrow4``."""
    if len(names) < 2:
        return names
    common = os.path.commonprefix(names)
    cut = common.rfind("_") + 1
    return [name[cut:] or name for name in names]


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
