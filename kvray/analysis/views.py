"""Views of a results dataset: the cells table made uniform, its series, and the row selections every reader uses.

The findings (kvray.analysis.findings), the figures (kvray.figures) and the report (kvray.report) read the
dataset through the same views here, so a number in the report is the number under the figure. Nothing here
imports matplotlib, torch or Ray; pandas and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvray.data.layout import LABEL_COLUMNS, MEMORY_COLUMNS, TEXT_COLUMNS
from kvray.hardware.gpus import match_gpu
from kvray.measure.metrics import LATENCY_METRICS
from kvray.measure.trace import MEASURED_STATUSES, RunTrace

ENERGY_TDP_ESTIMATE = "TDP × time estimate"  # the simulator's energy: the GPUs at TDP for the predicted time
OOM_STATUSES = ("oom", "skipped_after_oom", "refused")
OOM_LABELS = {"oom": "OOM", "skipped_after_oom": "skipped after OOM", "refused": "refused (predicted OOM)"}
# Columns a series is told apart by, in label order; hardware is shown by its short GPU name.
SERIES_KEYS = ("model", "hardware_label", "backend", "dtype", "kv_dtype", "weights", "tensor_parallel")
# Measured peak memory — THE definition every reader uses (report "peak mem", fig1/fig4, fig8, the memory-slope
# finding): the first column a row has, in this order. A server (vLLM) runs in another process, so this
# process's allocator is empty and its common ``rss_peak_bytes`` is the server's *host* RSS; on a GPU the
# server's own GPU memory (NVML per process, its CUDA context and KV pool included) is what it holds, so it
# comes first. Then an in-process backend's allocator peak on a GPU, a process's RSS on a CPU (a server's tree,
# or this process), and the whole device (NVML) as the last resort.
PEAK_COLUMNS = (
    ("server_gpu_peak_bytes", "server process tree GPU memory (NVML)"),
    ("peak_allocated_bytes", "torch max_memory_allocated"),
    ("server_rss_peak_bytes", "server process tree RSS"),
    ("rss_peak_bytes", "process RSS peak"),
    ("nvml_peak_used_bytes", "NVML device used"),
    ("peak_reserved_bytes", "torch max_memory_reserved"),
)
BASELINE_COLUMNS = (("baseline_bytes", "memory after load + warmup"), ("weights_bytes", "weight bytes"))
# Columns the views read; any that a dataset lacks is added (text as "", numbers as NaN) and reported missing.
# No view draws the NVML baseline or the activation peak, so a dataset without them is not short of anything.
EXPECTED_COLUMNS = (
    *LABEL_COLUMNS,
    "hardware_memory_bytes",
    "concurrency",
    "prompt_toks",
    "gen_toks",
    "repeats",
    "simulated",
    *(c for c in MEMORY_COLUMNS if c not in ("nvml_baseline_used_bytes", "activation_peak_bytes")),
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


# Requests behind each cell's figures. Datasets written before these columns existed get them derived
# (``_request_counts``): a percentile is never shown without the number of samples it pools.
COUNT_COLUMNS = ("requests", "requests_ok", "requests_failed", "failure_rate", *(f"{m}_n" for m in LATENCY_METRICS))


def as_number(value: Any) -> float | None:
    """``value`` as a float; None for None, NaN or text that is not a number (a cell a row left empty)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def short_hardware(name: Any) -> str:
    """ "NVIDIA H100 80GB HBM3" → "H100-SXM" (kvray's GPU table name); unknown names pass through."""
    text = str(name) if name is not None and name == name else "unknown"
    if text.lower() in ("cpu", "unknown", "any", ""):
        return text or "unknown"
    spec = match_gpu(text)
    return spec.name if spec else text


def capacity_bytes(hardware: Any, memory_bytes: Any) -> float:
    """The device's memory: what the worker reported, else the GPU table's figure; NaN for a CPU."""
    if memory_bytes is not None and memory_bytes == memory_bytes and float(memory_bytes) > 0:
        return float(memory_bytes)
    text = str(hardware) if hardware is not None and hardware == hardware else ""
    spec = match_gpu(text) if text and text.lower() != "cpu" else None
    return float(spec.memory_bytes) if spec else math.nan


