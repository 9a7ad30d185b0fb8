"""fig1 and fig4: memory vs concurrency (exp1) and vs prompt length (exp2), one drawing for both.

Per series (a GPU type, a backend …) four quantities, told apart by line style: the measured peak, the
weights baseline, the measured KV and the predicted KV (drawn for cells that never ran too: it shows where the
KV would have gone). Each GPU's capacity is a grey line; OOM / skipped / refused cells sit on the x axis.
Log y: KV grows linearly with concurrency and length while the weights stay put, so on a linear axis the
small cells would be a flat line on the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.analysis.views import (
    BASELINE_COLUMNS,
    SWEEPS,
    Series,
    View,
    experiment_rows,
    first_column,
    ok_rows,
    oom_rows,
    peak_column,
    simulated_mask,
    sweep_series,
)
from kvray.figures import common, style
from kvray.figures.common import FigureResult
from kvray.units import byte_scale, compact_bytes

# What the notes say when a quantity has no data anywhere in the figure.
NOT_IN_DATASET = (
    ("kv_measured", "measured KV (kv_measured_bytes)"),
    ("kv_predicted", "predicted KV (kv_predicted_bytes)"),
    ("weights", "weights baseline (baseline_bytes / weights_bytes)"),
    ("peak", "measured peak memory"),
)


def fig1_mem_vs_concurrency(view: View, out_dir: Path) -> FigureResult:
    headline = "fig1 · Peak memory vs concurrency"
    return _memory_figure(view, out_dir, "fig1_mem_vs_concurrency", "exp1", "concurrent requests (log scale)", headline)


def fig4_mem_vs_seqlen(view: View, out_dir: Path) -> FigureResult:
    headline = "fig4 · Peak memory vs sequence length"
    return _memory_figure(
        view, out_dir, "fig4_mem_vs_seqlen", "exp2", "prompt tokens per request (log scale)", headline
    )


@dataclass
class _Drawn:
    """What the series put on the axes, for the legend and the notes."""

    roles: set[str] = field(default_factory=set)  # peak | weights | kv_measured | kv_predicted
    statuses: set[str] = field(default_factory=set)  # OOM statuses marked
    capacities: dict[float, list[str]] = field(default_factory=dict)  # device bytes → hardware names
    sources: set[str] = field(default_factory=set)  # which column each quantity came from
    cells_per_point: int = 1  # the most cells one drawn point stands for (common.binned)


def _memory_figure(view: View, out_dir: Path, name: str, experiment: str, xlabel: str, headline: str) -> FigureResult:
    """Memory vs what ``experiment`` sweeps (SWEEPS): one figure drawing serves fig1 and fig4."""
    rows = experiment_rows(view, experiment)
    x = SWEEPS[experiment][0]
    with common.new_figure(name, out_dir, figsize=(8.2, 4.4), title=(headline, view.context(rows))) as d:
        ax, result = d.axes, d.result
        series = sweep_series(view, experiment)
        if not series:
            d.missing(
                f"No {experiment} cells in this dataset.\nRun `kvray {experiment} …` "
                f"(uniform cells sweeping {x.replace('_', ' ')}) to fill this figure.",
                f"no {experiment} cells in this dataset",
            )
            return result
        peaks = [peak_column(ok_rows(s.rows)) for s in series]
        values = [
            float(v)
            for s, peak in zip(series, peaks, strict=True)
            for col in ((peak[0],) if peak else ()) + ("kv_predicted_bytes", "kv_measured_bytes", "baseline_bytes")
            for v in s.rows[col].dropna()
            if float(v) > 0
        ]
        scale, unit = byte_scale(max(values) if values else 1.0)
        simulated = bool(len(rows)) and bool(simulated_mask(rows).all())
        drawn = _Drawn()
        slots = common.oom_slots(series)
        for slot, (s, peak) in enumerate(zip(series, peaks, strict=True)):
            _draw_series(ax, s, x, peak, scale, slot, len(series), drawn, result)
            cap = s.rows["capacity_bytes"].dropna()
            if len(cap):
                drawn.capacities.setdefault(float(cap.iloc[0]), []).append(str(s.rows["hardware_label"].iloc[0]))
            result.oom_markers += common.mark_oom(ax, s, x, slots.get(s.label, 0))
            drawn.statuses |= set(oom_rows(s.rows)["status"])
            result.series.append(s.label)

        _capacity_lines(ax, drawn.capacities, scale)
        common.log2_axis(ax, common.x_values(rows, x), xlabel)
        if values:
            common.plain_log_y(ax)
            lo = min(values) / scale
            hi = max([max(values)] + list(drawn.capacities)) / scale
            ax.set_ylim(lo / 2, hi * 1.6)
        ax.set_ylabel(f"memory ({unit}, log scale)")
        _legend(ax, drawn, series, simulated)
        _notes(result, drawn, simulated)
        result.notes += common.binned_note(drawn.cells_per_point, x)
        result.notes += common.caption_notes(rows)
    return result


def _draw_series(
    ax: Any,
    s: Series,
    x: str,
    peak: tuple[str, str] | None,
    scale: float,
    slot: int,
    n_series: int,
    drawn: _Drawn,
    result: FigureResult,
) -> None:
    """The four memory lines of one series, each in its role's style and the series' colour and marker."""
    ok = ok_rows(s.rows)
    lines = []
    if peak is not None:
        lines.append(("peak", ok, peak[0]))
        drawn.sources.add(peak[1])
    base = first_column(ok, BASELINE_COLUMNS)
    if base is not None:
        lines.append(("weights", ok, base[0]))
        drawn.sources.add(f"baseline = {base[1]}")
    lines.append(("kv_measured", ok, "kv_measured_bytes"))
    # The prediction exists for cells that never ran too: it shows where the KV would have gone.
    lines.append(("kv_predicted", s.rows, "kv_predicted_bytes"))
    for role, part, col in lines:
        pts = part[[x, col]].dropna().astype(float)
        pts, cells = common.binned(pts[pts[col] > 0], x)
        if not len(pts):
            continue
        drawn.cells_per_point = max(drawn.cells_per_point, cells)
        kw = dict(style.ROLE_STYLES[role])
        if kw.get("marker"):  # the series' own marker, shrinking so identical series stay visible
            kw["marker"] = style.marker(s.color_index)
            kw["markersize"] = max(kw["markersize"] + 2 - 1.5 * slot, 3)
        kw["linewidth"] = max(kw["linewidth"] + 0.8 - 0.6 * slot, 0.9)
        if role in style.HALO_ROLES:
            kw.update(path_effects=style.halo(kw["linewidth"]), zorder=3 + n_series + slot)
        else:
            kw["zorder"] = 2 + slot
        ax.plot(pts[x], pts[col] / scale, color=style.color(s.color_index), gid=f"{role}-{s.color_index}", **kw)
        drawn.roles.add(role)
    if "peak" not in {r for r, _, _ in lines}:
        result.notes.append(f"{s.label}: no measured peak memory column")


def _capacity_lines(ax: Any, capacities: dict[float, list[str]], scale: float) -> None:
    """Each device's memory as a grey line, named at its right end."""
    for cap, names in capacities.items():
        ax.axhline(cap / scale, color=style.CAPACITY_COLOR, linewidth=2.2, alpha=0.55, gid="capacity")
        ax.annotate(
            f"{', '.join(sorted(set(names)))} memory {compact_bytes(cap)}",
            (0.99, cap / scale),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7.5,
            color=style.CAPACITY_COLOR,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.6},
        )


