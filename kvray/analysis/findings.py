"""The findings the report states, computed from a dataset's views alone (kvray.analysis.views).

One finding per series — a GPU type, a backend, a dtype — where the dataset holds several:
  memory_slope        exp1: least-squares slope of measured peak memory vs concurrency (bytes per
                      extra concurrent request), beside the predicted and measured KV per request
  latency_exponent    exp2: b in latency ∝ prompt_tokens^b from a log-log least-squares fit, for TTFT
                      p50 and E2E p50, with its 95 % t interval; a verdict (superlinear: b > 1.05 and the
                      interval above 1; sublinear; about linear: the interval inside [0.9, 1.1]) only from
                      MIN_FIT_LENGTHS lengths and an interval that excludes the other verdict — else the
                      exponent is "undetermined" and the finding says which exp2 to run
  throughput_plateau  exp1: the smallest concurrency whose 95 % interval (over repeats) reaches 90 % of the
                      best output throughput; "still rising" and "degrades" only when the difference is
                      beyond both cells' intervals — with one repeat per cell nothing is concluded and the
                      finding gives the command with --repeats
  mixed_penalty       exp3: TTFT and E2E of the short requests batched with a long one over the same short
                      requests alone at the same concurrency (like with like; another baseline is named as
                      such and not concluded from), p50 ratio with a bootstrap interval by repeat, the tail as
                      the highest percentile the sample holds ("max of 6" when it holds none)
  oom_boundary        exp1/exp2: the largest concurrency (or prompt length) that ran and the smallest that
                      ran out of memory (oom, skipped after an oom, or refused by the pre-flight check)
  kv_error            every cell with both: kv_rel_error = (measured − predicted) / predicted KV bytes
  failures            partial cells: how many requests failed, and how many samples their percentiles pool
  sanity              warnings, not results: measured orderings physics rules out — a static batch whose TPOT
                      p50 falls by more than SANITY_MARGIN as concurrency grows (a batch of 2 steps no faster
                      than a batch of 1: the slower cell was disturbed), and latency below the roofline floor
                      of its GPU (peak bandwidth and FLOP/s at 100 %, no overhead: kvray.sim at η = 1)

The three findings that decide whether data may be called a conclusion (latency_exponent, throughput_plateau,
mixed_penalty) live in kvray.analysis.evidence, the fits in kvray.analysis.stats (fig3 draws the same power
law). pandas and numpy only: no matplotlib, torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvray.analysis.evidence import Finding
from kvray.analysis.stats import linear_fit
from kvray.analysis.stats import power_fit as power_fit  # fig3 draws the same power law
from kvray.analysis.views import (
    OOM_LABELS,
    SERIES_KEYS,
    SWEEPS,
    View,
    as_number,
    ok_rows,
    oom_rows,
    partial_rows,
    peak_column,
    series_labels,
    sharded_tensor_parallel,
    simulated_mask,
    split_series,
    sweep_series,
)
from kvray.backends import backend_class
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import match_gpu
from kvray.model.resolve import resolve_geometry
from kvray.sim.simulate import Efficiency, predict_cell
from kvray.units import human_bytes, human_seconds

# A static batch's TPOT p50 may fall by this much as concurrency grows before it is called implausible: repeats
# on a quiet machine scatter by a few per cent; a disturbed cell (issue 12: 18.7 ms at c=1, 6.4 ms at c=2) by 3×.
SANITY_MARGIN = 0.20
FLOOR_SLACK = 0.02  # below the roofline floor by more than this (the GPU table's rounding) is impossible


# ---------------------------------------------------------------- findings


def memory_slopes(view: View) -> list[Finding]:
    out = []
    for s in sweep_series(view, "exp1"):
        ok = ok_rows(s.rows)
        peak = peak_column(ok)
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


def oom_boundaries(view: View, exp: str, noun: str) -> list[Finding]:
    """The OOM boundary of the sweep ``exp`` (kvray.analysis.views.SWEEPS: exp1 over concurrency, exp2 over
    prompt length — ``noun``), per series."""
    out = []
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
    labels = series_labels(view, rows)
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
            )
            + f"its latency percentiles pool only the {int(values['ttft_s_n'] or 0)} that succeeded"
            + (f" — {str(r['reason'])[:160]}" if r["reason"] else "")
        )
        out.append(Finding("failures", str(r["experiment"]), view.series_label(r), values, text + "."))
    return out


def _static_batch(backend: str) -> bool:
    """A measured backend that runs each batch to its end before the next (hf ``generate``): its per-step
    time cannot fall as the batch grows."""
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
    if len(cells):  # only the shapes measured at several concurrencies can be out of order
        shape = [k for k in (*SERIES_KEYS, "prompt_toks", "gen_toks") if k in cells.columns]
        cells = cells[cells.groupby(shape, dropna=False)["concurrency"].transform("nunique") > 1]
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
    """Measured GPU cells faster than their GPU's roofline at 100 % of peak: impossible for one token per step.

    The floor is one GPU's of the row's TP group (``sharded_tensor_parallel``): its shard of the weights and of
    the KV read per step at the GPU's peak bandwidth and FLOP/s, no all-reduce (its latency is an estimate, not a
    bound). A layer-wise hf row reads every weight in turn, so its floor is one GPU's with all of them."""
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
            tp = sharded_tensor_parallel(r)
            floor = predict_cell(
                g,
                gpu,
                1,
                int(r["prompt_toks"]),
                int(r["gen_toks"]),
                dtype=str(r["dtype"]),
                kv_dtype=str(r["kv_dtype"]),
                eff=floor_eff,
                tp=tp,
                communication=False,
            )
        except Exception:  # a model kvray cannot resolve, a dtype the table lacks: no floor to compare with
            continue
        for metric, name, bound in (("tpot_s_p50", "TPOT p50", floor.tpot_s), ("ttft_s_p50", "TTFT p50", floor.ttft_s)):
            measured = as_number(r[metric])
            if measured is None or bound != bound or measured >= (1 - FLOOR_SLACK) * bound:
                continue
            values = {
                "check": "below_roofline_floor",
                "cell_ids": [str(r["cell_id"])],
                "suspect_cell_id": str(r["cell_id"]),
                "metric": metric,
                "measured_s": measured,
                "floor_s": bound,
                "gpu": gpu.name,
                "tensor_parallel": tp,
            }
            text = (
                f"{view.series_label(r)} c={int(r['concurrency'])} × prompt {int(r['prompt_toks'])}: {name} "
                f"{human_seconds(measured)} is below the roofline floor of {gpu.name}"
                f"{f' per GPU of TP {tp}' if tp > 1 else ''} ({human_seconds(bound)}: one "
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


@dataclass(frozen=True)
class FindingRule:
    """A kind of finding: its key, the report's heading over its findings, and how it is computed. Each experiment
    declares the rules of its own findings (kvray/experiments/); the ones below concern any cell."""

    key: str
    title: str
    compute: Callable[[View], list[Finding]]


def oom_rule(exp: str, noun: str) -> FindingRule:
    """The OOM-boundary rule of a sweep (exp1 over concurrency, exp2 over prompt length — ``noun``)."""
    return FindingRule(
        "oom_boundary", "Max concurrency / length before OOM", partial(oom_boundaries, exp=exp, noun=noun)
    )


# Findings about any cell, before and after the experiments' own (kvray.experiments.compute_findings).
GENERAL_FIRST = (
    FindingRule("sanity", "⚠ Implausible measurements (warnings: these cells are suspect, not results)",
                sanity_warnings),
    FindingRule("failures", "Cells with failed requests (percentiles over the successful ones only)", failures),
)  # fmt: skip
GENERAL_LAST = (FindingRule("kv_error", "Predicted vs measured KV", kv_errors),)


def compute_findings(view: View, rules: Sequence[FindingRule]) -> list[Finding]:
    """Every finding the data supports, in report order: GENERAL_FIRST, ``rules`` (the experiments'), GENERAL_LAST."""
    return [f for rule in (*GENERAL_FIRST, *rules, *GENERAL_LAST) for f in rule.compute(view)]