def simulated_mask(rows: Any) -> Any:
    """True for each row the simulator produced (a missing flag reads as measured)."""
    return rows["simulated"].fillna(False).astype(bool)


# Backends whose ``tensor_parallel`` > 1 places whole layers over the GPUs (transformers' device_map): one GPU
# computes at a time and a step reads every weight once, as on one GPU — costed as TP 1, no all-reduce.
LAYER_WISE_BACKENDS = ("hf", "hf-paged")


def sharded_tensor_parallel(row: Any) -> int:
    """The TP degree a row's passes are costed at: the row's ``tensor_parallel`` (1 when absent), but 1 for a
    backend that spreads layers instead of splitting them (``LAYER_WISE_BACKENDS``)."""
    tp = as_number(row.get("tensor_parallel")) if hasattr(row, "get") else None
    if tp is None or tp < 1 or str(row.get("backend")) in LAYER_WISE_BACKENDS:
        return 1
    return int(tp)


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
        simulated = simulated_mask(rows) if len(rows) else None
        if simulated is not None and simulated.any():
            parts.append("simulated" if simulated.all() else "partly simulated")
        return " · ".join(parts)


# How a config key's value reads in a title or a label; any other key shows its value as it is.
_KEY_LABELS: dict[str, Callable[[Any], str]] = {
    "prompt_toks": lambda v: f"prompt {int(v)}",
    "gen_toks": lambda v: f"gen {int(v)}",
    "concurrency": lambda v: f"c={int(v)}",
    "kv_dtype": lambda v: f"KV {v}",
    "tensor_parallel": lambda v: f"TP{int(v)}",
    "weights": lambda v: f"{v} weights",
}


def _fmt_key(key: str, value: Any) -> str:
    if value is None or value != value:  # None or NaN
        return ""
    return _KEY_LABELS.get(key, str)(value)


def tokens_per_joule(rows: Any, kind: str | None = None) -> tuple[Any, str | None]:
    """(output tokens per joule per row, which kind) for one axis: measured energy and the simulator's estimate
    never share one.

    "measured": ``tok_per_s_per_w`` (tokens/s per W is tokens per J, kvray/measure/telemetry.py); rows without it
    stay NaN, never filled with an estimate. ``ENERGY_TDP_ESTIMATE``: 1 / the simulator's
    ``j_per_output_tok_tdp_estimate`` (``predicted_j_per_output_tok`` in datasets written before the rename).
    ``kind`` None picks measured when any row has it, else the estimate when any row has that, else None; a
    figure picks once over all its rows and passes the kind to each series."""
    import pandas as pd

    def column(name: str) -> Any:
        return pd.to_numeric(rows[name], errors="coerce") if name in rows else pd.Series(math.nan, index=rows.index)

    measured = column("tok_per_s_per_w")
    estimate = 1.0 / column("j_per_output_tok_tdp_estimate").fillna(column("predicted_j_per_output_tok"))
    if kind is None:
        kind = "measured" if measured.notna().any() else ENERGY_TDP_ESTIMATE if estimate.notna().any() else None
    return (estimate if kind == ENERGY_TDP_ESTIMATE else measured), kind


