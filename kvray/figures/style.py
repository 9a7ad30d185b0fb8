"""One look for every kvray figure: palette, line roles, fonts, titles, byte units and the files written.

Colours tell series apart (a GPU type, a backend); line styles tell quantities apart (measured peak,
weights, measured KV, predicted KV), so a memory figure with three GPUs still reads at a glance.
Colours are Okabe–Ito, safe for colour-blind readers and in greyscale print.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

DPI = 300
FORMATS = ("png", "svg")

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")
OOM_COLOR = "#C0392B"
CAPACITY_COLOR = "#7F7F7F"

# Line style per memory quantity; the series colour is applied on top.
ROLE_STYLES: dict[str, dict[str, Any]] = {
    "peak": {"linestyle": "-", "marker": "o", "linewidth": 2.0, "markersize": 5},
    "weights": {"linestyle": ":", "marker": None, "linewidth": 1.6},
    "kv_measured": {"linestyle": "-.", "marker": "o", "linewidth": 2.2, "markersize": 3.5},
    "kv_predicted": {"linestyle": "--", "marker": None, "linewidth": 1.3},
}
# Drawn over the others with a white halo, so a baseline equal to the peak or a prediction equal to the
# measurement still shows as its own line.
HALO_ROLES = ("weights", "kv_predicted")
ROLE_LABELS = {
    "peak": "measured peak",
    "weights": "weights baseline",
    "kv_measured": "measured KV",
    "kv_predicted": "predicted KV",
}

RC: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.05,
    "svg.fonttype": "none",  # text stays text in the SVG: editable, searchable, crisp
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.6,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.6,
    "figure.titlesize": 10.5,
}


@contextlib.contextmanager
def styled() -> Iterator[None]:
    """Apply the kvray style for the figures drawn inside (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    with plt.rc_context(cast(Any, RC)):
        yield


def halo(linewidth: float) -> list[Any]:
    import matplotlib.patheffects as pe

    return [pe.Stroke(linewidth=linewidth + 1.8, foreground="white"), pe.Normal()]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def marker(i: int) -> str:
    return MARKERS[i % len(MARKERS)]


def figure_title(fig: Any, headline: str, context: str) -> None:
    """Headline, and under it the model · dtype · backend · hardware the figure shows."""
    fig.suptitle(f"{headline}\n{context}" if context else headline)


def footnote(fig: Any, lines: list[str]) -> None:
    """Notes under the axes: data sources and what is missing (a figure says why it is incomplete)."""
    if lines:
        fig.text(0.01, -0.01, "\n".join(lines), ha="left", va="top", fontsize=7, color="#444444", wrap=True)


def placeholder(ax: Any, message: str) -> None:
    """An empty panel that states what data it needs, instead of a blank or a crash."""
    ax.set_axis_off()
    ax.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        fontsize=9,
        color="#555555",
        wrap=True,
        transform=ax.transAxes,
        gid="missing-data",
    )


def save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.png (300 dpi) and ``name``.svg; returns both paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=DPI, metadata={"Creator": "kvray"} if fmt == "png" else {"Date": None})
        paths.append(path)
    plt.close(fig)
    return paths
