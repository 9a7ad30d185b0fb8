"""Every figure, drawn from a results folder alone (no Ray, no torch): ``make_figures(results_dir)``.

fig1_mem_vs_concurrency      exp1 memory: measured peak, weights baseline, measured and predicted KV,
                             the GPU's capacity, OOM cells marked on the x axis
fig2_tps_vs_concurrency      exp1 output throughput (min–max over repeats) and TPOT p50–p99
fig3_latency_vs_seqlen       exp2 TTFT, TPOT and E2E vs prompt length, log-log, with the fitted exponent
fig4_mem_vs_seqlen           exp2 memory, as fig1
fig5_mixed_lengths_latency   exp3 short requests alone vs batched with long ones: p50/p99 TTFT and E2E
fig6_cross_hardware          the same cells on each GPU type: throughput, latency, throughput per GB of KV
fig7_kv_predicted_vs_measured  predicted vs measured KV with y = x, and the error of each cell

A figure without the data it needs is still written, saying what is missing; one figure failing never
stops the others. Each call returns what it drew (series, OOM markers, notes), which the tests check.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvray.analysis.findings import (
    BASELINE_COLUMNS,
    OOM_LABELS,
    OOM_STATUSES,
    PEAK_COLUMNS,
    Series,
    View,
    experiment_rows,
    first_column,
    mixed_pairs,
    ok_rows,
    oom_rows,
    power_fit,
    prepare,
    repeat_throughput,
    split_series,
)
from kvray.figures import style

log = logging.getLogger(__name__)

FIGURES = (
    "fig1_mem_vs_concurrency",
    "fig2_tps_vs_concurrency",
    "fig3_latency_vs_seqlen",
    "fig4_mem_vs_seqlen",
    "fig5_mixed_lengths_latency",
    "fig6_cross_hardware",
    "fig7_kv_predicted_vs_measured",
)
FIGURES_DIR = "figures"
OOM_MARKERS = {"oom": "X", "skipped_after_oom": "X", "refused": "v"}
HOLLOW_OOM = ("skipped_after_oom",)  # drawn hollow: it did not run, it was judged by an OOM that did


@dataclass
class FigureResult:
    """What one figure shows: the tests and the report read this instead of guessing from pixels."""

    name: str
    paths: list[Path] = field(default_factory=list)
    series: list[str] = field(default_factory=list)  # legend labels of the data series drawn
    oom_markers: int = 0  # cells marked on an axis as OOM / skipped after OOM / refused
    notes: list[str] = field(default_factory=list)  # what is missing or approximated, shown under the figure
    empty: bool = False  # no panel had data
    caption: str = ""


def make_figures(results_dir: str | Path, out_dir: str | Path | None = None) -> list[FigureResult]:
    """Load a results folder and write every figure (PNG 300 dpi + SVG) into ``out_dir`` (default
    RESULTS_DIR/figures)."""
    from kvray.data.store import load_dataset

    cells, traces, _ = load_dataset(results_dir)
    target = Path(out_dir) if out_dir is not None else Path(results_dir) / FIGURES_DIR
    return plot_view(prepare(cells, traces), target)


def plot_view(view: View, out_dir: Path) -> list[FigureResult]:
    """Every figure of FIGURES from a prepared View; a figure that fails is replaced by one saying why."""
    results = []
    with style.styled():
        for name in FIGURES:
            draw = globals()[name]  # looked up by name: the figure's file and its function share it
            try:
                results.append(draw(view, out_dir))
            except Exception as exc:  # one bad figure must not cost the others
                log.warning("%s failed: %s", name, exc, exc_info=True)
                results.append(_failed_figure(name, exc, out_dir))
    return results


def _failed_figure(name: str, exc: Exception, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    style.placeholder(ax, f"{name} could not be drawn from this dataset:\n{type(exc).__name__}: {exc}"[:300])
    return FigureResult(name, style.save(fig, out_dir, name), notes=[f"could not draw: {exc}"], empty=True)


# ---------------------------------------------------------------- shared pieces


def _log2_axis(ax: Any, values: Any, label: str) -> None:
    """A log2 x axis ticked at the swept values, when they span at least 4×; linear otherwise."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    vals = sorted({float(v) for v in values if v == v and v > 0})
    if vals and vals[-1] / vals[0] >= 4:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(vals))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlim(vals[0] / 1.3, vals[-1] * 1.3)
    elif vals:
        ax.set_xticks(vals)
        pad = max((vals[-1] - vals[0]) * 0.08, 0.5)
        ax.set_xlim(vals[0] - pad, vals[-1] + pad)
    ax.set_xlabel(label)