def prepare(cells: Any, traces: Any = None) -> View:
    """A View of ``load_dataset``'s frames; tolerant of missing columns and of an empty dataset."""
    import pandas as pd

    df = cells.copy() if cells is not None else pd.DataFrame()
    missing = [c for c in EXPECTED_COLUMNS if c not in df.columns]
    for col in missing:
        df[col] = "" if col in TEXT_COLUMNS else np.nan
    keep_as_is = {*TEXT_COLUMNS, "simulated"}
    for col in df.columns:
        if col not in keep_as_is and df[col].dtype == object:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["kv_dtype"] = df["kv_dtype"].where(df["kv_dtype"].astype(str).ne(""), df["dtype"])
    df["hardware_label"] = [short_hardware(h) for h in df["hardware"]]
    # rows written before tensor parallelism existed ran on one GPU
    tp = df["tensor_parallel"] if "tensor_parallel" in df.columns else pd.Series(1, index=df.index)
    df["tensor_parallel"] = pd.to_numeric(tp, errors="coerce").fillna(1).astype(int)
    df["capacity_bytes"] = [
        capacity_bytes(h, m) for h, m in zip(df["hardware"], df["hardware_memory_bytes"], strict=True)
    ]
    df["experiment"] = _infer_experiments(df)
    df["kv_rel_error"] = _kv_rel_error(df)
    _request_counts(df)
    tr = traces.copy() if traces is not None and len(traces) else pd.DataFrame()
    varying = tuple(k for k in SERIES_KEYS if df[k].astype(str).nunique() > 1) if len(df) else ()
    view = View(df, tr, missing, varying)
    if len(df):
        view.labels = sorted(set(series_labels(view, df)))
    return view


def series_labels(view: View, rows: Any, extra: tuple[str, ...] = ()) -> list[str]:
    """``view.series_label`` of every row, read column by column and labelled once per distinct combination: a
    pandas row per cell (``iterrows``) cost seconds on a 10,000-cell folder."""
    columns = list(dict.fromkeys([*view.series_keys, *extra, "hardware_label"]))
    labels: dict[tuple[Any, ...], str] = {}
    out = []
    for values in zip(*(rows[c] for c in columns), strict=True):
        key = tuple("nan" if v != v else v for v in values)  # NaN is one key, not one per row
        if key not in labels:
            labels[key] = view.series_label(dict(zip(columns, values, strict=True)), extra)
        out.append(labels[key])
    return out


def _request_counts(df: Any) -> None:
    """Fill COUNT_COLUMNS in place where a row lacks them: failure_rate = failed / requests; one TTFT, E2E and
    queue value per successful request (TPOT and ITL counts cannot be recovered and stay NaN)."""
    for col in COUNT_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
        df[col] = df[col].astype(float)
    requests = df["requests"].where(df["requests"] > 0)
    df["failure_rate"] = df["failure_rate"].fillna(df["requests_failed"] / requests)
    for metric in ("ttft_s", "e2e_s", "queue_s"):
        df[f"{metric}_n"] = df[f"{metric}_n"].fillna(df["requests_ok"])


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
    keys = [k for k in SERIES_KEYS if k in sub.columns]
    series = joined_keys(sub, keys) if keys else sub["workload"].map(lambda _: "")
    # per series, among its uniform rows: how many concurrencies share a (prompt, gen) shape, and how many
    # prompt lengths a (concurrency, gen) one — grouped once, not a scan of every row per row (10,000 rows)
    uniform = sub.assign(_series=series)[sub["workload"] == "uniform"]
    concurrencies = uniform.groupby(["_series", "prompt_toks", "gen_toks"])["concurrency"].nunique().to_dict()
    lengths = uniform.groupby(["_series", "concurrency", "gen_toks"])["prompt_toks"].nunique().to_dict()
    rows = zip(
        unlabelled, series, sub["workload"], sub["prompt_toks"], sub["gen_toks"], sub["concurrency"], strict=True
    )
    for pos, key, workload, prompt, gen, conc in rows:
        if workload == "mixed":
            labels[pos] = "exp3"
        elif concurrencies.get((key, prompt, gen), 0) > 1:
            labels[pos] = "exp1"
        elif lengths.get((key, conc, gen), 0) > 1:
            labels[pos] = "exp2"
    return labels


def joined_keys(rows: Any, keys: list[str]) -> Any:
    """The ``keys`` columns of each row as one "a|b|c" string, joined column by column (pandas' row-wise
    ``agg("|".join, axis=1)`` took seconds on a 10,000-cell folder)."""
    text = [rows[k].astype(str) for k in keys]
    return text[0].str.cat(text[1:], sep="|")


