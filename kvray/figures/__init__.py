"""fig1–fig9 from the dataset alone (no Ray, no torch): one style, one module per figure family.

The entry points are importable from here — ``make_figures``, ``plot_view``, ``FIGURES``, ``FIGURES_DIR`` (from
figures/plots.py) and ``server_figures_if_any`` (figures/server.py) — and load on first use, so importing the
package costs nothing until a figure is drawn.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS = {
    "FIGURES": "kvray.figures.plots",
    "FIGURES_DIR": "kvray.figures.common",
    "make_figures": "kvray.figures.plots",
    "plot_view": "kvray.figures.plots",
    "server_figures_if_any": "kvray.figures.server",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'kvray.figures' has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