def _plain_log_y(ax: Any) -> None:
    """Log y with plain numbers (0.1, 1, 10 — not 10⁻¹); minor ticks labelled when under two decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 20 else NullFormatter())


def _auto_y(ax: Any, values: list[float], unit: str) -> None:
    """Log y where the values span more than 4× (growth is multiplicative), linear from 0 otherwise."""
    finite = [v for v in values if v == v and v > 0]
    if finite and max(finite) / min(finite) > 4:
        _plain_log_y(ax)
        ax.set_ylabel(f"{unit} (log scale)")
    else:
        ax.set_ylim(0, (max(finite) if finite else 1) * 1.15)
        ax.set_ylabel(unit)


def _oom_slots(series: list[Series]) -> dict[str, int]:
    """Stacking order of the series that have OOM cells (others need no room on the axis)."""
    having = [s.label for s in series if len(oom_rows(s.rows))]
    return {label: i for i, label in enumerate(having)}


def _mark_oom(ax: Any, series: Series, x: str, slot: int = 0) -> int:
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


def _oom_legend_handles(statuses: set[str]) -> list[Any]:
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


def _series_handles(series: list[Series]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=style.color(s.color_index), marker=style.marker(s.color_index), label=s.label)
        for s in series
    ]


def _x_values(rows: Any, x: str) -> Any:
    """The x values to tick: cells that ran or ran out of memory (an error cell is no result)."""
    return rows[rows["status"] != "error"][x]


def _caption_notes(view: View, rows: Any) -> list[str]:
    notes = []
    errors = rows[rows["status"] == "error"]
    if len(errors):
        reasons = sorted({str(r)[:80] for r in errors["reason"].dropna()})
        notes.append(f"{len(errors)} cell(s) failed with an error and are not drawn: {'; '.join(reasons[:2])}")
    return notes


# ---------------------------------------------------------------- memory figures (fig1, fig4)


def _memory_figure(
    view: View, out_dir: Path, name: str, experiment: str, x: str, xlabel: str, extra: tuple[str, ...], headline: str
) -> FigureResult:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = experiment_rows(view, experiment)
    result = FigureResult(name)
    fig, ax = plt.subplots(figsize=(8.2, 4.4), layout="constrained")
    style.figure_title(fig, headline, view.context(rows))
    series = split_series(view, rows, x, extra)
    if not series:
        style.placeholder(
            ax,
            f"No {experiment} cells in this dataset.\nRun `kvray {experiment} …` "
            f"(uniform cells sweeping {x.replace('_', ' ')}) to fill this figure.",
        )
        result.notes.append(f"no {experiment} cells in this dataset")
        result.empty = True
        result.paths = style.save(fig, out_dir, name)
        return result

    peaks = [first_column(ok_rows(s.rows), PEAK_COLUMNS) for s in series]
    values = [
        float(v)
        for s, peak in zip(series, peaks, strict=True)
        for col in ((peak[0],) if peak else ()) + ("kv_predicted_bytes", "kv_measured_bytes", "baseline_bytes")
        for v in s.rows[col].dropna()
        if float(v) > 0
    ]
    scale, unit = style.byte_scale(max(values) if values else 1.0)
    simulated = bool(len(rows)) and bool(rows["simulated"].fillna(False).astype(bool).all())
    roles_drawn: set[str] = set()
    statuses: set[str] = set()
    capacities: dict[float, list[str]] = {}
    sources: set[str] = set()
    slots = _oom_slots(series)
    for slot, (s, peak) in enumerate(zip(series, peaks, strict=True)):
        c = style.color(s.color_index)
        ok = ok_rows(s.rows)
        lines = []
        if peak is not None:
            lines.append(("peak", ok, peak[0]))
            sources.add(peak[1])
        base = first_column(ok, BASELINE_COLUMNS)
        if base is not None:
            lines.append(("weights", ok, base[0]))
            sources.add(f"baseline = {base[1]}")
        lines.append(("kv_measured", ok, "kv_measured_bytes"))
        # The prediction exists for cells that never ran too: it shows where the KV would have gone.
        lines.append(("kv_predicted", s.rows, "kv_predicted_bytes"))
        for role, part, col in lines:
            pts = part[[x, col]].dropna().astype(float)
            pts = pts[pts[col] > 0]
            if not len(pts):
                continue
            kw = dict(style.ROLE_STYLES[role])
            if kw.get("marker"):  # the series' own marker, shrinking so identical series stay visible
                kw["marker"] = style.marker(s.color_index)
                kw["markersize"] = max(kw["markersize"] + 2 - 1.5 * slot, 3)
            kw["linewidth"] = max(kw["linewidth"] + 0.8 - 0.6 * slot, 0.9)
            if role in style.HALO_ROLES:
                kw.update(path_effects=style.halo(kw["linewidth"]), zorder=3 + len(series) + slot)
            else:
                kw["zorder"] = 2 + slot
            ax.plot(pts[x], pts[col] / scale, color=c, gid=f"{role}-{s.color_index}", **kw)
            roles_drawn.add(role)
        if "peak" not in {r for r, _, _ in lines}:
            result.notes.append(f"{s.label}: no measured peak memory column")
        cap = s.rows["capacity_bytes"].dropna()
        if len(cap):
            capacities.setdefault(float(cap.iloc[0]), []).append(str(s.rows["hardware_label"].iloc[0]))
        result.oom_markers += _mark_oom(ax, s, x, slots.get(s.label, 0))
        statuses |= set(oom_rows(s.rows)["status"])
        result.series.append(s.label)

    for cap, names in capacities.items():
        ax.axhline(cap / scale, color=style.CAPACITY_COLOR, linewidth=2.2, alpha=0.55, gid="capacity")
        ax.annotate(
            f"{', '.join(sorted(set(names)))} memory {style.compact_bytes(cap)}",
            (0.99, cap / scale),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7.5,
            color=style.CAPACITY_COLOR,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.6},
        )
    _log2_axis(ax, _x_values(rows, x), xlabel)
    if values:
        _plain_log_y(ax)
        lo = min(values) / scale
        hi = max([max(values)] + list(capacities)) / scale
        ax.set_ylim(lo / 2, hi * 1.6)
    ax.set_ylabel(f"memory ({unit}, log scale)")

    labels = {**style.ROLE_LABELS, **({"peak": "peak (simulated)"} if simulated else {})}
    role_handles = [
        Line2D([], [], color="#333333", label=labels[r], **style.ROLE_STYLES[r])
        for r in style.ROLE_STYLES
        if r in roles_drawn
    ]
    if capacities:
        role_handles.append(
            Line2D([], [], color=style.CAPACITY_COLOR, linewidth=2.2, alpha=0.55, label="device memory")
        )
    role_handles += _oom_legend_handles(statuses)
    # One legend outside the axes (the capacity lines and OOM markers need the plot area; constrained
    # layout makes room for one legend only): quantities by line style, then series by colour.
    handles = role_handles
    if len(series) > 1:
        handles = [
            *role_handles,
            Line2D([], [], linestyle="none", label=""),
            Line2D([], [], linestyle="none", label="series (colour)"),
            *_series_handles(series),
        ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="quantity (line style)",
        title_fontsize=7.5,
        alignment="left",
    )
    for role, missing in (
        ("kv_measured", "measured KV (kv_measured_bytes)"),
        ("kv_predicted", "predicted KV (kv_predicted_bytes)"),
        ("weights", "weights baseline (baseline_bytes / weights_bytes)"),
        ("peak", "measured peak memory"),
    ):
        if role not in roles_drawn:
            result.notes.append(f"not in the dataset: {missing}")
    if not capacities:
        result.notes.append("no device memory size known for this hardware: no capacity line")
    if sources:
        peak_sources = sorted(x for x in sources if not x.startswith("baseline"))
        base_sources = sorted(x for x in sources if x.startswith("baseline"))
        what = "simulated peak (predicted)" if simulated else "measured peak"
        described = ([f"{what} = {', '.join(peak_sources)}"] if peak_sources else []) + base_sources
        result.notes.insert(0, "; ".join(described) + "; OOM boundary = dotted vertical line")
    result.notes += _caption_notes(view, rows)
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result


def fig1_mem_vs_concurrency(view: View, out_dir: Path) -> FigureResult:
    return _memory_figure(
        view,
        out_dir,
        "fig1_mem_vs_concurrency",
        "exp1",
        "concurrency",
        "concurrent requests (log scale)",
        ("prompt_toks", "gen_toks"),
        "fig1 · Peak memory vs concurrency",
    )


def fig4_mem_vs_seqlen(view: View, out_dir: Path) -> FigureResult:
    return _memory_figure(
        view,
        out_dir,
        "fig4_mem_vs_seqlen",
        "exp2",
        "prompt_toks",
        "prompt tokens per request (log scale)",
        ("concurrency", "gen_toks"),
        "fig4 · Peak memory vs sequence length",
    )


# ---------------------------------------------------------------- fig2: throughput vs concurrency


def fig2_tps_vs_concurrency(view: View, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "fig2_tps_vs_concurrency"
    rows = experiment_rows(view, "exp1")
    result = FigureResult(name)
    fig, (ax_tps, ax_tpot) = plt.subplots(1, 2, figsize=(9.5, 4.0), layout="constrained")
    style.figure_title(fig, "fig2 · Throughput and per-token latency vs concurrency", view.context(rows))
    series = split_series(view, rows, "concurrency", ("prompt_toks", "gen_toks"))
    if not series or not len(ok_rows(rows)):
        for ax in (ax_tps, ax_tpot):
            style.placeholder(ax, "No successful exp1 cells in this dataset:\nrun `kvray exp1 …` to fill it.")
        result.notes.append("no successful exp1 cells in this dataset")
        result.empty = True
        result.paths = style.save(fig, out_dir, name)
        return result
    statuses: set[str] = set()
    repeats_seen = 1
    slots = _oom_slots(series)
    for s in series:
        c, m = style.color(s.color_index), style.marker(s.color_index)
        ok = ok_rows(s.rows)
        pts = ok[["concurrency", "output_tps", "cell_id"]].dropna(subset=["output_tps"])
        lows, highs = [], []
        for _, r in pts.iterrows():
            per_repeat = repeat_throughput(view, str(r["cell_id"]))
            repeats_seen = max(repeats_seen, len(per_repeat))
            mean = float(r["output_tps"])
            if len(per_repeat) > 1:
                lows.append(max(0.0, mean - min(per_repeat)))  # ≥ 0: float noise on equal repeats
                highs.append(max(0.0, max(per_repeat) - mean))
            else:
                lows.append(0.0)
                highs.append(0.0)
        if len(pts):
            ax_tps.errorbar(
                pts["concurrency"].astype(float),
                pts["output_tps"].astype(float),
                yerr=[lows, highs] if any(lows) or any(highs) else None,
                color=c,
                marker=m,
                capsize=3,
                label=s.label,
                gid=f"tps-{s.color_index}",
            )
        tp = ok[["concurrency", "tpot_s_p50", "tpot_s_p99"]].dropna(subset=["tpot_s_p50"]).astype(float)
        if len(tp):
            ax_tpot.plot(
                tp["concurrency"], tp["tpot_s_p50"] * 1e3, color=c, marker=m, label=s.label, gid=f"tpot-{s.color_index}"
            )
            band = tp.dropna()
            if len(band):
                ax_tpot.fill_between(
                    band["concurrency"],
                    band["tpot_s_p50"] * 1e3,
                    band["tpot_s_p99"] * 1e3,
                    color=c,
                    alpha=0.18,
                    linewidth=0,
                )
        for ax in (ax_tps, ax_tpot):
            result.oom_markers += _mark_oom(ax, s, "concurrency", slots.get(s.label, 0))
        statuses |= set(oom_rows(s.rows)["status"])
        result.series.append(s.label)
    result.oom_markers //= 2  # the same cells are marked on both panels
    for ax in (ax_tps, ax_tpot):
        _log2_axis(ax, _x_values(rows, "concurrency"), "concurrent requests (log scale)")
    ax_tps.set_ylabel("output throughput (tokens/s)")
    ax_tps.set_ylim(bottom=0)
    ax_tps.set_title("(a) aggregate output throughput")
    ax_tpot.set_ylabel("time per output token (ms)")
    ax_tpot.set_ylim(bottom=0)
    ax_tpot.set_title("(b) TPOT: line p50, band p50–p99")
    handles = _series_handles(series) + _oom_legend_handles(statuses)
    ax_tps.legend(handles=handles, loc="best")
    if repeats_seen > 1:
        result.notes.append(f"error bars: min–max of output throughput over {repeats_seen} repeats (point = mean)")
    else:
        result.notes.append("one repeat per cell: no error bars")
    result.notes += _caption_notes(view, rows)
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result


# ---------------------------------------------------------------- fig3: latency vs seqlen


def fig3_latency_vs_seqlen(view: View, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "fig3_latency_vs_seqlen"
    rows = experiment_rows(view, "exp2")
    result = FigureResult(name)
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.0), layout="constrained")
    style.figure_title(fig, "fig3 · Latency vs sequence length", view.context(rows))
    series = split_series(view, rows, "prompt_toks", ("concurrency", "gen_toks"))
    if not series or not len(ok_rows(rows)):
        for ax in axes:
            style.placeholder(ax, "No successful exp2 cells in this dataset:\nrun `kvray exp2 …` to fill it.")
        result.notes.append("no successful exp2 cells in this dataset")
        result.empty = True
        result.paths = style.save(fig, out_dir, name)
        return result
    statuses: set[str] = set()
    panels = (
        ("ttft_s", "(a) time to first token"),
        ("tpot_s", "(b) time per output token"),
        ("e2e_s", "(c) end-to-end latency"),
    )
    fits: dict[str, list[tuple[str, str]]] = {metric: [] for metric, _ in panels}
    plotted: dict[str, list[float]] = {metric: [] for metric, _ in panels}
    slots = _oom_slots(series)
    for s in series:
        c, m = style.color(s.color_index), style.marker(s.color_index)
        ok = ok_rows(s.rows)
        for ax, (metric, _) in zip(axes, panels, strict=True):
            cols = ["prompt_toks", f"{metric}_p50", f"{metric}_p99"]
            pts = ok[cols].astype(float).dropna(subset=[cols[1]])
            pts = pts[pts[cols[1]] > 0]
            if not len(pts):
                continue
            ax.plot(
                pts["prompt_toks"],
                pts[cols[1]] * 1e3,
                color=c,
                marker=m,
                label=s.label,
                gid=f"{metric}-{s.color_index}",
            )
            band = pts.dropna()
            if len(band):
                ax.fill_between(
                    band["prompt_toks"], band[cols[1]] * 1e3, band[cols[2]] * 1e3, color=c, alpha=0.18, linewidth=0
                )
            plotted[metric] += (pts[cols[1]] * 1e3).tolist() + (band[cols[2]] * 1e3).tolist()
            if pts["prompt_toks"].nunique() >= 2 and metric != "tpot_s":
                b, a, _ = power_fit(pts["prompt_toks"], pts[cols[1]])
                xs = np.geomspace(pts["prompt_toks"].min(), pts["prompt_toks"].max(), 50)
                ax.plot(xs, a * xs**b * 1e3, color=c, linestyle=":", linewidth=1.0, gid=f"fit-{metric}")
                fits[metric].append((c, f"b = {b:.2f}" + (f"  {s.label}" if len(series) > 1 else "")))
        for ax in axes:
            result.oom_markers += _mark_oom(ax, s, "prompt_toks", slots.get(s.label, 0))
        statuses |= set(oom_rows(s.rows)["status"])
        result.series.append(s.label)
    result.oom_markers //= len(axes)
    for ax, (metric, title) in zip(axes, panels, strict=True):
        _log2_axis(ax, _x_values(rows, "prompt_toks"), "prompt tokens (log scale)")
        if metric == "tpot_s":
            _auto_y(ax, plotted[metric], "ms")
        elif plotted[metric]:  # log-log: a power law is a straight line, its slope the exponent
            _plain_log_y(ax)
            ax.set_ylabel("ms (log scale)")
        ax.set_title(title)
        for k, (c, text) in enumerate(fits[metric]):  # the fitted exponents, top left (log-log lines rise)
            ax.text(
                0.03,
                0.96 - 0.07 * k,
                text,
                transform=ax.transAxes,
                ha="left",
                va="top",
                fontsize=7.5,
                color=c,
                gid="fit-label",
            )
    handles = _series_handles(series) + _oom_legend_handles(statuses)
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never over data
    result.notes.append("line: p50 over all requests and repeats; band: p50–p99; dotted: log-log fit ∝ L^b")
    result.notes += _caption_notes(view, rows)
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result


# ---------------------------------------------------------------- fig5: mixed lengths


def fig5_mixed_lengths_latency(view: View, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "fig5_mixed_lengths_latency"
    rows = experiment_rows(view, "exp3")
    result = FigureResult(name)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained")
    style.figure_title(fig, "fig5 · Short requests alone vs batched with long ones", view.context(rows))
    pairs = mixed_pairs(view)
    if not pairs:
        why = "No exp3 cells in this dataset" if not len(rows) else "No exp3 mixed cell with a matching short-only cell"
        for ax in axes:
            style.placeholder(ax, f"{why}:\nrun `kvray exp3 --short 128 --long 4096 …` to fill it.")
        result.notes.insert(0, why[0].lower() + why[1:])
        result.empty = True
        result.notes += _caption_notes(view, rows)
        style.footnote(fig, result.notes)
        result.paths = style.save(fig, out_dir, name)
        return result
    groups = ("p50", "p99")
    width = 0.8 / (2 * len(pairs))
    for ax, metric, title in ((axes[0], "ttft_s", "(a) time to first token"), (axes[1], "e2e_s", "(b) end-to-end")):
        tops = []
        for j, p in enumerate(pairs):
            c = style.color(p.color_index)
            for k, (kind, stats, hatch, alpha) in enumerate(
                (("alone", p.alone, "", 0.45), ("mixed", p.mixed, "//", 1.0))
            ):
                xs = np.arange(len(groups)) - 0.4 + width * (2 * j + k + 0.5)
                ys = [stats.get(f"{metric}_{g}", math.nan) * 1e3 for g in groups]
                bars = ax.bar(
                    xs,
                    ys,
                    width * 0.95,
                    color=c,
                    alpha=alpha,
                    hatch=hatch,
                    edgecolor="#333333",
                    linewidth=0.5,
                    gid=f"bar-{kind}-{metric}-{j}",
                )
                tops += ys
                if kind == "mixed":
                    for bar, g in zip(bars, groups, strict=True):
                        base = p.alone.get(f"{metric}_{g}", math.nan)
                        ratio = stats.get(f"{metric}_{g}", math.nan) / base if base else math.nan
                        if ratio == ratio:
                            ax.annotate(
                                f"×{ratio:.1f}",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                textcoords="offset points",
                                xytext=(0, 2),
                                ha="center",
                                fontsize=7,
                            )
        ax.set_xticks(np.arange(len(groups)), [f"{g}" for g in groups])
        ax.set_ylabel("ms")
        ax.set_title(title)
        finite = [t for t in tops if t == t and t > 0]
        if finite and max(finite) / min(finite) > 50:
            _plain_log_y(ax)
            ax.set_ylabel("ms (log scale)")
        else:
            ax.set_ylim(0, (max(finite) if finite else 1) * 1.18)
        ax.grid(axis="x", visible=False)
    from matplotlib.patches import Patch

    handles = []
    for p in pairs:
        c = style.color(p.color_index)
        prefix = f"{p.series}: " if len(pairs) > 1 else ""
        handles.append(
            Patch(facecolor=c, alpha=0.45, edgecolor="#333333", label=f"{prefix}{p.n_short} × {p.short_toks} tok alone")
        )
        handles.append(
            Patch(
                facecolor=c,
                hatch="//",
                edgecolor="#333333",
                label=f"{prefix}same + {p.n_long} × {p.long_toks} tok (mixed)",
            )
        )
        result.series.append(p.series)
    # Right of the panels, clear of the bars, the title and the notes.
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    result.notes.append("bars: latency of the short requests only, pooled over repeats; ×N = mixed / alone")
    result.notes += _caption_notes(view, rows)
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result


# ---------------------------------------------------------------- fig6: cross hardware

SHAPE_KEYS = ("experiment", "model", "backend", "dtype", "kv_dtype", "workload", "prompt_toks_list", "gen_toks")
MAX_SHAPES = 24


def _shape_label(row: Any, varying: set[str]) -> str:
    lengths = str(row["prompt_toks_list"]).split(",")
    shape = f"c{int(row['concurrency'])} p{row['prompt_toks']:.0f}"
    if row["workload"] == "mixed":
        shape = f"{len(lengths)} mixed {min(map(int, lengths))}/{max(map(int, lengths))}"
    parts = [str(row["experiment"])] if row["experiment"] else []
    parts += [str(row[k]) for k in ("model", "backend", "dtype") if k in varying]
    return " ".join(parts + [shape])


def fig6_cross_hardware(view: View, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "fig6_cross_hardware"
    cells = view.cells
    result = FigureResult(name)
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 9.0), layout="constrained")
    style.figure_title(fig, "fig6 · The same cells on each GPU type", view.context(cells))
    hardware = sorted({str(h) for h in cells["hardware_label"]}) if len(cells) else []
    keyed = cells.assign(_shape=cells[list(SHAPE_KEYS)].astype(str).agg("|".join, axis=1)) if len(cells) else cells
    shared: list[str] = []
    if len(hardware) > 1:
        per_shape = keyed.groupby("_shape")["hardware_label"].nunique()
        has_ok = set(ok_rows(keyed)["_shape"])
        shared = [s for s in per_shape[per_shape > 1].index if s in has_ok]
    if len(hardware) < 2 or not shared:
        why = (
            f"needs the same cells on at least two hardware types; this dataset has {', '.join(hardware) or 'none'}"
            if len(hardware) < 2
            else "no cell shape was run on more than one hardware type"
        )
        for ax in axes:
            style.placeholder(
                ax,
                f"No cross-hardware comparison: {why}.\nRun with `--hardware each` (or a job "
                "listing several GPU types) to fill it.",
            )
        result.empty = True
        result.notes.append(why)
        result.paths = style.save(fig, out_dir, name)
        return result
    sub = keyed[keyed["_shape"].isin(shared)]
    first = sub.sort_values(["experiment", "concurrency", "prompt_toks"]).drop_duplicates("_shape")
    order = first["_shape"].tolist()
    if len(order) > MAX_SHAPES:
        result.notes.append(f"showing {MAX_SHAPES} of {len(order)} shared cell shapes (evenly spaced)")
        order = [order[int(i)] for i in np.linspace(0, len(order) - 1, MAX_SHAPES)]
    fig.set_figwidth(max(7.0, 1.5 + 0.65 * len(order) * max(1.0, len({str(h) for h in sub["hardware_label"]}) / 3)))
    varying = {k for k in ("model", "backend", "dtype") if sub[k].nunique() > 1}
    labels = [_shape_label(first.set_index("_shape").loc[s], varying) for s in order]
    hw_here = sorted({str(h) for h in sub["hardware_label"]})
    width = 0.8 / len(hw_here)
    kv = sub["kv_measured_bytes"].astype(float).fillna(sub["kv_predicted_bytes"].astype(float))
    sub = sub.assign(_tps_per_gb=sub["output_tps"].astype(float) / (kv / 1e9))
    panels = (
        ("output_tps", "output tokens/s", "(a) output throughput"),
        ("e2e_s_p50", "E2E p50 (s)", "(b) end-to-end latency p50"),
        ("_tps_per_gb", "tokens/s per GB of KV", "(c) throughput per GB of KV cache"),
    )
    for ax, (col, ylabel, title) in zip(axes, panels, strict=True):
        drawn: list[float] = []
        for h_i, hw in enumerate(hw_here):
            c = style.color(h_i)
            part = sub[sub["hardware_label"] == hw].set_index("_shape")
            xs = np.arange(len(order)) - 0.4 + width * (h_i + 0.5)
            ys, ooms = [], []
            for j, shape in enumerate(order):
                row = part.loc[shape] if shape in part.index else None
                if row is not None and getattr(row, "ndim", 1) > 1:
                    row = row.iloc[0]
                if row is not None and row["status"] == "ok":
                    ys.append(float(row[col]))
                else:
                    ys.append(math.nan)
                    if row is not None and row["status"] in OOM_STATUSES:
                        ooms.append(j)
            ax.bar(xs, ys, width * 0.95, color=c, label=hw, gid=f"bar-{col}-{hw}")
            drawn += ys
            for j in ooms:
                ax.annotate(
                    "OOM",
                    (xs[j], 0),
                    xycoords=("data", "axes fraction"),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    color=style.OOM_COLOR,
                    fontweight="bold",
                    gid="oom-marker",
                )
                if ax is axes[0]:
                    result.oom_markers += 1
        finite = [v for v in drawn if v == v and v > 0]
        if finite and max(finite) / min(finite) > 50:  # e.g. tokens/s per GB: small cells dwarf the rest
            _plain_log_y(ax)
            ylabel += " (log scale)"
        ax.set_ylabel(ylabel)
        ax.set_title(title, loc="left")
        ax.set_xticks(np.arange(len(order)), labels if ax is axes[-1] else [""] * len(order), rotation=30, ha="right")
        ax.grid(axis="x", visible=False)
    axes[0].legend(title="hardware", loc="upper left", bbox_to_anchor=(1.005, 1.0))
    result.series = hw_here
    if kv.isna().all():
        result.notes.append("panel (c) needs kv_measured_bytes or kv_predicted_bytes: not in the dataset")
    result.notes.append("KV per cell: measured where recorded, else predicted; OOM: the cell did not fit that GPU")
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result


# ---------------------------------------------------------------- fig7: KV predicted vs measured


def fig7_kv_predicted_vs_measured(view: View, out_dir: Path) -> FigureResult:
    import matplotlib.pyplot as plt

    name = "fig7_kv_predicted_vs_measured"
    cells = view.cells
    rows = cells[(cells["kv_measured_bytes"].astype(float) > 0) & (cells["kv_predicted_bytes"].astype(float) > 0)]
    result = FigureResult(name)
    fig, (ax, ax_err) = plt.subplots(
        1, 2, figsize=(10.0, 4.4), layout="constrained", gridspec_kw={"width_ratios": [1, 1.3]}
    )
    style.figure_title(fig, "fig7 · KV cache: predicted vs measured", view.context(rows if len(rows) else cells))
    if not len(rows):
        missing = [c for c in ("kv_measured_bytes", "kv_predicted_bytes") if c in view.missing_columns]
        why = f"columns missing: {', '.join(missing)}" if missing else "no cell has both measured and predicted KV"
        for a in (ax, ax_err):
            style.placeholder(a, f"No KV comparison: {why}.")
        result.empty = True
        result.notes.append(why)
        result.paths = style.save(fig, out_dir, name)
        return result
    series = split_series(view, rows, "kv_predicted_bytes")
    top = float(max(rows["kv_measured_bytes"].max(), rows["kv_predicted_bytes"].max()))
    bottom = float(min(rows["kv_measured_bytes"].min(), rows["kv_predicted_bytes"].min()))
    scale, unit = style.byte_scale(top)
    lo, hi = bottom / scale / 1.8, top / scale * 1.8
    ax.plot([lo, hi], [lo, hi], color="#555555", linestyle="--", linewidth=1.0, label="y = x", gid="identity")
    ordered = rows.sort_values(["kv_predicted_bytes", "kv_measured_bytes"]).reset_index(drop=True)
    for s in series:
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
        ax_err.plot(idx, err_pct, linestyle="none", marker=m, color=c, markersize=5, gid=f"kv-error-{s.color_index}")
        result.series.append(s.label)
    no_measure = sorted(
        {view.series_label(r) for _, r in ok_rows(cells).iterrows() if not (float(r["kv_measured_bytes"]) > 0)}
        - set(result.series)
    )
    if no_measure:
        result.notes.append(f"no measured KV recorded for: {', '.join(no_measure)}")
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
    ax_err.axhline(0, color="#555555", linewidth=0.8)
    ax_err.set_ylabel("(measured − predicted) / predicted (%)")
    ax_err.set_title("(b) error per cell, sorted by predicted KV")
    shapes = [f"c{int(r.concurrency)} p{int(r.prompt_toks)}" for r in ordered.itertuples()]
    if len(ordered) <= 24:
        ax_err.set_xticks(range(len(ordered)), shapes, rotation=60, ha="right", fontsize=6.5)
    else:
        ax_err.set_xlabel(f"{len(ordered)} cells")
        ax_err.set_xticks([])
    ax_err.grid(axis="x", visible=False)
    err = ordered["kv_rel_error"].astype(float)
    limit = max(float(err.abs().max()) * 100 * 1.25, 1.0)
    ax_err.set_ylim(-limit, limit)
    result.notes.append(f"{len(rows)} cells; mean |error| {err.abs().mean():.2%}, max |error| {err.abs().max():.2%}")
    style.footnote(fig, result.notes)
    result.paths = style.save(fig, out_dir, name)
    return result
