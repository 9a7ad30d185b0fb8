"""fig7: predicted vs measured KV cache — each cell a point against y = x, and the error of each cell.

Both axes of the scatter are log and equal, so a constant relative error is a constant distance from the
diagonal at any size; the error panel sorts the cells by predicted KV and draws each error as a lollipop, so a
0 % error still shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvray.analysis.views import View, ok_rows, split_series
from kvray.figures import common, style
from kvray.figures.common import FigureResult
from kvray.units import byte_scale


def fig7_kv_predicted_vs_measured(view: View, out_dir: Path) -> FigureResult:
    cells = view.cells
    rows = cells[(cells["kv_measured_bytes"].astype(float) > 0) & (cells["kv_predicted_bytes"].astype(float) > 0)]
    heading = ("fig7 · KV cache: predicted vs measured", view.context(rows if len(rows) else cells))
    panels = {"width_ratios": [1, 1.3]}
    with common.new_figure(
        "fig7_kv_predicted_vs_measured", out_dir, 1, 2, figsize=(10.0, 4.4), gridspec_kw=panels, title=heading
    ) as d:
        (ax, ax_err), result = d.axes, d.result
        if not len(rows):
            missing = [c for c in ("kv_measured_bytes", "kv_predicted_bytes") if c in view.missing_columns]
            why = f"columns missing: {', '.join(missing)}" if missing else "no cell has both measured and predicted KV"
            d.missing(f"No KV comparison: {why}.", why)
            return result
        top = float(max(rows["kv_measured_bytes"].max(), rows["kv_predicted_bytes"].max()))
        bottom = float(min(rows["kv_measured_bytes"].min(), rows["kv_predicted_bytes"].min()))
        scale, unit = byte_scale(top)
        lo, hi = bottom / scale / 1.8, top / scale * 1.8
        ax.plot([lo, hi], [lo, hi], color="#555555", linestyle="--", linewidth=1.0, label="y = x", gid="identity")
        ordered = rows.sort_values(["kv_predicted_bytes", "kv_measured_bytes"]).reset_index(drop=True)
        for s in split_series(view, rows, "kv_predicted_bytes"):
            c, m = style.color(s.color_index), style.marker(s.color_index)
            ax.scatter(
                s.rows["kv_predicted_bytes"].astype(float) / scale,
                s.rows["kv_measured_bytes"].astype(float) / scale,
                color=c,
                marker=m,
                s=28,
                edgecolor="white",
                linewidth=0.5,
                label=s.label,
                zorder=3,
                gid=f"kv-points-{s.color_index}",
            )
            idx = ordered.index[ordered["cell_id"].isin(s.rows["cell_id"])]
            err_pct = ordered.loc[idx, "kv_rel_error"].astype(float) * 100
            ax_err.vlines(idx, 0, err_pct, color=c, linewidth=1.6)  # a lollipop: a 0 % error still shows
            ax_err.plot(
                idx, err_pct, linestyle="none", marker=m, color=c, markersize=5, gid=f"kv-error-{s.color_index}"
            )
            result.series.append(s.label)
        no_measure = sorted(
            {view.series_label(r) for _, r in ok_rows(cells).iterrows() if not (float(r["kv_measured_bytes"]) > 0)}
            - set(result.series)
        )
        if no_measure:
            result.notes.append(f"no measured KV recorded for: {', '.join(no_measure)}")
        _scatter_axes(ax, lo, hi, unit)
        _error_axes(ax_err, ordered)
        err = ordered["kv_rel_error"].astype(float)
        result.notes.append(
            f"{len(rows)} cells; mean |error| {err.abs().mean():.2%}, max |error| {err.abs().max():.2%}"
        )
    return result


def _scatter_axes(ax: Any, lo: float, hi: float, unit: str) -> None:
    """Equal log axes with plain numbers, from ``lo`` to ``hi`` in ``unit``."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"predicted KV ({unit})")
    ax.set_ylabel(f"measured KV ({unit})")
    ax.set_title("(a) each point is one cell")
    ax.legend(loc="upper left")


def _error_axes(ax: Any, ordered: Any) -> None:
    """Error per cell (%), symmetric about 0, each cell's shape as its tick while they fit."""
    ax.axhline(0, color="#555555", linewidth=0.8)
    ax.set_ylabel("(measured − predicted) / predicted (%)")
    ax.set_title("(b) error per cell, sorted by predicted KV")
    shapes = [f"c{int(r.concurrency)} p{int(r.prompt_toks)}" for r in ordered.itertuples()]
    if len(ordered) <= 24:
        ax.set_xticks(range(len(ordered)), shapes, rotation=60, ha="right", fontsize=6.5)
    else:
        ax.set_xlabel(f"{len(ordered)} cells")
        ax.set_xticks([])
    ax.grid(axis="x", visible=False)
    err = ordered["kv_rel_error"].astype(float)
    limit = max(float(err.abs().max()) * 100 * 1.25, 1.0)
    ax.set_ylim(-limit, limit)
