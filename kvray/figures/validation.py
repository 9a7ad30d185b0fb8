"""``kvray validate``'s figure: predicted against measured, one panel per metric, the ±15 % band drawn.

A point per validated cell; on the diagonal the simulator is exact. Log axes, since one folder's cells span
orders of magnitude (a TPOT of 2 ms beside a saturated queue's TTFT of seconds). Drawn from the Validation's rows
alone (kvray/analysis/validate.py), so the figure and the JSON can never disagree.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from kvray.figures import style

UNITS = {"_s_": ("ms", 1e3), "_rps": ("req/s", 1.0), "_tps": ("tok/s", 1.0), "_bytes": ("MiB", 2**-20)}
BAND = 0.15  # the latency target, drawn as the band around the diagonal


def _unit(metric: str) -> tuple[str, float]:
    return next((u for key, u in UNITS.items() if key in metric), ("", 1.0))


def draw_validation(
    rows: list[dict[str, Any]], out_dir: Path, title: str, context: str, name: str = "validation"
) -> list[Path]:
    """Predicted vs measured per metric (``rows``: Validation.rows); returns the files written."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    cols = min(4, max(len(metrics), 1))
    lines = max(math.ceil(len(metrics) / cols), 1)
    with style.styled():
        fig, axes = plt.subplots(lines, cols, figsize=(3.1 * cols, 3.0 * lines), squeeze=False)
        for ax in axes.flat[len(metrics) :]:
            ax.set_axis_off()
        if not metrics:
            style.placeholder(axes.flat[0], "no cell could be compared: nothing measured and predicted")
        for ax, metric in zip(axes.flat, metrics, strict=False):
            unit, scale = _unit(metric)
            mine = [r for r in rows if r["metric"] == metric and r["measured"] > 0 and r["predicted"] > 0]
            pts = [(r["measured"] * scale, r["predicted"] * scale) for r in mine if not r.get("excluded")]
            out = [(r["measured"] * scale, r["predicted"] * scale) for r in mine if r.get("excluded")]
            if not pts and not out:
                style.placeholder(ax, f"{metric}: no positive values")
                continue
            lo, hi = min(min(p) for p in pts + out) / 1.5, max(max(p) for p in pts + out) * 1.5
            ax.fill_between(
                [lo, hi],
                [lo * (1 - BAND), hi * (1 - BAND)],
                [lo * (1 + BAND), hi * (1 + BAND)],
                color="#dddddd",
                linewidth=0,
                label=f"±{BAND:.0%}",
            )
            ax.plot([lo, hi], [lo, hi], ":", color="grey", linewidth=0.8)
            ax.scatter([m for m, _ in pts], [p for _, p in pts], s=18, color=style.color(0), zorder=3)
            if out:  # not the engine's to predict (the client fell behind): drawn hollow, left out of the median
                ax.scatter([m for m, _ in out], [p for _, p in out], s=18, facecolors="none", edgecolors="grey")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # decade labels only: minor labels collide on a narrow range
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            err = f"median |err| {statistics.median(abs(p / m - 1) for m, p in pts):.0%}" if pts else "none judged"
            left_out = f", {len(out)} left out" if out else ""
            ax.set_title(f"{metric} ({len(pts)} cells{left_out}, {err})", fontsize=8)
            ax.set_xlabel(f"measured ({unit})" if unit else "measured")
            ax.set_ylabel(f"predicted ({unit})" if unit else "predicted")
        style.figure_title(fig, title, context)
        notes = [f"grey band: predicted within ±{BAND:.0%} of measured; dotted: predicted = measured"]
        if any(r.get("excluded") for r in rows):
            notes.append("hollow: measured while the client fell behind its schedule (the client's rate), left out")
        style.footnote(fig, notes)
        fig.tight_layout()
        return style.save(fig, out_dir, name)