def _legend(ax: Any, drawn: _Drawn, series: list[Series], simulated: bool) -> None:
    """One legend outside the axes (the capacity lines and OOM markers need the plot area; constrained layout
    makes room for one legend only): quantities by line style, then series by colour."""
    from matplotlib.lines import Line2D

    labels = {**style.ROLE_LABELS, **({"peak": "peak (simulated)"} if simulated else {})}
    handles = [
        Line2D([], [], color="#333333", label=labels[r], **style.ROLE_STYLES[r])
        for r in style.ROLE_STYLES
        if r in drawn.roles
    ]
    if drawn.capacities:
        handles.append(Line2D([], [], color=style.CAPACITY_COLOR, linewidth=2.2, alpha=0.55, label="device memory"))
    handles += common.oom_legend_handles(drawn.statuses)
    if len(series) > 1:
        handles += [
            Line2D([], [], linestyle="none", label=""),
            Line2D([], [], linestyle="none", label="series (colour)"),
            *common.series_handles(series),
        ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="quantity (line style)",
        title_fontsize=7.5,
        alignment="left",
    )


def _notes(result: FigureResult, drawn: _Drawn, simulated: bool) -> None:
    """What is not in the dataset, and first, where each drawn quantity came from."""
    for role, missing in NOT_IN_DATASET:
        if role not in drawn.roles:
            result.notes.append(f"not in the dataset: {missing}")
    if not drawn.capacities:
        result.notes.append("no device memory size known for this hardware: no capacity line")
    if drawn.sources:
        peak_sources = sorted(x for x in drawn.sources if not x.startswith("baseline"))
        base_sources = sorted(x for x in drawn.sources if x.startswith("baseline"))
        what = "simulated peak (predicted)" if simulated else "measured peak"
        described = ([f"{what} = {', '.join(peak_sources)}"] if peak_sources else []) + base_sources
        result.notes.insert(0, "; ".join(described) + "; OOM boundary = dotted vertical line")
