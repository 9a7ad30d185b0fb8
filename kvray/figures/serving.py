"""Serving-load figures (exp5, or any closed / open-loop rows), drawn from a results folder alone.

fig11_latency_vs_throughput  TTFT and TPOT, p50 (—) and p99 (--), against the achieved rate (requests/s), one
                             colour per configuration (backend · hardware · model); open loops ● joined in
                             offered-rate order, closed loops ■ hollow; the SLO thresholds as grey lines; the
                             knee ★ (the search's ``knee_rps``, or, for a list of rates, the highest offered rate
                             whose achieved rate still followed it); rows whose client fell behind ringed red
fig12_pareto                 throughput per GPU (output tokens/s ÷ GPUs) against throughput per user
                             (1 ÷ TPOT p50: the tokens/s one request streams), each configuration's points and
                             its Pareto frontier

Both say their sample counts (requests behind each percentile, as the row's ``*_n``), as every kvray figure
must. They are drawn only when a folder holds serving rows (``has_serving_data``): a burst-only folder gets none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.analysis.views import as_number
from kvray.figures import style
from kvray.figures.common import FigureResult, new_figure

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

SERVING_FIGURES = ("fig11_latency_vs_throughput", "fig12_pareto")
SERVING_LOADS = ("closed", "poisson", "gamma", "constant")
FOLLOW_FRACTION = 0.90  # kvray/runner/saturation.py's: achieved ≥ this × offered is "following"
SLO_PANELS = (("ttft", "ttft_ms", "TTFT"), ("tpot", "tpot_ms", "TPOT"))
BEHIND_COLOR = "#C0392B"


def config_label(row: Any, keys: list[str]) -> str:
    """``backend · hardware · model`` (only the parts that vary in the folder, backend always)."""
    return " · ".join(str(row[k]) for k in ["backend", *keys])


def config_keys(cells: Any) -> list[str]:
    """The columns beside backend that tell configurations apart here (those with more than one value)."""
    return [k for k in ("hardware", "model", "dtype") if k in cells.columns and cells[k].nunique() > 1]


def serving_rows(cells: Any) -> Any:
    """Measured closed / open-loop rows (not bursts, not a search's own summary row), status ok or partial."""
    if not len(cells) or "load" not in cells.columns:
        return cells.iloc[0:0]
    rows = cells[cells["load"].isin(SERVING_LOADS) & cells["status"].isin(["ok", "partial"])]
    if "achieved_rps" in rows.columns:
        rows = rows[rows["achieved_rps"].astype(float).notna()]
    return rows


def search_rows(cells: Any) -> Any:
    """The saturation searches' own rows (``knee_rps``)."""
    if not len(cells) or "knee_rps" not in cells.columns:
        return cells.iloc[0:0]
    return cells[cells["knee_rps"].astype(float).notna()]


def has_serving_data(cells: Any) -> bool:
    return bool(len(serving_rows(cells)))


def knee_row(part: Any, searches: Any) -> Any | None:
    """The row at the knee of one configuration's open-loop points: the probe at the search's knee,
    else the highest offered rate whose achieved rate was at least FOLLOW_FRACTION of the offered one."""
    open_ = part[part["load"] != "closed"]
    if not len(open_):
        return None
    offered = open_["offered_rps"].astype(float)
    knees = searches["knee_rps"].astype(float) if len(searches) else []
    if len(searches) and "knee_rps_nominal" in searches:  # the probe's row has the nominal rate (knee_rps: realised)
        knees = searches["knee_rps_nominal"].astype(float).fillna(knees)
    for knee in knees:
        hit = open_[(offered - knee).abs() <= 1e-6 * max(knee, 1e-12)]
        if len(hit):
            return hit.iloc[0]
    kept = open_[following(open_)]
    if not len(kept) or len(kept) == len(open_):  # never left the curve: no knee seen
        return None
    return kept.loc[kept["offered_rps"].astype(float).idxmax()]


def following(rows: Any) -> Any:
    """Open-loop rows whose achieved rate kept up: ≥ FOLLOW_FRACTION of the rate the schedule really offered."""
    offered = rows["offered_rps"].astype(float)
    realised = rows["offered_rps_realised"].astype(float) if "offered_rps_realised" in rows else offered
    return rows["achieved_rps"].astype(float) >= FOLLOW_FRACTION * realised.where(realised.notna(), offered)


def _slo_ms(slo_text: Any) -> dict[str, float]:
    out = {}
    for part in str(slo_text or "").split(","):
        name, _, value = part.partition("=")
        if as_number(value) is not None:
            out[name.strip()] = float(value)
    return out


def _n_range(rows: Any, column: str) -> str:
    values = [int(v) for v in rows[column].dropna()] if column in rows.columns else []
    if not values:
        return "n ?"
    return f"n {min(values)}" if min(values) == max(values) else f"n {min(values)}–{max(values)}"


def fig11_latency_vs_throughput(cells: Any, out_dir: Path) -> FigureResult:
    """Two panels (TTFT, TPOT) vs achieved requests/s, one colour per configuration."""
    rows = serving_rows(cells)
    with new_figure("fig11_latency_vs_throughput", out_dir, 1, 2, figsize=(15, 4.6), layout=None) as d:
        result = d.result
        if not len(rows):
            return d.missing("needs closed- or open-loop rows (kvray exp5, or bench --load)", "no serving rows")
        keys = config_keys(rows)
        searches = search_rows(cells)
        slos: dict[str, float] = {}
        behind_total = overloaded = 0
        for i, (label, part) in enumerate(sorted(rows.groupby(rows.apply(config_label, axis=1, keys=keys)))):
            colour = style.color(i)
            mine = searches[(searches.apply(config_label, axis=1, keys=keys) == label)] if len(searches) else searches
            knee = knee_row(part, mine)
            for s in part["slo"].dropna().unique():
                slos.update(_slo_ms(s))
            for ax, (metric, _, _) in zip(d.axes, SLO_PANELS, strict=True):
                for loop, sub in (("open", part[part["load"] != "closed"]), ("closed", part[part["load"] == "closed"])):
                    if not len(sub):
                        continue
                    sub = sub.sort_values("users" if loop == "closed" else "offered_rps")
                    hollow = {"markerfacecolor": "white"} if loop == "closed" else {}
                    mark = "s" if loop == "closed" else "o"
                    n = _n_range(sub, f"{metric}_s_n")
                    if loop == "open":  # overloaded probes: faded markers off the line, which follows the rate
                        over = sub[~following(sub)]
                        ax.plot(
                            over["achieved_rps"].astype(float),
                            over[f"{metric}_s_p99"].astype(float) * 1e3,
                            color=colour,
                            marker="o",
                            markersize=3,
                            linestyle="none",
                            alpha=0.35,
                        )
                        overloaded += len(over) if metric == "ttft" else 0
                        sub = sub[following(sub)]
                    x = sub["achieved_rps"].astype(float)
                    ax.plot(
                        x,
                        sub[f"{metric}_s_p50"].astype(float) * 1e3,
                        color=colour,
                        marker=mark,
                        markersize=4,
                        label=f"{label} {loop} p50 ({n}/point)",
                        **hollow,
                    )
                    ax.plot(
                        x,
                        sub[f"{metric}_s_p99"].astype(float) * 1e3,
                        color=colour,
                        marker=mark,
                        markersize=3,
                        linestyle="--",
                        alpha=0.8,
                        **hollow,
                    )
                    behind = (
                        sub[sub["client_behind"].fillna(False).astype(bool)] if "client_behind" in sub else sub[0:0]
                    )
                    if len(behind):
                        ax.scatter(
                            behind["achieved_rps"].astype(float),
                            behind[f"{metric}_s_p99"].astype(float) * 1e3,
                            s=120,
                            facecolors="none",
                            edgecolors=BEHIND_COLOR,
                            linewidths=1.6,
                            zorder=5,
                        )
                        behind_total += len(behind) if metric == "ttft" else 0
                if knee is not None:
                    ax.plot(
                        [float(knee["achieved_rps"])],
                        [float(knee[f"{metric}_s_p99"]) * 1e3],
                        marker="*",
                        markersize=14,
                        color=colour,
                        markeredgecolor="black",
                        linestyle="none",
                        zorder=6,
                    )
            if knee is not None:
                # offered as the probe realised it (the search's knee_rps), the rate the search asked for beside it
                nominal, realised = float(knee["offered_rps"]), as_number(knee.get("offered_rps_realised"))
                offered = f"{nominal:.3g} req/s offered"
                if realised is not None:
                    offered = f"{realised:.3g} req/s offered ({nominal:.3g} nominal)"
                result.notes.append(f"knee {label}: {offered}, {float(knee['achieved_rps']):.3g} achieved")
            result.series.append(label)
        for ax, (_, slo_key, title) in zip(d.axes, SLO_PANELS, strict=True):
            if slo_key in slos:
                ax.axhline(
                    slos[slo_key],
                    color=style.CAPACITY_COLOR,
                    linestyle=":",
                    linewidth=1.4,
                    label=f"SLO {title} {slos[slo_key]:g} ms",
                )
            ax.set_title(f"{title}: p50 (—), p99 (--); ★ knee")
            ax.set_xlabel("achieved requests/s (steady state)")
            ax.set_ylabel(f"{title} (ms)")
            ax.set_yscale("log")
            xs = rows["achieved_rps"].astype(float)
            if xs.min() > 0 and xs.max() / xs.min() > 20:
                ax.set_xscale("log")
        if behind_total:
            d.axes[0].scatter([], [], s=120, facecolors="none", edgecolors=BEHIND_COLOR, label="client behind")
        handles = list({str(h.get_label()): h for ax in d.axes for h in ax.get_legend_handles_labels()[0]}.items())
        d.fig.legend(
            [h for _, h in handles],
            [label for label, _ in handles],
            fontsize=6.5,
            loc="upper left",
            bbox_to_anchor=(0.78, 0.8),
            frameon=False,
        )
        if overloaded:
            result.notes.append(
                f"{overloaded} overloaded open-loop rows (achieved < {FOLLOW_FRACTION:.0%} of the "
                "offered rate): faded p99 markers, off the lines"
            )
        if behind_total:
            result.notes.append(
                f"{behind_total} rows whose client fell behind its schedule (p99 lag above the "
                "limit): ringed red, their offered rate was not what the client sent"
            )
        result.notes.append("n/point: requests behind each percentile (those that arrived in the measured window)")
        first = rows.iloc[0]
        style.figure_title(
            d.fig,
            "Latency vs throughput under load",
            f"{first['model']} · {first['dtype']} · prompt {first['prompt_toks']} · gen {first['gen_toks']}",
        )
        d.fig.subplots_adjust(top=0.8, bottom=0.24, right=0.77, wspace=0.25)
        result.caption = "What latency users see as the rate grows, per configuration; SLO lines and the knee marked."
    return result


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats on both axes (higher is better on both), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def fig12_pareto(cells: Any, out_dir: Path) -> FigureResult:
    """Throughput per GPU vs per user, every serving row of every configuration, frontiers drawn."""
    rows = serving_rows(cells)
    with new_figure("fig12_pareto", out_dir, figsize=(7, 4.8), layout=None) as d:
        result = d.result
        ax = d.axes
        if not len(rows):
            return d.missing("needs closed- or open-loop rows (kvray exp5, or bench --load)", "no serving rows")
        keys = config_keys(rows)
        for i, (label, part) in enumerate(sorted(rows.groupby(rows.apply(config_label, axis=1, keys=keys)))):
            gpus = part["tensor_parallel"].fillna(1).astype(float) if "tensor_parallel" in part else 1.0
            per_gpu = part["output_tps"].astype(float) / gpus
            per_user = 1.0 / part["tpot_s_p50"].astype(float)
            pts = [(u, g) for u, g in zip(per_user, per_gpu, strict=True) if math.isfinite(u) and math.isfinite(g)]
            if not pts:
                continue
            colour = style.color(i)
            ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=colour,
                marker=style.marker(i),
                s=18,
                alpha=0.6,
                label=f"{label} ({len(pts)} rows, {_n_range(part, 'tpot_s_n')} req/row)",
            )
            front = pareto_front(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=colour, linewidth=1.6)
            result.series.append(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("throughput per user: 1 / TPOT p50 (output tokens/s per request)")
        ax.set_ylabel("throughput per GPU (output tokens/s ÷ GPUs)")
        ax.legend(fontsize=6.5)
        style.figure_title(d.fig, "Throughput per GPU vs per user", "each point a load level; lines: Pareto frontiers")
        d.fig.subplots_adjust(top=0.84, bottom=0.2)
        result.notes.append("output tokens/s over the steady-state requests' span; TPOT p50 over the same requests")
        result.caption = "The trade-off a deployment chooses on: tokens/s per GPU against tokens/s each user sees."
    return result


def serving_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """fig11 and fig12 of a Dataset (kvray.analysis.dataset), each saying what is missing where data is."""
    with style.styled():
        return [fig11_latency_vs_throughput(dataset.cells, out_dir), fig12_pareto(dataset.cells, out_dir)]
