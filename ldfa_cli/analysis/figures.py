"""One style and one way of saving for every figure ldfa draws.

Sizes fit a paper: a column is 3.5 in wide, a page 7.0 in, text 8 pt. Colours are Okabe
and Ito's colour-blind-safe palette (backprop always black). PDFs embed their fonts as
TrueType (type 42), SVGs carry text as paths, and neither records a creation date, so that
drawing the same records twice writes the same file. Figures are built on
:class:`matplotlib.figure.Figure` directly (no pyplot state, no backend to pick), written
atomically in the format the output's suffix or ``--format`` names.
"""

from __future__ import annotations

import functools
import io
from contextlib import contextmanager
from pathlib import Path

from ldfa_cli.errors import ConfigError

FORMATS = ("png", "pdf", "svg")
COLUMN_IN, PAGE_IN = 3.5, 7.0
# Okabe & Ito (2008), "Color Universal Design", black left out: it is backprop's colour
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
BP_COLOUR = "#000000"
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.titlesize": 9,
    "axes.prop_cycle": None,  # set below from PALETTE
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.4, "lines.markersize": 3,
    "legend.frameon": False, "figure.dpi": 100, "savefig.dpi": 200,
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path", "image.cmap": "RdBu_r",
    "svg.hashsalt": "ldfa",  # SVG ids from the content, not a random salt
}  # fmt: skip
# no creation date, so the same records draw the same file
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None},
            "svg": {"Date": None}}  # fmt: skip


def _style() -> dict:
    from cycler import cycler

    return {**STYLE, "axes.prop_cycle": cycler(color=list(PALETTE))}


@contextmanager
def styled():
    """ldfa's style for the figures drawn and saved inside."""
    import matplotlib

    with matplotlib.rc_context(_style()):
        yield


def styled_figure(draw):
    """Decorator: ``draw`` builds its figure in ldfa's style."""

    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        with styled():
            return draw(*args, **kwargs)

    return drawing


def new_figure(width: float = COLUMN_IN, height: float = 2.6):
    """An empty figure with constrained layout (legends and colour bars get their room)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


LINE_STYLES = ("-", "--", ":", "-.")


def line_style(index: int) -> str:
    """Solid for the palette's first round of colours, then dashed, dotted, dash-dotted: two
    groups never share both colour and style (until 28)."""
    return LINE_STYLES[index // len(PALETTE) % len(LINE_STYLES)]


def figure_path(out: Path, fmt: str | None = None) -> tuple[Path, str]:
    """Where a figure goes and in which format: the suffix of ``out`` names the format, or
    ``fmt`` (``--format``) does and is appended to a name without one of png, pdf, svg; a
    suffix and a format that disagree, or an unknown format, are a one-line error."""
    out = Path(out)
    if blocked := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise ConfigError(f"{out}: {blocked} is a file, not a folder; choose another path")
    if fmt is not None and fmt.lower() not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    fmt = fmt.lower() if fmt else None
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        if fmt is not None and fmt != suffix:
            raise ConfigError(f"--format {fmt} but {out} ends in .{suffix}: drop --format or "
                              f"name the file .{fmt}")  # fmt: skip
        return out, suffix
    if suffix and fmt is None:
        raise ConfigError(f"{out}: a figure is written as {', '.join(FORMATS)}, not .{suffix}; "
                          "name the file with one of those")  # fmt: skip
    fmt = fmt or "png"
    return out.with_name(f"{out.name}.{fmt}"), fmt


def save_figure(fig, out: Path, fmt: str | None = None) -> Path:
    """Write ``fig`` atomically to ``out`` (see :func:`figure_path`); returns the path."""
    from ldfa_cli.engine.checkpoint import atomic_write_bytes

    path, fmt = figure_path(out, fmt)
    buffer = io.BytesIO()
    with styled():
        fig.savefig(buffer, format=fmt, metadata=METADATA[fmt])
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))
    return path


# what a metric's short name stands for, in axis titles and legends
METRIC_NAMES = {"acc": "accuracy", "top5": "top-5 accuracy", "bpc": "bits per character",
                "ppl": "perplexity", "loss": "loss"}  # fmt: skip

FLOP_UNITS = ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"))


def flop_unit(values) -> tuple[float, str]:
    """The unit that writes the largest of ``values`` (FLOPs) with 1-3 digits before the
    point: (scale, name); TFLOPs where no value is known."""
    largest = max((abs(v) for v in values if v is not None and v == v and v), default=None)
    if largest is None:
        return 1e12, "TFLOPs"
    for scale, name in FLOP_UNITS:
        if largest >= scale:
            return scale, name
    return FLOP_UNITS[-1]
