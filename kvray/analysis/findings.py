"""Views of a results dataset, and the findings the report states — computed from the data alone.

The figures (kvray/plots.py) and the report (kvray/report.py) read the dataset through the same views
here, so a number in the report is the number under the figure. Nothing here imports matplotlib,
torch or Ray; pandas and numpy only.

Findings (one per series — a GPU type, a backend, a dtype — where the dataset holds several):
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvray.units import human_bytes, human_seconds

OOM_STATUSES = ("oom", "skipped_after_oom", "refused")
OOM_LABELS = {"oom": "OOM", "skipped_after_oom": "skipped after OOM", "refused": "refused (predicted OOM)"}
# Columns a series is told apart by, in label order; hardware is shown by its short GPU name.
SERIES_KEYS = ("model", "hardware_label", "backend", "dtype", "kv_dtype", "weights")
# Measured peak memory: the allocator's peak on a GPU, the process RSS on a CPU, NVML as the last resort.
PEAK_COLUMNS = (
    ("peak_allocated_bytes", "torch max_memory_allocated"),
    ("rss_peak_bytes", "process RSS peak"),
    ("nvml_peak_used_bytes", "NVML device used"),
    ("peak_reserved_bytes", "torch max_memory_reserved"),
)
BASELINE_COLUMNS = (("baseline_bytes", "memory after load + warmup"), ("weights_bytes", "weight bytes"))
# Columns the views read; any that a dataset lacks is added as NaN and reported as missing.
EXPECTED_COLUMNS = (
    "cell_id",
    "experiment",
    "model",
    "backend",
    "dtype",
    "kv_dtype",
    "weights",
    "hardware",
    "hardware_memory_bytes",
    "workload",
    "concurrency",
    "prompt_toks",
    "gen_toks",
    "prompt_toks_list",
    "repeats",
    "status",
    "reason",
    "simulated",
    "baseline_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_used_bytes",
    "rss_peak_bytes",
    "weights_bytes",
    "kv_measured_bytes",
    "kv_predicted_bytes",
    "kv_rel_error",
    "ttft_s_p50",
    "ttft_s_p99",
    "tpot_s_p50",
    "tpot_s_p99",
    "e2e_s_p50",
    "e2e_s_p99",
    "output_tps",
    "output_tps_std",
    "total_tps",
)
_TEXT_COLUMNS = (
    "cell_id",
    "experiment",
    "model",
    "backend",
    "dtype",
    "kv_dtype",
    "weights",
    "hardware",
    "workload",
    "prompt_toks_list",
    "status",
    "reason",
)
SUPERLINEAR_ABOVE = 1.05
PLATEAU_FRACTION = 0.90


def short_hardware(name: Any) -> str:
    """ "NVIDIA H100 80GB HBM3" → "H100-SXM" (kvray's GPU table name); unknown names pass through."""
    from kvray.hardware.gpus import match_gpu

    text = str(name) if name is not None and name == name else "unknown"
    if text.lower() in ("cpu", "unknown", "any", ""):
        return text or "unknown"
    spec = match_gpu(text)
    return spec.name if spec else text


def capacity_bytes(hardware: Any, memory_bytes: Any) -> float:
    """The device's memory: what the worker reported, else the GPU table's figure; NaN for a CPU."""
    if memory_bytes is not None and memory_bytes == memory_bytes and float(memory_bytes) > 0:
        return float(memory_bytes)
    from kvray.hardware.gpus import match_gpu

    text = str(hardware) if hardware is not None and hardware == hardware else ""
    spec = match_gpu(text) if text and text.lower() != "cpu" else None
    return float(spec.memory_bytes) if spec else math.nan


@dataclass
class View:
    """The cells table made uniform (every expected column present, experiment inferred) plus traces."""

    cells: Any  # pandas DataFrame
    traces: Any  # pandas DataFrame
    missing_columns: list[str]
    series_keys: tuple[str, ...]  # the SERIES_KEYS that vary somewhere in the dataset
    labels: list[str] = field(default_factory=list)  # every series label, in colour order

    def series_label(self, row: Any, extra: tuple[str, ...] = ()) -> str:
        parts = [_fmt_key(k, row[k]) for k in self.series_keys]
        parts += [_fmt_key(k, row[k]) for k in extra]
        return " · ".join(p for p in parts if p) or str(row["hardware_label"])  # one series: name its hardware

    def color_index(self, label: str) -> int:
        return self.labels.index(label) if label in self.labels else len(self.labels)

    def context(self, rows: Any) -> str:
        """model · dtype · backend · hardware of ``rows`` — each a value, or the list of values."""
        parts = []
        for key, noun in (
            ("model", "models"),
            ("dtype", "dtypes"),
            ("backend", "backends"),
            ("hardware_label", "hardware types"),
        ):
            values = sorted({str(v) for v in rows[key].dropna()}) if len(rows) else []
            if not values:
                continue
            parts.append(", ".join(values) if len(values) <= 3 else f"{len(values)} {noun}")
        kv = sorted({str(v) for v in rows["kv_dtype"].dropna()} - {str(v) for v in rows["dtype"].dropna()})
        if kv:
            parts.insert(2, "KV " + ", ".join(kv))
        if len(rows) and "pretrained" not in set(rows["weights"].dropna()):
            parts.append("random weights")
        simulated = rows["simulated"].fillna(False).astype(bool) if len(rows) else None
        if simulated is not None and simulated.any():
            parts.append("simulated" if simulated.all() else "partly simulated")
        return " · ".join(parts)


def _fmt_key(key: str, value: Any) -> str:
    if value is None or value != value:
        return ""
    if key == "prompt_toks":
        return f"prompt {int(value)}"
    if key == "gen_toks":
        return f"gen {int(value)}"
    if key == "concurrency":
        return f"c={int(value)}"
    if key == "kv_dtype":
        return f"KV {value}"
    if key == "weights":
        return f"{value} weights"
    return str(value)


def prepare(cells: Any, traces: Any = None) -> View:
    """A View of ``load_dataset``'s frames; tolerant of missing columns and of an empty dataset."""
    import pandas as pd

    df = cells.copy() if cells is not None else pd.DataFrame()
    missing = [c for c in EXPECTED_COLUMNS if c not in df.columns]
    for col in missing:
        df[col] = "" if col in _TEXT_COLUMNS else np.nan
    keep_as_is = {
        *_TEXT_COLUMNS,
        "simulated",
        "started_at",
        "node_id",
        "device",
        "hardware_requested",
        "accelerator_type",
    }
    for col in df.columns:
        if col not in keep_as_is and df[col].dtype == object:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["kv_dtype"] = df["kv_dtype"].where(df["kv_dtype"].astype(str).ne(""), df["dtype"])
    df["hardware_label"] = [short_hardware(h) for h in df["hardware"]]
    df["capacity_bytes"] = [
        capacity_bytes(h, m) for h, m in zip(df["hardware"], df["hardware_memory_bytes"], strict=True)
    ]
    df["experiment"] = _infer_experiments(df)
    df["kv_rel_error"] = _kv_rel_error(df)
    tr = traces.copy() if traces is not None and len(traces) else pd.DataFrame()
    varying = tuple(k for k in SERIES_KEYS if df[k].astype(str).nunique() > 1) if len(df) else ()
    view = View(df, tr, missing, varying)
    if len(df):
        view.labels = sorted({view.series_label(row) for _, row in df.iterrows()})
    return view


def _kv_rel_error(df: Any) -> Any:
    """The dataset's kv_rel_error, filled in where only measured and predicted KV were recorded."""
    measured, predicted = df["kv_measured_bytes"].astype(float), df["kv_predicted_bytes"].astype(float)
    computed = (measured - predicted) / predicted.where(predicted > 0)
    return df["kv_rel_error"].astype(float).fillna(computed)


def _infer_experiments(df: Any) -> list[str]:
    """The row's experiment label; unlabelled rows (a job file without experiment) are read by shape:
    mixed workloads → exp3, uniform sweeps over concurrency → exp1, over prompt length → exp2."""
    labels = [str(e) if isinstance(e, str) and e else "" for e in df["experiment"]]
    unlabelled = [i for i, e in enumerate(labels) if not e]
    if not unlabelled:
        return labels
    sub = df.iloc[unlabelled]
    base = [k for k in SERIES_KEYS if k in df.columns]
    for pos, (_, row) in zip(unlabelled, sub.iterrows(), strict=True):
        if row["workload"] == "mixed":
            labels[pos] = "exp3"
            continue
        same = sub[(sub[base].astype(str) == row[base].astype(str)).all(axis=1) & (sub["workload"] == "uniform")]
        by_conc = same[(same["prompt_toks"] == row["prompt_toks"]) & (same["gen_toks"] == row["gen_toks"])]
        by_len = same[(same["concurrency"] == row["concurrency"]) & (same["gen_toks"] == row["gen_toks"])]
        if by_conc["concurrency"].nunique() > 1:
            labels[pos] = "exp1"
        elif by_len["prompt_toks"].nunique() > 1:
            labels[pos] = "exp2"
    return labels


@dataclass
class Series:
    label: str
    rows: Any  # DataFrame of the series' cells, sorted by the x column
    color_index: int


def split_series(view: View, rows: Any, x: str, extra: tuple[str, ...] = ()) -> list[Series]:
    """The rows grouped by series label (the dataset's varying keys, plus ``extra`` shape keys)."""
    if not len(rows):
        return []
    extra = tuple(k for k in extra if rows[k].nunique() > 1)
    labels = [view.series_label(row, extra) for _, row in rows.iterrows()]
    rows = rows.assign(_series=labels)
    out = []
    for i, label in enumerate(sorted(set(labels))):
        part = rows[rows["_series"] == label].sort_values(x)
        index = view.color_index(label) if not extra else i
        out.append(Series(label, part, index))
    return out


def experiment_rows(view: View, experiment: str) -> Any:
    return view.cells[view.cells["experiment"] == experiment]


def ok_rows(rows: Any) -> Any:
    return rows[rows["status"] == "ok"]


def oom_rows(rows: Any) -> Any:
    return rows[rows["status"].isin(OOM_STATUSES)]


def first_column(rows: Any, candidates: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """The first (column, description) of ``candidates`` with a value in ``rows``."""
    for col, desc in candidates:
        if col in rows.columns and rows[col].notna().any():
            return col, desc
    return None


def repeat_throughput(view: View, cell_id: str) -> list[float]:
    """Output tokens/s of each measured repeat of a cell, from its traces (kvray.measure.metrics.throughput)."""
    from kvray.measure.metrics import throughput
    from kvray.measure.trace import RunTrace

    tr = view.traces
    if not len(tr) or "cell_id" not in tr.columns or "repeat" not in tr.columns:
        return []
    rows = tr[tr["cell_id"] == cell_id]
    out = []
    for _, part in rows.groupby("repeat"):
        traces = [RunTrace.from_dict(r) for r in part.to_dict("records")]
        value = throughput(traces)["output_tps"]
        if value == value:
            out.append(float(value))
    return out


@dataclass
class MixedPair:
    """Short requests of a mixed cell, and the same short requests run without the long ones."""

    series: str
    color_index: int
    short_toks: int
    long_toks: int
    n_short: int
    n_long: int
    mixed: dict[str, float]  # ttft_s_p50, ttft_s_p99, e2e_s_p50, e2e_s_p99 … of the short requests
    alone: dict[str, float]
    mixed_cell_id: str
    alone_cell_id: str


def _request_stats(view: View, cell_id: str, prompt_toks: int | None) -> dict[str, float]:
    """TTFT/E2E statistics (kvray.measure.metrics.describe) of a cell's ok requests of ``prompt_toks`` tokens."""
    from kvray.measure.metrics import describe

    tr = view.traces
    if not len(tr) or "cell_id" not in tr.columns:
        return {}
    rows = tr[tr["cell_id"] == cell_id]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    if prompt_toks is not None and "prompt_toks" in rows.columns:
        rows = rows[rows["prompt_toks"] == prompt_toks]
    if not len(rows):
        return {}
    out: dict[str, float] = {"requests": float(len(rows))}
    for name in ("ttft_s", "e2e_s", "tpot_s", "queue_s"):
        if name in rows.columns:
            out.update(describe(rows[name].astype(float), name))
    return out


def mixed_pairs(view: View) -> list[MixedPair]:
    """Each ok mixed cell of exp3 matched with the uniform cell of its short requests on the same series."""
    rows = experiment_rows(view, "exp3")
    mixed = ok_rows(rows[rows["workload"] == "mixed"])
    uniform = ok_rows(view.cells[view.cells["workload"] == "uniform"])
    pairs = []
    for _, m in mixed.iterrows():
        lengths = [int(x) for x in str(m["prompt_toks_list"]).split(",") if x.strip().isdigit()]
        if len(set(lengths)) < 2:
            continue
        short, long = min(lengths), max(lengths)
        n_short = lengths.count(short)
        keys = [k for k in SERIES_KEYS if k in view.cells.columns]
        same = uniform[(uniform[keys].astype(str) == m[keys].astype(str)).all(axis=1)]
        same = same[(same["prompt_toks"] == short) & (same["gen_toks"] == m["gen_toks"])]
        if not len(same):
            continue
        same = same.assign(_exp=(same["experiment"] != "exp3").astype(int), _dist=(same["concurrency"] - n_short).abs())
        alone = same.sort_values(["_exp", "_dist"]).iloc[0]
        mixed_stats = _request_stats(view, str(m["cell_id"]), short)
        alone_stats = _request_stats(view, str(alone["cell_id"]), short)
        if not mixed_stats or not alone_stats:
            continue
        label = view.series_label(m)
        pairs.append(
            MixedPair(
                label,
                view.color_index(label),
                short,
                long,
                n_short,
                len(lengths) - n_short,
                mixed_stats,
                alone_stats,
                str(m["cell_id"]),
                str(alone["cell_id"]),
            )
        )
    return pairs


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
    for s in split_series(view, experiment_rows(view, "exp1"), "concurrency", ("prompt_toks", "gen_toks")):
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
        source = "simulated" if bool(ok["simulated"].fillna(False).astype(bool).all()) else peak[1]
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
    for s in split_series(view, experiment_rows(view, "exp2"), "prompt_toks", ("concurrency", "gen_toks")):
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
    for s in split_series(view, experiment_rows(view, "exp1"), "concurrency", ("prompt_toks", "gen_toks")):
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
        for stat in ("ttft_s_p50", "ttft_s_p99", "e2e_s_p50", "e2e_s_p99"):
            alone, mixed = p.alone.get(stat, math.nan), p.mixed.get(stat, math.nan)
            values[f"{stat}_alone"], values[f"{stat}_mixed"] = alone, mixed
            values[f"{stat}_ratio"] = mixed / alone if alone and alone == alone else math.nan
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
    for exp, x, extra, noun in (
        ("exp1", "concurrency", ("prompt_toks", "gen_toks"), "concurrency"),
        ("exp2", "prompt_toks", ("concurrency", "gen_toks"), "prompt length"),
    ):
        for s in split_series(view, experiment_rows(view, exp), x, extra):
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