def same_series(rows: Any, row: Any) -> Any:
    """The ``rows`` whose SERIES_KEYS (model, hardware, backend, dtypes, weights) equal ``row``'s."""
    keys = [k for k in SERIES_KEYS if k in rows.columns]
    return rows[(rows[keys].astype(str) == row[keys].astype(str)).all(axis=1)]


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
    rows = rows.assign(_series=series_labels(view, rows, extra)).sort_values(x, kind="stable")
    out = []  # grouped once (a mask per label was O(labels × rows): seconds for 5,000 labels of 10,000 rows)
    for i, (label, part) in enumerate(rows.groupby("_series", sort=True)):
        index = view.color_index(str(label)) if not extra else i
        out.append(Series(str(label), part, index))
    return out


def experiment_rows(view: View, experiment: str) -> Any:
    return view.cells[view.cells["experiment"] == experiment]


# What exp1 and exp2 sweep (the x of their figures and fits), and the shape keys that tell apart several sweeps
# of one series (exp1 at two prompt lengths is two lines).
SWEEPS = {"exp1": ("concurrency", ("prompt_toks", "gen_toks")), "exp2": ("prompt_toks", ("concurrency", "gen_toks"))}


def sweep_series(view: View, experiment: str) -> list[Series]:
    """The series of a sweep experiment (exp1, exp2), each sorted by what it sweeps."""
    x, extra = SWEEPS[experiment]
    return split_series(view, experiment_rows(view, experiment), x, extra)


def ok_rows(rows: Any) -> Any:
    """The cells that were measured: ``ok`` and ``partial`` (some requests failed; drawn marked, tabled with
    their failure rate, their percentiles over the successful requests)."""
    return rows[rows["status"].isin(MEASURED_STATUSES)]


def partial_rows(rows: Any) -> Any:
    """Measured cells in which some requests failed."""
    return rows[rows["status"] == "partial"]


def oom_rows(rows: Any) -> Any:
    return rows[rows["status"].isin(OOM_STATUSES)]


def first_column(rows: Any, candidates: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """The first (column, description) of ``candidates`` with a value in ``rows``."""
    for col, desc in candidates:
        if col in rows.columns and rows[col].notna().any():
            return col, desc
    return None


def first_value(row: Any, candidates: tuple[tuple[str, str], ...]) -> tuple[float | None, str | None]:
    """(value, description) of the first of ``candidates`` that holds a number in one row; (None, None) if none."""
    for col, desc in candidates:
        value = as_number(row.get(col))
        if value is not None:
            return value, desc
    return None, None


def peak_memory(row: Any) -> tuple[float | None, str | None]:
    """(bytes, what measured them) of one row's peak memory: the first of PEAK_COLUMNS holding a non-zero
    number; (None, None) when none does."""
    for col, desc in PEAK_COLUMNS:
        value = as_number(row.get(col)) if hasattr(row, "get") else None
        if value:
            return value, desc
    return None, None


def peak_column(rows: Any) -> tuple[str, str] | None:
    """The (column, description) of PEAK_COLUMNS a group of rows (one series) is drawn or fitted from: the first
    with a non-zero value in any of them."""
    for col, desc in PEAK_COLUMNS:
        if col in rows.columns and (rows[col].astype(float) > 0).any():
            return col, desc
    return None


def repeat_throughput(view: View, cell_id: str) -> list[float]:
    """Output tokens/s of each measured repeat of a cell, from its traces (kvray.measure.metrics.throughput)."""
    from kvray.measure.metrics import throughput

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


# TTFT and E2E statistics of the short requests that a mixed cell is compared by (fig5, the report, findings).
MIXED_STATS = ("ttft_s_p50", "ttft_s_p99", "e2e_s_p50", "e2e_s_p99")


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

    def ratio(self, stat: str) -> float:
        """mixed / alone of one statistic (``ttft_s_p99`` …): how much the long requests cost the short ones."""
        alone, mixed = self.alone.get(stat, math.nan), self.mixed.get(stat, math.nan)
        return mixed / alone if alone and alone == alone else math.nan


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
        same = same_series(uniform, m)
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
