"""The findings that rest on statistics, and what every finding is: a claim with its evidence.

Split from kvray.analysis.findings (which computes and orders every finding) because each of these decides
whether the data may be called a conclusion at all (issue 17):
  latency_exponent    a verdict only from MIN_FIT_LENGTHS lengths and an exponent interval that excludes the
                      other verdicts, else "undetermined" and the exp2 command to run
  throughput_plateau  "still rising" and "degrades" only beyond both cells' 95 % intervals over repeats; with
                      one repeat per cell, no conclusion, and the exp1 command with --repeats
  mixed_penalty       like with like (the same short requests alone, at the same concurrency), the p50 ratio's
                      bootstrap interval by repeat, the tail as the highest percentile the sample holds
Each states its evidence in its text (points, R², interval, how many requests) and in ``values``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvray.analysis.stats import power_fit_ci
from kvray.analysis.views import (
    MIXED_STATS,
    View,
    as_number,
    mixed_pairs,
    ok_rows,
    partial_rows,
    repeat_throughput,
    sweep_series,
)
from kvray.units import human_seconds

SUPERLINEAR_ABOVE = 1.05
LINEAR_BAND = (0.9, 1.1)  # "about linear" needs the exponent's whole interval inside this band
MIN_FIT_LENGTHS = 4  # two points always fit a line with R² = 1: a verdict needs residuals to judge it by
PLATEAU_FRACTION = 0.90
DEGRADE_FRACTION = 0.95  # a drop must exceed 5 % *and* the repeats' spread to be called degradation
SUGGESTED_REPEATS = 5


@dataclass
class Finding:
    key: str  # memory_slope | … | kv_error | failures | sanity
    experiment: str
    series: str
    values: dict[str, Any]
    text: str


def exponent_verdict(b: float, low: float, high: float, points: int) -> str:
    """superlinear | sublinear | about linear when the data supports it, else undetermined."""
    if points < MIN_FIT_LENGTHS or low != low:
        return "undetermined"
    if b > SUPERLINEAR_ABOVE and low > 1:
        return "superlinear"
    if b < 2 - SUPERLINEAR_ABOVE and high < 1:
        return "sublinear"
    if LINEAR_BAND[0] <= low and high <= LINEAR_BAND[1]:
        return "about linear"
    return "undetermined"


def rerun_command(exp: str, row: Any, **flags: Any) -> str:
    """The kvray command that measures more of ``row``'s series: ``kvray exp2 --model M … --seqlens …``."""
    parts = [f"kvray {exp}", f"--model {row['model']}"]
    if str(row.get("backend", "hf")) not in ("hf", "", "nan"):
        parts.append(f"--backend {row['backend']}")
    if str(row.get("dtype", "")) not in ("", "nan", "bf16"):
        parts.append(f"--dtype {row['dtype']}")
    for flag, value in flags.items():
        values = " ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        parts.append(f"--{flag.replace('_', '-')} {values}")
    return " ".join(parts)


def _positive(rows: Any, x: str, y: str) -> Any:
    sel = rows[[x, y]].astype(float)
    return sel[(sel[x] > 0) & (sel[y] > 0)].dropna()


def failed_list(rows: Any) -> str:
    """ "c=8: 2 of 24 failed, c=16: 5 of 48 failed" for partly failed cells."""
    return ", ".join(
        f"c={int(r['concurrency'])}: {int(r['requests_failed'])} of {int(r['requests'])} failed"
        if as_number(r["requests"]) is not None and as_number(r["requests_failed"]) is not None
        else f"c={int(r['concurrency'])}"
        for _, r in rows.sort_values("concurrency").iterrows()
    )


