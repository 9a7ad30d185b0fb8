"""The findings the report states, computed from a dataset's views alone (kvray.analysis.views).

One finding per series — a GPU type, a backend, a dtype — where the dataset holds several:
  memory_slope        exp1: least-squares slope of measured peak memory vs concurrency (bytes per
                      extra concurrent request), beside the predicted and measured KV per request
  latency_exponent    exp2: b in latency ∝ prompt_tokens^b from a log-log least-squares fit, for TTFT
                      p50 and E2E p50; b > 1.05 is called superlinear, also the local b of the last step
  throughput_plateau  exp1: the smallest concurrency reaching 90 % of the best output throughput
  mixed_penalty       exp3: p50/p99 TTFT and E2E of the short requests batched with a long one, divided
                      by the same figures of the short requests alone
  oom_boundary        exp1/exp2: the largest concurrency (or prompt length) that ran and the smallest that
                      ran out of memory (oom, skipped after an oom, or refused by the pre-flight check)
  kv_error            every cell with both: kv_rel_error = (measured − predicted) / predicted KV bytes

The fits are here too (fig3 draws the same power law). pandas and numpy only: no matplotlib, torch or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvray.analysis.views import (
    MIXED_STATS,
    OOM_LABELS,
    PEAK_COLUMNS,
    SWEEPS,
    View,
    first_column,
    mixed_pairs,
    ok_rows,
    oom_rows,
    simulated_mask,
    sweep_series,
)

# ``compute_findings(prepare(cells, traces))`` is the whole computation, so prepare is importable from here too.
from kvray.analysis.views import prepare as prepare
from kvray.units import human_bytes, human_seconds

SUPERLINEAR_ABOVE = 1.05
PLATEAU_FRACTION = 0.90


# ---------------------------------------------------------------- fits


def linear_fit(x: Any, y: Any) -> tuple[float, float, float]:
    """(slope, intercept, R²) of a least-squares line."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(xa, ya, 1)
    resid = ya - (slope * xa + intercept)
    total = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return float(slope), float(intercept), r2


def power_fit(x: Any, y: Any) -> tuple[float, float, float]:
    """(exponent b, coefficient a, R² in log space) of y = a·x^b, from a log-log least-squares line."""
    b, log_a, r2 = linear_fit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)))
    return b, math.exp(log_a), r2


def _positive(rows: Any, x: str, y: str) -> Any:
    sel = rows[[x, y]].astype(float)
    return sel[(sel[x] > 0) & (sel[y] > 0)].dropna()


# ---------------------------------------------------------------- findings


@dataclass
class Finding:
    key: str  # memory_slope | latency_exponent | throughput_plateau | mixed_penalty | oom_boundary | kv_error
    experiment: str
    series: str
    values: dict[str, Any]
    text: str


