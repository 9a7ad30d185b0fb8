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
  failures            partial cells: how many requests failed, and how many samples their percentiles pool
  sanity              warnings, not results: measured orderings physics rules out — a static batch whose TPOT
                      p50 falls by more than SANITY_MARGIN as concurrency grows (a batch of 2 steps no faster
                      than a batch of 1: the slower cell was disturbed), and latency below the roofline floor
                      of its GPU (peak bandwidth and FLOP/s at 100 %, no overhead: kvray.sim at η = 1)

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
    as_number,
    first_column,
    mixed_pairs,
    ok_rows,
    oom_rows,
    partial_rows,
    simulated_mask,
    split_series,
    sweep_series,
)

# ``compute_findings(prepare(cells, traces))`` is the whole computation, so prepare is importable from here too.
from kvray.analysis.views import prepare as prepare
from kvray.units import human_bytes, human_seconds

SUPERLINEAR_ABOVE = 1.05
PLATEAU_FRACTION = 0.90
# A static batch's TPOT p50 may fall by this much as concurrency grows before it is called implausible: repeats
# on a quiet machine scatter by a few per cent; a disturbed cell (issue 12: 18.7 ms at c=1, 6.4 ms at c=2) by 3×.
SANITY_MARGIN = 0.20
FLOOR_SLACK = 0.02  # below the roofline floor by more than this (the GPU table's rounding) is impossible


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
    key: str  # memory_slope | … | kv_error | failures | sanity
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
        if "kv_peak_running" in ok.columns:  # a paged engine's KV peak held only the requests running then
            running = ok["kv_peak_running"].astype(float)
            conc = running.where(running > 0).fillna(conc)
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
        partial = partial_rows(s.rows)
        if pts["concurrency"].nunique() < 2:
            continue
        best_i = int(pts["output_tps"].to_numpy().argmax())
        best, best_c = float(pts["output_tps"].iloc[best_i]), int(pts["concurrency"].iloc[best_i])
        reach = pts[pts["output_tps"] >= PLATEAU_FRACTION * best]
        plateau_c = int(reach["concurrency"].iloc[0])
        c_max, tps_last = int(pts["concurrency"].iloc[-1]), float(pts["output_tps"].iloc[-1])
        c_prev, tps_prev = int(pts["concurrency"].iloc[-2]), float(pts["output_tps"].iloc[-2])
        last_gain = tps_last / tps_prev - 1 if tps_prev > 0 else math.nan
        values: dict[str, Any] = {
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
        if len(partial):
            values["partial_concurrencies"] = sorted(int(c) for c in partial["concurrency"])
            text += f" (partly failed cells, counting only successful requests: {_failed_list(partial)})"
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
            f"TTFT p50 ×{values['ttft_s_p50_ratio']:.2f}; percentiles over n = {int(p.alone.get('requests', 0))} "
            f"short requests alone and {int(p.mixed.get('requests', 0))} mixed"
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


def _failed_list(rows: Any) -> str:
    """ "c=8: 2 of 24 failed, c=16: 5 of 48 failed" for partly failed cells."""
    return ", ".join(
        f"c={int(r['concurrency'])}: {int(r['requests_failed'])} of {int(r['requests'])} failed"
        if as_number(r["requests"]) is not None and as_number(r["requests_failed"]) is not None
        else f"c={int(r['concurrency'])}"
        for _, r in rows.sort_values("concurrency").iterrows()
    )


def failures(view: View) -> list[Finding]:
    """One finding per partly failed cell: its failure rate and the samples its percentiles pool."""
    out = []
    for _, r in partial_rows(view.cells).iterrows():
        values = {
            "cell_id": str(r["cell_id"]),
            "requests": as_number(r["requests"]),
            "requests_failed": as_number(r["requests_failed"]),
            "failure_rate": as_number(r["failure_rate"]),
            "ttft_s_n": as_number(r["ttft_s_n"]),
        }
        rate = values["failure_rate"]
        shape = str(r["prompt_toks_list"]) if r["workload"] == "mixed" else f"{int(r['prompt_toks'])}"
        text = (
            f"{view.series_label(r)} c={int(r['concurrency'])} × prompt {shape}: "
            + (
                f"{int(values['requests_failed'] or 0)} of {int(values['requests'] or 0)} requests failed ({rate:.1%}); "
                if rate is not None
                else "some requests failed; "
            )  # fmt: skip
            + f"its latency percentiles pool only the {int(values['ttft_s_n'] or 0)} that succeeded"
            + (f" — {str(r['reason'])[:160]}" if r["reason"] else "")
        )
        out.append(Finding("failures", str(r["experiment"]), view.series_label(r), values, text + "."))
    return out


def _static_batch(backend: str) -> bool:
    """A measured backend that runs each batch to its end before the next (hf ``generate``): its per-step
    time cannot fall as the batch grows."""
    from kvray.backends import backend_class
    from kvray.errors import KvrayInputError

    try:
        cls = backend_class(backend)
    except KvrayInputError:
        return False
    return cls.kv_layout == "hf" and not cls.queues_when_full and not cls.simulated


def tpot_orderings(view: View) -> list[Finding]:
    """Static batches whose TPOT p50 falls by more than SANITY_MARGIN as concurrency grows."""
    cells = ok_rows(view.cells)
    cells = cells[(cells["workload"] == "uniform") & ~simulated_mask(cells) & cells["tpot_s_p50"].notna()]
    cells = cells[[_static_batch(str(b)) for b in cells["backend"]]] if len(cells) else cells
    out = []
    for s in split_series(view, cells, "concurrency", ("prompt_toks", "gen_toks")):
        rows = s.rows.sort_values("concurrency")
        slowest: Any = None  # the slowest cell at a lower concurrency so far
        for _, r in rows.iterrows():
            if (
                slowest is not None
                and r["concurrency"] > slowest["concurrency"]
                and float(r["tpot_s_p50"]) < (1 - SANITY_MARGIN) * float(slowest["tpot_s_p50"])
            ):
                out.append(_tpot_warning(view, s.label, slowest, r))
                slowest = r  # one warning per disturbed cell; the faster cell is the reference from here
                continue
            if slowest is None or float(r["tpot_s_p50"]) > float(slowest["tpot_s_p50"]):
                slowest = r
    return out


def _tpot_warning(view: View, label: str, low: Any, high: Any) -> Finding:
    c_lo, c_hi = int(low["concurrency"]), int(high["concurrency"])
    t_lo, t_hi = float(low["tpot_s_p50"]), float(high["tpot_s_p50"])
    values = {
        "check": "tpot_falls_with_concurrency",
        "cell_ids": [str(low["cell_id"]), str(high["cell_id"])],
        "suspect_cell_id": str(low["cell_id"]),
        "concurrency": [c_lo, c_hi],
        "tpot_s_p50": [t_lo, t_hi],
        "backend": str(low["backend"]),
    }
    text = (
        f"{label}{'' if 'prompt' in label else ' prompt ' + str(int(low['prompt_toks']))} ({low['backend']}): "
        f"TPOT p50 is {human_seconds(t_lo)} at c={c_lo} "
        f"but {human_seconds(t_hi)} at c={c_hi} — a static batch of {c_hi} cannot step faster than one of {c_lo}, "
        f"so the c={c_lo} cell was most likely disturbed (other work on its cores during its measured window); "
        "treat it as suspect and rerun it alone (`kvray bench`)"
    )
    return Finding("sanity", str(low["experiment"]), label, values, text + ".")


def roofline_floors(view: View) -> list[Finding]:
    """Measured GPU cells faster than their GPU's roofline at 100 % of peak: impossible for one token per step."""
    from kvray.hardware.gpus import match_gpu
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import Efficiency, predict_cell

    floor_eff = Efficiency(1.0, 1.0, 0.0, source="roofline floor: 100 % of peak, no overhead")
    cells = ok_rows(view.cells)
    cells = cells[(cells["workload"] == "uniform") & ~simulated_mask(cells)]
    out = []
    for _, r in cells.iterrows():
        gpu = match_gpu(str(r["hardware"])) if str(r["hardware"]).lower() not in ("cpu", "", "nan") else None
        if gpu is None:
            continue
        try:
            g = resolve_geometry(str(r["model"]))
            # One request alone is the floor for any scheduler: a step reads the weights at least once, a
            # prefill computes at least its own prompt.
            floor = predict_cell(g, gpu, 1, int(r["prompt_toks"]), int(r["gen_toks"]), str(r["dtype"]),
                                 str(r["kv_dtype"]), eff=floor_eff)  # fmt: skip
        except Exception:  # a model kvray cannot resolve, a dtype the table lacks: no floor to compare with
            continue
        for metric, name, bound in (("tpot_s_p50", "TPOT p50", floor.tpot_s), ("ttft_s_p50", "TTFT p50", floor.ttft_s)):
            measured = as_number(r[metric])
            if measured is None or bound != bound or measured >= (1 - FLOOR_SLACK) * bound:
                continue
            values = {"check": "below_roofline_floor", "cell_ids": [str(r["cell_id"])],
                      "suspect_cell_id": str(r["cell_id"]), "metric": metric, "measured_s": measured,
                      "floor_s": bound, "gpu": gpu.name}  # fmt: skip
            text = (
                f"{view.series_label(r)} c={int(r['concurrency'])} × prompt {int(r['prompt_toks'])}: {name} "
                f"{human_seconds(measured)} is below the roofline floor of {gpu.name} ({human_seconds(bound)}: one "
                "request at 100 % of peak bandwidth and FLOP/s) — impossible for one token per step; check the "
                "hardware the row names, the clock, or whether the engine decodes several tokens per step "
                "(speculative decoding) or served from a cache"
            )
            out.append(Finding("sanity", str(r["experiment"]), view.series_label(r), values, text + "."))
    return out


def sanity_warnings(view: View) -> list[Finding]:
    """Orderings physics rules out, as warnings: the cells they name are suspect, not results."""
    return [*tpot_orderings(view), *roofline_floors(view)]


def suspect_cells(findings: list[Finding]) -> set[str]:
    """The cell ids a sanity warning calls suspect."""
    return {f.values["suspect_cell_id"] for f in findings if f.key == "sanity" and "suspect_cell_id" in f.values}


def compute_findings(view: View) -> list[Finding]:
    """Every finding the data supports, in report order."""
    return [
        *sanity_warnings(view),
        *failures(view),
        *memory_slopes(view),
        *oom_boundaries(view),
        *throughput_plateaus(view),
        *latency_exponents(view),
        *mixed_penalties(view),
        *kv_errors(view),
    ]
