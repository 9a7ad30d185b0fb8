"""fig3 and fig5: latency vs prompt length (exp2), and short requests alone vs batched with long ones (exp3).

fig3 is log-log, so a power law is a straight line whose slope is the exponent the findings fit (dotted,
labelled b = …). fig5 shows the short requests only: p50 and p99 of TTFT and E2E alone (light) and in the
mixed batch (hatched), with the ratio over each mixed bar.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kvray.analysis.findings import power_fit
from kvray.analysis.views import MixedPair, View, experiment_rows, mixed_pairs, ok_rows, oom_rows, sweep_series
from kvray.figures import common, style
from kvray.figures.common import FigureResult

FIG3_PANELS = (
    ("ttft_s", "(a) time to first token"),
    ("tpot_s", "(b) time per output token"),
    ("e2e_s", "(c) end-to-end latency"),
)


def _p50_interval(ax: Any, rows: Any, x: str, metric: str, color_index: int) -> bool:
    """The p50's 95 % bootstrap interval as error bars where the dataset records it (kvray.measure.metrics)."""
    p50, lo, hi = f"{metric}_p50", f"{metric}_p50_ci_low", f"{metric}_p50_ci_high"
    if lo not in rows.columns or hi not in rows.columns:
        return False
    pts = rows[[x, p50, lo, hi]].astype(float).dropna()
    pts = pts[pts[p50] > 0]
    if not len(pts):
        return False
    mid = pts[p50] * 1e3
    below, above = (mid - pts[lo] * 1e3).clip(lower=0), (pts[hi] * 1e3 - mid).clip(lower=0)
    ax.errorbar(
        pts[x],
        mid,
        yerr=[below, above],
        fmt="none",
        ecolor=style.color(color_index),
        capsize=2,
        linewidth=1.0,
        gid=f"ci-{metric}-{color_index}",
    )
    return True


def fig3_latency_vs_seqlen(view: View, out_dir: Path) -> FigureResult:
    rows = experiment_rows(view, "exp2")
    heading = ("fig3 · Latency vs sequence length", view.context(rows))
    with common.new_figure("fig3_latency_vs_seqlen", out_dir, 1, 3, figsize=(12.0, 4.0), title=heading) as d:
        axes, result = d.axes, d.result
        series = sweep_series(view, "exp2")
        if not series or not len(ok_rows(rows)):
            return d.no_successful_cells("exp2")
        statuses: set[str] = set()
        with_ci = False
        fits: dict[str, list[tuple[str, str]]] = {metric: [] for metric, _ in FIG3_PANELS}
        plotted: dict[str, list[float]] = {metric: [] for metric, _ in FIG3_PANELS}
        slots = common.oom_slots(series)
        per_point = 1  # the most cells one drawn point stands for (common.binned)
        for s in series:
            ok = ok_rows(s.rows)
            ringed = 0  # partial cells of this series, ringed on each panel that draws them
            for ax, (metric, _) in zip(axes, FIG3_PANELS, strict=True):
                p50, p99 = f"{metric}_p50", f"{metric}_p99"
                pts = ok[["prompt_toks", p50, p99]].astype(float).dropna(subset=[p50])
                pts = pts[pts[p50] > 0]
                if not len(pts):
                    continue
                drawn, cells = common.binned(pts, "prompt_toks")
                per_point = max(per_point, cells)
                band = common.p50_line_p99_band(ax, drawn, "prompt_toks", metric, s, f"{metric}-{s.color_index}")
                if cells == 1:  # a binned point is a median of cells: their own intervals are not its interval
                    with_ci = _p50_interval(ax, ok, "prompt_toks", metric, s.color_index) or with_ci
                ringed = max(ringed, common.mark_partial(ax, s.rows, "prompt_toks", p50, scale=1e-3))
                plotted[metric] += (pts[p50] * 1e3).tolist() + (band[p99] * 1e3).tolist()
                if pts["prompt_toks"].nunique() >= 2 and metric != "tpot_s":
                    fits[metric].append(_power_law(ax, pts, metric, s.color_index, s.label if len(series) > 1 else ""))
            result.partial_markers += ringed
            for ax in axes:
                result.oom_markers += common.mark_oom(ax, s, "prompt_toks", slots.get(s.label, 0))
            statuses |= set(oom_rows(s.rows)["status"])
            result.series.append(s.label)
        result.oom_markers //= len(axes)
        for ax, (metric, title) in zip(axes, FIG3_PANELS, strict=True):
            common.log2_axis(ax, common.x_values(rows, "prompt_toks"), "prompt tokens (log scale)")
            if metric == "tpot_s":
                common.auto_y(ax, plotted[metric], "ms")
            elif plotted[metric]:  # log-log: a power law is a straight line, its slope the exponent
                common.plain_log_y(ax)
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
        handles = common.series_handles(series) + common.oom_legend_handles(statuses)
        handles += common.partial_legend_handles(result.partial_markers)
        axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never over data
        result.notes.append("line: p50 over all requests and repeats; band: p50–p99; dotted: log-log fit ∝ L^b")
        if with_ci:
            result.notes.append("error bars: the p50's 95 % bootstrap interval (over repeats, then requests)")
        result.notes += common.binned_note(per_point, "prompt_toks")
        result.notes += common.caption_notes(rows)
    return result


