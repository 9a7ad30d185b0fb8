"""What every figure shares: its result record, its setup and save, and the axes pieces several figures draw.

``new_figure`` is the one place a figure is made and written: subplots in the kvray style, the title, the
notes under the axes, PNG + SVG, closed. A figure function draws inside the ``with`` block and returns its
FigureResult; the figure is saved when the block is left (by a ``return`` too), or closed unsaved if drawing
raised, so ``plot_view`` can put a placeholder in its place.

The axes pieces: a log2 x axis ticked at the swept values, log y with plain numbers, OOM / skipped / refused
cells marked on the x axis with the boundary between what ran and what did not, and the legend handles for
both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.analysis.views import OOM_LABELS, OOM_STATUSES, Series, ok_rows, oom_rows, partial_rows
from kvray.figures import style

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
MAX_TICKS = 12  # x values ticked one by one up to this many (log2_axis)
MAX_POINTS = 120  # a line drawn point by point up to this many x values; binned beyond (``binned``)
OOM_MARKERS = {"oom": "X", "skipped_after_oom": "X", "refused": "v"}
HOLLOW_OOM = ("skipped_after_oom",)  # drawn hollow: it did not run, it was judged by an OOM that did


@dataclass
class FigureResult:
    """What one figure shows: the tests and the report read this instead of guessing from pixels."""

    name: str
    paths: list[Path] = field(default_factory=list)
    series: list[str] = field(default_factory=list)  # legend labels of the data series drawn
    oom_markers: int = 0  # cells marked on an axis as OOM / skipped after OOM / refused
    partial_markers: int = 0  # points of partly failed cells ringed (their latencies pool successful requests only)
    notes: list[str] = field(default_factory=list)  # what is missing or approximated, shown under the figure
    empty: bool = False  # no panel had data
    caption: str = ""


@dataclass
class Drawing:
    """A figure being drawn: its matplotlib figure and axes (as ``plt.subplots`` returns them) and its result."""

    fig: Any
    axes: Any
    result: FigureResult

    def missing(self, message: str, note: str) -> FigureResult:
        """Every panel replaced by ``message`` (what data it needs); the figure is empty, its ``note`` says why."""
        for ax in self.fig.axes:
            style.placeholder(ax, message)
        self.result.notes.append(note)
        self.result.empty = True
        return self.result

    def no_successful_cells(self, experiment: str) -> FigureResult:
        """Empty: the sweep ``experiment`` has no ok cell to draw (they ran out of memory, failed, or none ran)."""
        return self.missing(
            f"No successful {experiment} cells in this dataset:\nrun `kvray {experiment} …` to fill it.",
            f"no successful {experiment} cells in this dataset",
        )


@contextlib.contextmanager
def new_figure(
    name: str,
    out_dir: Path,
    *shape: int,
    title: tuple[str, str] | None = None,
    layout: str | None = "constrained",
    **subplots: Any,
) -> Iterator[Drawing]:
    """``plt.subplots(*shape, layout=layout, **subplots)`` with ``title`` (headline, context: model · dtype ·
    backend · hardware), saved as ``out_dir/name``.png and .svg on leaving the block, with the result's notes
    under the axes unless the figure is empty (its placeholders already say what is missing)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*shape, layout=layout, **subplots)
    if title is not None:
        style.figure_title(fig, *title)
    drawing = Drawing(fig, axes, FigureResult(name))
    try:
        yield drawing
    except BaseException:
        plt.close(fig)
        raise
    if not drawing.result.empty:
        style.footnote(fig, drawing.result.notes)
    drawing.result.paths = style.save(fig, out_dir, name)


def failed_figure(name: str, exc: Exception, out_dir: Path) -> FigureResult:
    """The figure ``name`` as a panel saying why it could not be drawn: one bad figure must not cost the others."""
    with new_figure(name, out_dir, figsize=(6, 3), layout=None) as d:
        message = f"{name} could not be drawn from this dataset:\n{type(exc).__name__}: {exc}"[:300]
        d.missing(message, f"could not draw: {exc}")
    return d.result


def each_figure(out_dir: Path, drawers: Iterable[tuple[str, Callable[[], FigureResult]]]) -> list[FigureResult]:
    """Each ``(name, draw)`` drawn in the kvray style, in order; one that raises is logged and replaced by a
    ``failed_figure`` saying why — one bad figure must not cost the others, nor the report."""
    results = []
    with style.styled():
        for name, draw in drawers:
            try:
                results.append(draw())
            except Exception as exc:
                log.warning("%s failed: %s", name, exc, exc_info=True)
                results.append(failed_figure(name, exc, out_dir))
    return results


def figures_of(data: Any, out_dir: Path, drawn: Iterable[tuple[str, Callable[[Any, Path], FigureResult]]]) -> list[Any]:
    """``draw(data, out_dir)`` of each ``(name, draw)`` of ``drawn``, through ``each_figure``."""
    return each_figure(out_dir, ((name, functools.partial(draw, data, out_dir)) for name, draw in drawn))