def memory_slopes(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp1"):
        ok = ok_rows(s.rows)
        peak = first_column(ok, PEAK_COLUMNS)
        if peak is None:
            continue
        pts = ok[["concurrency", peak[0]]].dropna().astype(float)
        if pts["concurrency"].nunique() < 2:
            continue
        slope, intercept, r2 = linear_fit(pts["concurrency"], pts[peak[0]])
        conc = ok["concurrency"].astype(float)
        kv_pred = float((ok["kv_predicted_bytes"].astype(float) / conc).median())
        kv_meas = float((ok["kv_measured_bytes"].astype(float) / conc).median())
        values = {
            "slope_bytes_per_request": slope,
            "intercept_bytes": intercept,
            "r2": r2,
            "peak_column": peak[0],
            "points": len(pts),
            "kv_predicted_bytes_per_request": kv_pred,
            "kv_measured_bytes_per_request": kv_meas,
        }
        source = "simulated" if bool(simulated_mask(ok).all()) else peak[1]
        text = (
            f"{s.label}: peak memory ({source}) grows by {human_bytes(slope)} per extra concurrent request "
            f"(linear fit over {len(pts)} concurrencies, R² {r2:.3f})"
        )
        if kv_pred == kv_pred:
            text += f"; predicted KV per request {human_bytes(kv_pred)}"
        if kv_meas == kv_meas:
            text += f", measured {human_bytes(kv_meas)}"
        out.append(Finding("memory_slope", "exp1", s.label, values, text + "."))
    return out


def latency_exponents(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp2"):
        ok = ok_rows(s.rows)
        values: dict[str, Any] = {}
        parts = []
        for metric, name in (("ttft_s_p50", "TTFT p50"), ("e2e_s_p50", "E2E p50")):
            pts = _positive(ok, "prompt_toks", metric)
            if pts["prompt_toks"].nunique() < 2:
                continue
            b, a, r2 = power_fit(pts["prompt_toks"], pts[metric])
            last = pts.sort_values("prompt_toks").iloc[-2:]
            x0, x1 = last["prompt_toks"].tolist()
            y0, y1 = last[metric].tolist()
            b_last = math.log(y1 / y0) / math.log(x1 / x0) if x1 != x0 else math.nan
            key = metric.removesuffix("_p50")
            values.update(
                {
                    f"{key}_exponent": b,
                    f"{key}_coefficient": a,
                    f"{key}_r2": r2,
                    f"{key}_exponent_last_step": b_last,
                    f"{key}_superlinear": b > SUPERLINEAR_ABOVE,
                    "min_prompt_toks": int(pts["prompt_toks"].min()),
                    "max_prompt_toks": int(pts["prompt_toks"].max()),
                }
            )
            kind = (
                "superlinear"
                if b > SUPERLINEAR_ABOVE
                else "about linear"
                if b >= 2 - SUPERLINEAR_ABOVE
                else "sublinear"
            )
            parts.append(f"{name} ∝ L^{b:.2f} ({kind}, R² {r2:.2f}; {b_last:.2f} from {int(x0)} to {int(x1)} tokens)")
        if parts:
            text = (
                f"{s.label}: over prompt lengths {values['min_prompt_toks']}–{values['max_prompt_toks']}, "
                + "; ".join(parts)
            )
            out.append(Finding("latency_exponent", "exp2", s.label, values, text + "."))
    return out


def throughput_plateaus(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp1"):
        pts = ok_rows(s.rows)[["concurrency", "output_tps"]].dropna().astype(float).sort_values("concurrency")
        if pts["concurrency"].nunique() < 2:
            continue
        best_i = int(pts["output_tps"].to_numpy().argmax())
        best, best_c = float(pts["output_tps"].iloc[best_i]), int(pts["concurrency"].iloc[best_i])
        reach = pts[pts["output_tps"] >= PLATEAU_FRACTION * best]
        plateau_c = int(reach["concurrency"].iloc[0])
        c_max, tps_last = int(pts["concurrency"].iloc[-1]), float(pts["output_tps"].iloc[-1])
        c_prev, tps_prev = int(pts["concurrency"].iloc[-2]), float(pts["output_tps"].iloc[-2])
        last_gain = tps_last / tps_prev - 1 if tps_prev > 0 else math.nan
        values = {
            "plateau_concurrency": plateau_c,
            "best_output_tps": best,
            "best_concurrency": best_c,
            "max_concurrency_tested": c_max,
            "last_step_gain": last_gain,
            "still_rising": plateau_c == c_max and c_max != int(pts["concurrency"].iloc[0]),
        }
        if values["still_rising"]:
            text = (
                f"{s.label}: no plateau yet — output throughput still rises at the largest concurrency "
                f"tested ({tps_prev:,.1f} → {tps_last:,.1f} tok/s from c={c_prev} to c={c_max}, "
                f"{last_gain:+.0%})"
            )
        else:
            text = (
                f"{s.label}: output throughput plateaus at c={plateau_c} (≥ {PLATEAU_FRACTION:.0%} of the "
                f"best, {best:,.1f} tok/s at c={best_c}); the last step c={c_prev}→{c_max} changes it "
                f"by {last_gain:+.0%}"
            )
            if best_c < c_max and tps_last < 0.95 * best:
                text += f" — it degrades beyond c={best_c}"
        out.append(Finding("throughput_plateau", "exp1", s.label, values, text + "."))
    return out


def mixed_penalties(view: View) -> list[Finding]:
    out = []
    for p in mixed_pairs(view):
        values: dict[str, Any] = {
            "short_toks": p.short_toks,
            "long_toks": p.long_toks,
            "n_short": p.n_short,
            "n_long": p.n_long,
        }
        for stat in MIXED_STATS:
            values[f"{stat}_alone"] = p.alone.get(stat, math.nan)
            values[f"{stat}_mixed"] = p.mixed.get(stat, math.nan)
            values[f"{stat}_ratio"] = p.ratio(stat)
        text = (
            f"{p.series}: {p.short_toks}-token requests batched with {p.n_long} × {p.long_toks}-token "
            f"request(s): TTFT p99 ×{values['ttft_s_p99_ratio']:.2f} ({human_seconds(values['ttft_s_p99_alone'])} → "
            f"{human_seconds(values['ttft_s_p99_mixed'])}), E2E p99 ×{values['e2e_s_p99_ratio']:.2f} "
            f"({human_seconds(values['e2e_s_p99_alone'])} → {human_seconds(values['e2e_s_p99_mixed'])}), "
            f"TTFT p50 ×{values['ttft_s_p50_ratio']:.2f}"
        )
        out.append(Finding("mixed_penalty", "exp3", p.series, values, text + "."))
    return out


def oom_boundaries(view: View) -> list[Finding]:
    out = []
    for exp, noun in (("exp1", "concurrency"), ("exp2", "prompt length")):
        x = SWEEPS[exp][0]
        for s in sweep_series(view, exp):
            ok, oom = ok_rows(s.rows), oom_rows(s.rows)
            if not len(ok) and not len(oom):
                continue
            max_ok = int(ok[x].max()) if len(ok) else None
            first_oom = int(oom[x].min()) if len(oom) else None
            statuses = sorted(set(oom["status"]))
            values = {"x": x, "max_ok": max_ok, "first_oom": first_oom, "oom_cells": len(oom), "oom_statuses": statuses}
            if first_oom is None:
                text = f"{s.label}: no OOM up to {noun} {max_ok}"
            elif max_ok is None:
                text = f"{s.label}: every {noun} tested ran out of memory (smallest {first_oom})"
            else:
                kinds = ", ".join(OOM_LABELS[st] for st in statuses)
                text = f"{s.label}: max {noun} before OOM is {max_ok}; {first_oom} does not fit ({kinds})"
            out.append(Finding("oom_boundary", exp, s.label, values, text + "."))
    return out


def kv_errors(view: View) -> list[Finding]:
    rows = view.cells[view.cells["kv_rel_error"].notna() & view.cells["kv_measured_bytes"].notna()]
    if not len(rows):
        return []
    out = []
    groups: list[tuple[str, Any]] = [("all cells", rows)]
    labels = [view.series_label(r) for _, r in rows.iterrows()]
    if len(set(labels)) > 1:
        rows = rows.assign(_series=labels)
        groups += [(label, part) for label, part in rows.groupby("_series")]
    for label, part in groups:
        err = part["kv_rel_error"].astype(float)
        worst = part.loc[err.abs().idxmax()]
        values = {
            "cells": len(part),
            "mean_abs_rel_error": float(err.abs().mean()),
            "max_abs_rel_error": float(err.abs().max()),
            "mean_rel_error": float(err.mean()),
            "worst_cell_id": str(worst["cell_id"]),
        }
        text = (
            f"{label}: predicted KV is within {values['max_abs_rel_error']:.1%} of measured over "
            f"{len(part)} cells (mean |error| {values['mean_abs_rel_error']:.2%}; worst: c={int(worst['concurrency'])} "
            f"prompt {int(worst['prompt_toks'])}, {float(worst['kv_rel_error']):+.2%})"
        )
        out.append(Finding("kv_error", "", label, values, text + "."))
    return out


def compute_findings(view: View) -> list[Finding]:
    """Every finding the data supports, in report order."""
    return [
        *memory_slopes(view),
        *oom_boundaries(view),
        *throughput_plateaus(view),
        *latency_exponents(view),
        *mixed_penalties(view),
        *kv_errors(view),
    ]