def latency_exponents(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp2"):
        ok = ok_rows(s.rows)
        values: dict[str, Any] = {}
        parts = []
        advice = ""
        for metric, name in (("ttft_s_p50", "TTFT p50"), ("e2e_s_p50", "E2E p50")):
            pts = _positive(ok, "prompt_toks", metric)
            if pts["prompt_toks"].nunique() < 2:
                continue
            b, a, r2, low, high = power_fit_ci(pts["prompt_toks"], pts[metric])
            points = int(pts["prompt_toks"].nunique())
            verdict = exponent_verdict(b, low, high, points)
            last = pts.sort_values("prompt_toks").iloc[-2:]
            x0, x1 = last["prompt_toks"].tolist()
            y0, y1 = last[metric].tolist()
            b_last = math.log(y1 / y0) / math.log(x1 / x0) if x1 != x0 else math.nan
            key = metric.removesuffix("_p50")
            values.update(
                {
                    f"{key}_exponent": b,
                    f"{key}_exponent_ci_low": low,
                    f"{key}_exponent_ci_high": high,
                    f"{key}_coefficient": a,
                    f"{key}_r2": r2,
                    f"{key}_points": points,
                    f"{key}_exponent_last_step": b_last,
                    f"{key}_verdict": verdict,
                    f"{key}_superlinear": None if verdict == "undetermined" else verdict == "superlinear",
                    "min_prompt_toks": int(pts["prompt_toks"].min()),
                    "max_prompt_toks": int(pts["prompt_toks"].max()),
                }
            )
            interval = f"95 % CI {low:.2f}–{high:.2f}, " if low == low else ""
            evidence = f"{interval}R² {r2:.2f}, {points} lengths; {b_last:.2f} from {int(x0)} to {int(x1)} tokens"
            if verdict == "undetermined":
                parts.append(f"{name} ∝ L^{b:.2f} — undetermined ({evidence})")
                lengths = sorted({int(v) for v in pts["prompt_toks"]})
                # Halve below the shortest and double past the longest (exp2 drops what the model cannot hold).
                wanted = sorted(
                    {*lengths, *(lengths[0] // 2**k for k in (1, 2) if lengths[0] // 2**k >= 16), lengths[-1] * 2}
                )
                advice = (
                    f" A verdict needs ≥ {MIN_FIT_LENGTHS} lengths and an interval that excludes the other verdicts"
                    f" (superlinear: above 1; about linear: inside {LINEAR_BAND[0]}–{LINEAR_BAND[1]}): run `"
                    + rerun_command(
                        "exp2",
                        ok.iloc[0],
                        seqlens=wanted,
                        gen_toks=int(ok.iloc[0]["gen_toks"]),
                        repeats=SUGGESTED_REPEATS,
                    )
                    + "`"
                )
            else:
                parts.append(f"{name} ∝ L^{b:.2f} ({verdict}, {evidence})")
        if parts:
            text = (
                f"{s.label}: over prompt lengths {values['min_prompt_toks']}–{values['max_prompt_toks']}, "
                + "; ".join(parts)
            )
            out.append(Finding("latency_exponent", "exp2", s.label, values, text + "." + advice))
    return out


def _tps_interval(view: View, row: Any) -> tuple[float, float] | None:
    """95 % interval of a cell's mean output tokens/s over its repeats: the dataset's columns (kvray.measure.
    metrics.summarize), else recomputed from its traces, else from ``output_tps_std`` and ``repeats``; None
    for a cell of one repeat (its spread is unknown)."""
    from kvray.measure.metrics import CI_LEVEL, mean_ci, student_t_ppf

    low, high = as_number(row.get("output_tps_ci_low")), as_number(row.get("output_tps_ci_high"))
    if low is not None and high is not None:
        return low, high
    per_repeat = repeat_throughput(view, str(row["cell_id"]))
    if len(per_repeat) > 1:
        return mean_ci(per_repeat)
    std, n = as_number(row.get("output_tps_std")), as_number(row.get("repeats"))
    mean = as_number(row.get("output_tps"))
    if std is None or n is None or n < 2 or mean is None or (std == 0 and not per_repeat):
        return None
    half = student_t_ppf(0.5 + CI_LEVEL / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def throughput_plateaus(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp1"):
        ok = ok_rows(s.rows).dropna(subset=["concurrency", "output_tps"]).sort_values("concurrency")
        partial = partial_rows(s.rows)
        if ok["concurrency"].nunique() < 2:
            continue
        tps = ok["output_tps"].astype(float).to_numpy()
        conc = [int(c) for c in ok["concurrency"]]
        intervals = [_tps_interval(view, r) for _, r in ok.iterrows()]
        spread_known = all(i is not None for i in intervals)
        best_i = int(tps.argmax())
        best, best_c = float(tps[best_i]), conc[best_i]
        c_max, c_prev = conc[-1], conc[-2]
        tps_last, tps_prev = float(tps[-1]), float(tps[-2])
        last_gain = tps_last / tps_prev - 1 if tps_prev > 0 else math.nan
        lows = [i[0] if i else float(t) for i, t in zip(intervals, tps, strict=True)]
        highs = [i[1] if i else float(t) for i, t in zip(intervals, tps, strict=True)]
        # The first concurrency that cannot be told from ≥ 90 % of the best (its interval reaches it).
        plateau_c = next(c for c, h in zip(conc, highs, strict=True) if h >= PLATEAU_FRACTION * best)
        rising = best_i == len(tps) - 1 and c_max != conc[0]
        still_rising = rising and spread_known and lows[-1] > highs[-2]
        degrades = best_c < c_max and tps_last < DEGRADE_FRACTION * best and spread_known and highs[-1] < lows[best_i]
        values: dict[str, Any] = {
            "plateau_concurrency": plateau_c,
            "best_output_tps": best,
            "best_concurrency": best_c,
            "max_concurrency_tested": c_max,
            "last_step_gain": last_gain,
            "still_rising": still_rising,
            "degrades": degrades,
            "spread_known": spread_known,
            "output_tps_ci": [[lo, hi] if i else None for i, lo, hi in zip(intervals, lows, highs, strict=True)],
            "points": len(conc),
        }
        ci = [f" [{lo:,.1f}–{hi:,.1f}]" if i else "" for i, lo, hi in zip(intervals, lows, highs, strict=True)]
        if not spread_known:
            one = [c for c, i in zip(conc, intervals, strict=True) if i is None]
            row = ok.iloc[0]
            text = (
                f"{s.label}: output throughput is highest at c={best_c} ({best:,.1f} tok/s; c={c_prev}→{c_max} "
                f"{last_gain:+.0%}), but c={', '.join(map(str, one))} ran one repeat, so neither a plateau nor a "
                "drop can be told from run-to-run noise (10–15 % on shared machines). To tell, run `"
                + rerun_command(
                    "exp1",
                    row,
                    prompt_toks=int(row["prompt_toks"]),
                    gen_toks=int(row["gen_toks"]),
                    concurrency=conc,
                    repeats=SUGGESTED_REPEATS,
                )
                + "`"
            )
        elif still_rising:
            text = (
                f"{s.label}: no plateau yet — output throughput still rises at the largest concurrency tested "
                f"({tps_prev:,.1f}{ci[-2]} → {tps_last:,.1f}{ci[-1]} tok/s from c={c_prev} to c={c_max}, "
                f"{last_gain:+.0%}, beyond the repeats' 95 % intervals)"
            )
        else:
            text = (
                f"{s.label}: output throughput plateaus at c={plateau_c} (its 95 % interval reaches "
                f"{PLATEAU_FRACTION:.0%} of the best, {best:,.1f}{ci[best_i]} tok/s at c={best_c}); the last step "
                f"c={c_prev}→{c_max} changes it by {last_gain:+.0%}"
            )
            if degrades:
                text += f" — it degrades beyond c={best_c} ({tps_last:,.1f}{ci[-1]} tok/s at c={c_max})"
            elif best_c < c_max and tps_last < DEGRADE_FRACTION * best:
                text += (
                    f"; the drop after c={best_c} ({tps_last / best - 1:+.0%}) is within the repeats' 95 % "
                    "intervals, so it is not a measured degradation"
                )
            elif rising:
                text += " (the last gain is within the repeats' 95 % intervals)"
        if len(partial):
            values["partial_concurrencies"] = sorted(int(c) for c in partial["concurrency"])
            text += f" (partly failed cells, counting only successful requests: {failed_list(partial)})"
        out.append(Finding("throughput_plateau", "exp1", s.label, values, text + "."))
    return out


def _short_samples(view: View, cell_id: str, prompt_toks: int, metric: str) -> list[list[float]]:
    """A cell's ``metric`` values of its ok requests of ``prompt_toks`` tokens, one list per repeat."""
    tr = view.traces
    if not len(tr) or metric not in tr.columns:
        return []
    rows = tr[(tr["cell_id"] == cell_id) & (tr["prompt_toks"] == prompt_toks)]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    by = rows.groupby("repeat") if "repeat" in rows.columns else [(0, rows)]
    return [[float(v) for v in part[metric] if v == v] for _, part in by]


def mixed_penalties(view: View) -> list[Finding]:
    from kvray.analysis.stats import bootstrap_ratio
    from kvray.measure.metrics import supported_percentile

    out = []
    for p in mixed_pairs(view):
        alone_row = view.cells[view.cells["cell_id"] == p.alone_cell_id].iloc[0]
        mixed_row = view.cells[view.cells["cell_id"] == p.mixed_cell_id].iloc[0]
        like = int(alone_row["concurrency"]) == p.n_short
        values: dict[str, Any] = {
            "short_toks": p.short_toks,
            "long_toks": p.long_toks,
            "n_short": p.n_short,
            "n_long": p.n_long,
            "alone_concurrency": int(alone_row["concurrency"]),
            "like_with_like": like,
        }
        for stat in MIXED_STATS:
            values[f"{stat}_alone"] = p.alone.get(stat, math.nan)
            values[f"{stat}_mixed"] = p.mixed.get(stat, math.nan)
            values[f"{stat}_ratio"] = p.ratio(stat)
        n_alone, n_mixed = int(p.alone.get("requests", 0)), int(p.mixed.get("requests", 0))
        values.update(n_alone=n_alone, n_mixed=n_mixed)
        parts = []
        for metric, name in (("ttft_s", "TTFT"), ("e2e_s", "E2E")):
            alone = _short_samples(view, p.alone_cell_id, p.short_toks, metric)
            mixed = _short_samples(view, p.mixed_cell_id, p.short_toks, metric)
            ch = bootstrap_ratio(alone, mixed, 50)
            values[f"{metric}_p50_ratio_ci_low"], values[f"{metric}_p50_ratio_ci_high"] = ch.ci_low, ch.ci_high
            distinct = len({round(v, 9) for g in alone for v in g}), len({round(v, 9) for g in mixed for v in g})
            values[f"{metric}_distinct_values"] = list(distinct)
            interval = f" [95 % CI {ch.ci_low:.2f}–{ch.ci_high:.2f}]" if ch.ci_low == ch.ci_low else ""
            tail = supported_percentile(min(n_alone, n_mixed))
            if tail is None:  # the sample cannot hold a p90: its tail is its maximum, named as such
                flat_a, flat_m = [v for g in alone for v in g], [v for g in mixed for v in g]
                t_alone = max(flat_a) if flat_a else math.nan
                t_mixed = max(flat_m) if flat_m else math.nan
                tail_name = f"max of {n_alone}" if n_alone == n_mixed else f"max of {n_alone} alone / {n_mixed} mixed"
            else:
                t_alone, t_mixed = (
                    p.alone.get(f"{metric}_p{tail}", math.nan),
                    p.mixed.get(f"{metric}_p{tail}", math.nan),
                )
                t_alone = t_alone if t_alone == t_alone else _pct(alone, tail)
                t_mixed = t_mixed if t_mixed == t_mixed else _pct(mixed, tail)
                tail_name = f"p{tail}"
            values[f"{metric}_tail_stat"] = tail_name
            values[f"{metric}_tail_ratio"] = t_mixed / t_alone if t_alone else math.nan
            parts.append(
                f"{name} p50 ×{p.ratio(f'{metric}_p50'):.2f}{interval} "
                f"({human_seconds(p.alone.get(f'{metric}_p50', math.nan))} → "
                f"{human_seconds(p.mixed.get(f'{metric}_p50', math.nan))}), {name} {tail_name} "
                f"×{values[f'{metric}_tail_ratio']:.2f} ({human_seconds(t_alone)} → {human_seconds(t_mixed)})"
            )
        repeats = int(as_number(mixed_row.get("repeats")) or 1)
        text = (
            f"{p.series}: {p.short_toks}-token requests batched with {p.n_long} × {p.long_toks}-token "
            f"request(s): " + "; ".join(parts) + f". Rests on {n_alone} short requests alone and {n_mixed} mixed "
            f"({repeats} repeat(s); distinct TTFTs {values['ttft_s_distinct_values'][0]} and "
            f"{values['ttft_s_distinct_values'][1]} — requests of one static batch share theirs)"
        )
        advice = []
        if not like:
            values["ttft_s_p50_ratio_ci_low"] = values["ttft_s_p50_ratio_ci_high"] = math.nan
            text += (
                f". Not like with like: the only baseline ran {int(alone_row['concurrency'])} short requests, not the"
                f" same {p.n_short}, so the ratios mix the long request's cost with a change of batch size"
            )
        if not like or min(n_alone, n_mixed) < 100:
            short_repeats = max(SUGGESTED_REPEATS, math.ceil(100 / max(p.n_short, 1)))
            advice.append(
                "For a like-with-like p99 run `"
                + rerun_command(
                    "exp3",
                    mixed_row,
                    short=p.short_toks,
                    long=p.long_toks,
                    gen_toks=int(mixed_row["gen_toks"]),
                    n_short=p.n_short,
                    n_long=p.n_long,
                    repeats=short_repeats,
                )
                + "` (the short requests alone at the same concurrency, ≥ 100 of them a side)"
            )
        out.append(
            Finding(
                "mixed_penalty", "exp3", p.series, values, text + ". " + "; ".join(advice) + ("." if advice else "")
            )
        )
    return out


def _pct(groups: list[list[float]], percentile: float) -> float:
    flat = [v for g in groups for v in g]
    return float(np.percentile(flat, percentile)) if flat else math.nan