# ---------------------------------------------------------------- axes


def label_axes(ax: Any, x: str, y: str, title: str = "", *, legend_size: float | None = 7, **legend: Any) -> None:
    """An axes' labels and title, and its legend (``legend_size`` None: none; ``legend``: matplotlib's keywords)."""
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title)
    if legend_size is not None:
        ax.legend(fontsize=legend_size, **legend)


def log2_axis(ax: Any, values: Any, label: str) -> None:
    """A log2 x axis ticked at the swept values, when they span at least 4×; linear otherwise. Past MAX_TICKS
    distinct values (a sweep of 1,000 prompt lengths) the ticks are powers of two, or matplotlib's own on a
    linear axis: a label per value would be unreadable, and laying out 1,000 labels per axis was most of
    `kvray plot`'s time on a 10,000-cell folder (docs/benchmarks.md, issue #31)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullLocator

    vals = sorted({float(v) for v in values if v == v and v > 0})
    if vals and vals[-1] / vals[0] >= 4:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(
            FixedLocator(vals) if len(vals) <= MAX_TICKS else LogLocator(base=2, numticks=MAX_TICKS)
        )
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlim(vals[0] / 1.3, vals[-1] * 1.3)
    elif len(vals) > MAX_TICKS:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True))
        pad = max((vals[-1] - vals[0]) * 0.08, 0.5)
        ax.set_xlim(vals[0] - pad, vals[-1] + pad)
    elif vals:
        ax.set_xticks(vals)
        pad = max((vals[-1] - vals[0]) * 0.08, 0.5)
        ax.set_xlim(vals[0] - pad, vals[-1] + pad)
    ax.set_xlabel(label)


def plain_log_y(ax: Any) -> None:
    """Log y with plain numbers (0.1, 1, 10 — not 10⁻¹); minor ticks labelled when under two decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 20 else NullFormatter())


def auto_y(ax: Any, values: list[float], unit: str, span: float = 4, headroom: float | None = 1.15) -> None:
    """Log y where the values span more than ``span``× (growth is multiplicative, or small values would vanish
    under large ones); otherwise linear, from 0 to ``headroom`` × the largest value (None: matplotlib's limits)."""
    finite = [v for v in values if v == v and v > 0]
    if finite and max(finite) / min(finite) > span:
        plain_log_y(ax)
        ax.set_ylabel(f"{unit} (log scale)")
        return
    if headroom is not None:
        ax.set_ylim(0, (max(finite) if finite else 1) * headroom)
    ax.set_ylabel(unit)


def p50_line_p99_band(ax: Any, pts: Any, x: str, metric: str, series: Series, gid: str) -> Any:
    """``metric``'s p50 in ms as the series' line, its p50–p99 band around it where both are recorded;
    returns the rows of the band."""
    colour, p50, p99 = style.color(series.color_index), f"{metric}_p50", f"{metric}_p99"
    ax.plot(pts[x], pts[p50] * 1e3, color=colour, marker=style.marker(series.color_index), label=series.label, gid=gid)
    band = pts.dropna()
    if len(band):
        ax.fill_between(band[x], band[p50] * 1e3, band[p99] * 1e3, color=colour, alpha=0.18, linewidth=0)
    return band


