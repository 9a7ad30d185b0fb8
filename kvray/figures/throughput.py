"""fig2: output throughput and time per output token vs concurrency (exp1).

Throughput is the mean over repeats with the min–max of the repeats as error bars (from the traces) and, as
light wide bars behind them, the 95 % interval of the mean (Student's t, the dataset's ``output_tps_ci_low/high``),
so a plateau is told from noise; TPOT is the p50 line with a p50–p99 band. Where throughput stops rising is the
plateau the findings name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvray.analysis.views import (
    ENERGY_TDP_ESTIMATE,
    Series,
    View,
    experiment_rows,
    ok_rows,
    oom_rows,
    repeat_throughput,
    sweep_series,
    tokens_per_joule,
)
from kvray.figures import common, style
from kvray.figures.common import FigureResult


def fig2_tps_vs_concurrency(view: View, out_dir: Path) -> FigureResult:
    rows = experiment_rows(view, "exp1")
    heading = ("fig2 · Throughput and per-token latency vs concurrency", view.context(rows))
    energy = tokens_per_joule(ok_rows(rows))[1] if len(rows) else None  # one kind for the whole panel
    panels = 3 if energy else 2
    with common.new_figure(
        "fig2_tps_vs_concurrency", out_dir, 1, panels, figsize=(4.75 * panels, 4.0), title=heading
    ) as d:
        ax_tps, ax_tpot, result = d.axes[0], d.axes[1], d.result
        series = sweep_series(view, "exp1")
        if not series or not len(ok_rows(rows)):
            return d.no_successful_cells("exp1")
        statuses: set[str] = set()
        repeats_seen, with_ci = 1, False
        slots = common.oom_slots(series)
        for s in series:
            repeats_seen = max(repeats_seen, _throughput_line(ax_tps, view, s))
            with_ci = _throughput_interval(ax_tps, s) or with_ci
            tpot = ok_rows(s.rows)[["concurrency", "tpot_s_p50", "tpot_s_p99"]].dropna(subset=["tpot_s_p50"])
            if len(tpot):
                common.p50_line_p99_band(
                    ax_tpot, tpot.astype(float), "concurrency", "tpot_s", s, f"tpot-{s.color_index}"
                )
            result.partial_markers += common.mark_partial(ax_tps, s.rows, "concurrency", "output_tps")
            common.mark_partial(ax_tpot, s.rows, "concurrency", "tpot_s_p50", scale=1e-3)  # the same cells
            for ax in (ax_tps, ax_tpot):
                result.oom_markers += common.mark_oom(ax, s, "concurrency", slots.get(s.label, 0))
            statuses |= set(oom_rows(s.rows)["status"])
            result.series.append(s.label)
        result.oom_markers //= 2  # the same cells are marked on both panels
        for ax in (ax_tps, ax_tpot):
            common.log2_axis(ax, common.x_values(rows, "concurrency"), "concurrent requests (log scale)")
        ax_tps.set_ylabel("output throughput (tokens/s)")
        ax_tps.set_ylim(bottom=0)
        ax_tps.set_title("(a) aggregate output throughput")
        ax_tpot.set_ylabel("time per output token (ms)")
        ax_tpot.set_ylim(bottom=0)
        ax_tpot.set_title("(b) TPOT: line p50, band p50–p99")
        handles = common.series_handles(series) + common.oom_legend_handles(statuses)
        ax_tps.legend(handles=handles + common.partial_legend_handles(result.partial_markers), loc="best")
        if repeats_seen > 1:
            result.notes.append(f"error bars: min–max of output throughput over {repeats_seen} repeats (point = mean)")
        else:
            result.notes.append("one repeat per cell: no error bars")
        if with_ci:
            result.notes.append("light wide bars: 95 % interval of the mean over repeats (Student's t)")
        if energy:
            _energy_panel(d.axes[2], series, energy)
            result.notes.append(
                "(c) the simulator's TDP × time estimate (no cell measured energy): the GPUs at "
                "datasheet TDP for the predicted run, an estimate, not a bound"
                if energy == ENERGY_TDP_ESTIMATE
                else "(c) measured energy (NVML counter / RAPL, summed over each cell's GPUs); cells "
                "without a reading are left out, never filled with an estimate"
            )
        result.notes += common.caption_notes(rows)
    return result


def _energy_panel(ax: Any, series: list[Series], kind: str) -> None:
    """(c) output tokens per joule vs concurrency, of one ``kind`` (measured, or the TDP × time estimate, hollow
    markers and a dashed line): the two never share the axis."""
    xs: list[float] = []
    hollow = kind == ENERGY_TDP_ESTIMATE
    for s in series:
        ok = ok_rows(s.rows)
        per_j, _ = tokens_per_joule(ok, kind)
        pts = ok.assign(_per_j=per_j).dropna(subset=["_per_j"]).sort_values("concurrency")
        face = "none" if hollow else style.color(s.color_index)
        ax.plot(
            pts["concurrency"].astype(float),
            pts["_per_j"].astype(float),
            color=style.color(s.color_index),
            marker=style.marker(s.color_index),
            markerfacecolor=face,
            linestyle="--" if hollow else "-",
            gid=f"tok-per-j-{s.color_index}",
        )
        xs += pts["concurrency"].astype(float).tolist()
    common.log2_axis(ax, sorted(set(xs)), "concurrent requests (log scale)")
    ax.set_ylabel(f"output tokens per joule ({kind})")
    ax.set_ylim(bottom=0)
    ax.set_title("(c) energy: TDP × time estimate, not measured" if hollow else "(c) energy efficiency (measured)")


def _throughput_interval(ax: Any, s: Series) -> bool:
    """The 95 % interval of each cell's mean tokens/s (kvray.measure.metrics) as light wide bars; False if none."""
    cols = ("output_tps", "output_tps_ci_low", "output_tps_ci_high")
    ok = ok_rows(s.rows)
    if not all(c in ok.columns for c in cols):
        return False
    pts = ok[["concurrency", *cols]].astype(float).dropna()
    if not len(pts):
        return False
    mean = pts["output_tps"]
    ax.errorbar(
        pts["concurrency"],
        mean,
        fmt="none",
        ecolor=style.color(s.color_index),
        alpha=0.35,
        elinewidth=4,
        yerr=[(mean - pts["output_tps_ci_low"]).clip(lower=0), (pts["output_tps_ci_high"] - mean).clip(lower=0)],
        gid=f"tps-ci-{s.color_index}",
    )
    return True


def _throughput_line(ax: Any, view: View, s: Series) -> int:
    """Mean output tokens/s of each ok cell, min–max over its repeats as error bars; returns the most repeats."""
    pts = ok_rows(s.rows)[["concurrency", "output_tps", "cell_id"]].dropna(subset=["output_tps"])
    repeats_seen = 1
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
        ax.errorbar(
            pts["concurrency"].astype(float),
            pts["output_tps"].astype(float),
            yerr=[lows, highs] if any(lows) or any(highs) else None,
            color=style.color(s.color_index),
            marker=style.marker(s.color_index),
            capsize=3,
            label=s.label,
            gid=f"tps-{s.color_index}",
        )
    return repeats_seen
