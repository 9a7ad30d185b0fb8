"""Every figure, drawn from a dataset alone (no Ray, no torch): one style, one module per figure family.

Each family draws from a ``kvray.analysis.dataset.Dataset`` (read once) or its View: ``plot_view`` (fig1–fig7,
figures/plots.py), ``server_figures`` (fig8, fig9), ``serving_figures`` (fig11, fig12), ``reuse_figures`` (exp6),
``tp_figures`` (exp7) and ``cell_timelines`` (fig10). Which of them a folder gets is the experiments' to say
(kvray/experiments/); ``kvray.report.draw_figures`` is the one call that draws them for ``kvray plot`` and the
report. The names load on first use, so importing the package costs nothing until a figure is drawn.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS = {
    "FIGURES": "kvray.figures.plots",
    "FIGURES_DIR": "kvray.figures.common",
    "make_figures": "kvray.figures.plots",
    "plot_view": "kvray.figures.plots",
    "server_figures": "kvray.figures.server",
    "serving_figures": "kvray.figures.serving",
    "reuse_figures": "kvray.figures.reuse",
    "tp_figures": "kvray.figures.parallelism",
    "cell_timelines": "kvray.figures.timeline",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'kvray.figures' has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