def binned(pts: Any, x: str, max_points: int = MAX_POINTS) -> tuple[Any, int]:
    """``pts`` as they are when they hold at most ``max_points`` distinct ``x`` values; beyond that, the median
    of every column over ``max_points`` bins of consecutive x values (as many distinct values in each, so the
    points follow the sweep's own spacing) — a 10,000-cell sweep of 1,000 prompt lengths is a line of 120
    points, not 1,000 markers that overlap and cost seconds to lay out. Returns (the points, the most cells
    one point stands for)."""
    import numpy as np

    if not len(pts) or pts[x].nunique() <= max_points:
        return pts, 1
    distinct = np.unique(pts[x].to_numpy(dtype=float))
    rank = np.searchsorted(distinct, pts[x].to_numpy(dtype=float))
    groups = pts.groupby(rank * max_points // len(distinct))
    return groups.median(), int(groups.size().max())


def binned_note(cells_per_point: int, x: str) -> list[str]:
    """The caption line saying a figure's lines were binned (``binned``), or nothing when they were not."""
    if cells_per_point <= 1:
        return []
    return [
        f"many {x.replace('_', ' ')} values: each point is the median of the cells in one of {MAX_POINTS} bins "
        f"(up to {cells_per_point} cells a point); per-cell intervals not drawn"
    ]


def x_values(rows: Any, x: str) -> Any:
    """The x values to tick: cells that ran or ran out of memory (an error cell is no result)."""
    return rows[rows["status"] != "error"][x]


def caption_notes(rows: Any) -> list[str]:
    """The notes every figure adds about ``rows``: cells that failed with an ordinary error (not drawn), and
    cells in which some requests failed (drawn, ringed where a figure marks them: their latencies and tokens/s
    count the successful requests only)."""
    notes = []
    errors = rows[rows["status"] == "error"]
    if len(errors):
        reasons = sorted({str(r)[:80] for r in errors["reason"].dropna()})
        notes.append(f"{len(errors)} cell(s) failed with an error and are not drawn: {'; '.join(reasons[:2])}")
    partial = partial_rows(rows)
    if len(partial):
        shown = [
            f"c={int(r['concurrency'])} p{int(r['prompt_toks'])}: {int(r['requests_failed'])}/{int(r['requests'])} failed"
            for _, r in partial.head(4).iterrows()
            if r["requests"] == r["requests"] and r["requests_failed"] == r["requests_failed"]
        ]
        notes.append(
            f"{len(partial)} partial cell(s), some requests failed (ringed; statistics over the successful "
            f"requests only){': ' + ', '.join(shown) if shown else ''}"
        )
    return notes


PARTIAL_RING: dict[str, Any] = {
    "marker": "o",
    "markersize": 14,
    "markerfacecolor": "none",
    "markeredgewidth": 1.3,
    "linestyle": "none",
}


def mark_partial(ax: Any, rows: Any, x: str, y: str, scale: float = 1.0) -> int:
    """A ring around each partly failed cell's point (``y`` / ``scale`` at ``x``); returns how many were ringed."""
    part = partial_rows(rows)[[x, y]].dropna().astype(float)
    if not len(part):
        return 0
    ax.plot(part[x], part[y] / scale, color=style.OOM_COLOR, zorder=6, gid="partial-marker", **PARTIAL_RING)
    return len(part)


def partial_legend_handles(count: int) -> list[Any]:
    """The legend entry for ringed partial cells, when any was drawn."""
    from matplotlib.lines import Line2D

    if not count:
        return []
    return [Line2D([], [], color=style.OOM_COLOR, label="partial: some requests failed", **PARTIAL_RING)]


# ---------------------------------------------------------------- OOM markers and legends


def oom_slots(series: list[Series]) -> dict[str, int]:
    """Stacking order of the series that have OOM cells (others need no room on the axis)."""
    having = [s.label for s in series if len(oom_rows(s.rows))]
    return {label: i for i, label in enumerate(having)}


def mark_oom(ax: Any, series: Series, x: str, slot: int = 0) -> int:
    """OOM / skipped / refused cells as markers on the x axis, in the series colour (series ``slot`` sits
    a marker higher, so two GPUs failing at the same x both show); the boundary (between the last cell
    that ran and the first that did not) as a dotted vertical line."""
    from matplotlib.transforms import ScaledTranslation

    oom = oom_rows(series.rows)
    lift = ScaledTranslation(0, slot * 9 / 72, ax.figure.dpi_scale_trans)  # 9 points per slot
    drawn = 0
    for status in OOM_STATUSES:
        xs = oom[oom["status"] == status][x].astype(float).tolist()
        if not xs:
            continue
        hollow = status in HOLLOW_OOM
        ax.plot(
            xs,
            [0.0] * len(xs),
            linestyle="none",
            marker=OOM_MARKERS[status],
            markersize=9,
            color=style.color(series.color_index),
            markerfacecolor="white" if hollow else None,
            markeredgecolor=style.color(series.color_index) if hollow else style.OOM_COLOR,
            markeredgewidth=1.4,
            transform=ax.get_xaxis_transform() + lift,
            clip_on=False,
            zorder=5,
            gid=f"oom-marker-{status}-{series.color_index}",
        )
        drawn += len(xs)
    ok = ok_rows(series.rows)
    if drawn and len(ok):
        last_ok, first_oom = float(ok[x].max()), float(oom[x].min())
        if first_oom > last_ok:
            mid = math.sqrt(last_ok * first_oom) if ax.get_xscale() == "log" else (last_ok + first_oom) / 2
            ax.axvline(
                mid,
                color=style.color(series.color_index),
                linestyle=(0, (1, 2)),
                linewidth=1.2,
                gid=f"oom-boundary-{series.color_index}",
            )
    return drawn


def oom_legend_handles(statuses: set[str]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            linestyle="none",
            marker=OOM_MARKERS[s],
            markersize=8,
            color="#BBBBBB",
            markerfacecolor="white" if s in HOLLOW_OOM else "#BBBBBB",
            markeredgecolor="#777777" if s in HOLLOW_OOM else style.OOM_COLOR,
            label=OOM_LABELS[s],
        )
        for s in OOM_STATUSES
        if s in statuses
    ]


def series_handles(series: list[Series]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=style.color(s.color_index), marker=style.marker(s.color_index), label=s.label)
        for s in series
    ]