def _power_law(ax: Any, pts: Any, metric: str, color_index: int, label: str) -> tuple[str, str]:
    """The log-log fit of ``metric``'s p50 vs prompt length, dotted; returns (colour, "b = … label")."""
    c = style.color(color_index)
    b, a, _ = power_fit(pts["prompt_toks"], pts[f"{metric}_p50"])
    xs = np.geomspace(pts["prompt_toks"].min(), pts["prompt_toks"].max(), 50)
    ax.plot(xs, a * xs**b * 1e3, color=c, linestyle=":", linewidth=1.0, gid=f"fit-{metric}")
    return c, f"b = {b:.2f}" + (f"  {label}" if label else "")


def fig5_mixed_lengths_latency(view: View, out_dir: Path) -> FigureResult:
    rows = experiment_rows(view, "exp3")
    heading = ("fig5 · Short requests alone vs batched with long ones", view.context(rows))
    with common.new_figure("fig5_mixed_lengths_latency", out_dir, 1, 2, figsize=(11.0, 4.2), title=heading) as d:
        axes, result = d.axes, d.result
        pairs = mixed_pairs(view)
        if not pairs:
            why = (
                "No exp3 cells in this dataset"
                if not len(rows)
                else "No exp3 mixed cell with a matching short-only cell"
            )
            d.missing(f"{why}:\nrun `kvray exp3 --short 128 --long 4096 …` to fill it.", why[0].lower() + why[1:])
            result.notes += common.caption_notes(rows)
            style.footnote(d.fig, result.notes)  # unlike other empty figures: it may name error cells too
            return result
        for ax, metric, title in ((axes[0], "ttft_s", "(a) time to first token"), (axes[1], "e2e_s", "(b) end-to-end")):
            _mixed_bars(ax, pairs, metric)
            ax.set_title(title)
        # Right of the panels, clear of the bars, the title and the notes.
        axes[1].legend(handles=_mixed_handles(pairs), loc="upper left", bbox_to_anchor=(1.02, 1.0))
        result.series += [p.series for p in pairs]
        result.notes.append("bars: latency of the short requests only, pooled over repeats; ×N = mixed / alone")
        result.notes += common.caption_notes(rows)
    return result


def _mixed_bars(ax: Any, pairs: list[MixedPair], metric: str) -> None:
    """p50 and p99 of ``metric`` for each pair: alone (light), mixed (hatched, ×ratio on top)."""
    groups = ("p50", "p99")
    width = 0.8 / (2 * len(pairs))
    tops = []
    for j, p in enumerate(pairs):
        for k, (kind, stats, hatch, alpha) in enumerate((("alone", p.alone, "", 0.45), ("mixed", p.mixed, "//", 1.0))):
            xs = np.arange(len(groups)) - 0.4 + width * (2 * j + k + 0.5)
            ys = [stats.get(f"{metric}_{g}", math.nan) * 1e3 for g in groups]
            bars = ax.bar(
                xs,
                ys,
                width * 0.95,
                color=style.color(p.color_index),
                alpha=alpha,
                hatch=hatch,
                edgecolor="#333333",
                linewidth=0.5,
                gid=f"bar-{kind}-{metric}-{j}",
            )
            tops += ys
            if kind != "mixed":
                continue
            for bar, g in zip(bars, groups, strict=True):
                ratio = p.ratio(f"{metric}_{g}")
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
    common.auto_y(ax, tops, "ms", span=50, headroom=1.18)
    ax.grid(axis="x", visible=False)


def _mixed_handles(pairs: list[MixedPair]) -> list[Any]:
    """Legend patches: each pair's short requests alone, and the same beside the long ones."""
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
    return handles
