"""exp7's figure — tensor-parallel scaling — one per model, from a results folder's records (cells.jsonl) alone.

exp7_tp_scaling_<model>   (a) TPOT p50 against the TP degree, (b) output tokens/s per GPU, (c) KV tokens that
                          fit per GPU (kvmath's prediction beside the tables, and the engine's reported pool
                          where a vLLM cell published one); a line per GPU type, concurrency and measured /
                          predicted (sim) source. A cell that did not fit its GPUs is an OOM mark on the x axis.

"Where TP stops paying": for each line, the first degree whose parallel efficiency — TPOT speed-up over the
line's smallest degree that ran, divided by the GPUs added (N / N₀) — falls below ``PAYS_EFFICIENCY``; it is
marked on panel (a) and listed in the notes (``FigureResult.notes``), which the tests read.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.errors import KvrayInputError
from kvray.figures import style
from kvray.figures.common import FigureResult, each_figure, label_axes, new_figure
from kvray.hardware.gpus import match_gpu
from kvray.model.oom import kv_tokens_that_fit
from kvray.model.resolve import resolve_geometry

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

PAYS_EFFICIENCY = 0.75  # below 75 % parallel efficiency, the extra GPUs are mostly buying all-reduces and idling
OOM_STATUSES = ("oom", "skipped_after_oom", "refused")


def _tp(rec: dict[str, Any]) -> int:
    return int(rec["cell"].get("tensor_parallel", 1))


def has_tp_data(records: list[dict[str, Any]]) -> bool:
    """True when any record is an exp7 cell or ran with TP > 1."""
    return any(r["cell"].get("experiment") == "exp7" or _tp(r) > 1 for r in records)


def _series_key(rec: dict[str, Any]) -> tuple[str, str, int]:
    source = "predicted" if rec.get("simulated") else f"measured ({rec['cell']['backend']})"
    hardware = str((rec.get("hardware") or {}).get("name") or rec["cell"].get("hardware", "any"))
    return hardware, source, len(rec["cell"]["workload"]["requests"])


def stops_paying(points: list[tuple[int, float]]) -> int | None:
    """The first TP degree whose TPOT parallel efficiency against the smallest degree falls below PAYS_EFFICIENCY.

    ``points`` are (tp, tpot_s) sorted by tp; efficiency at N = (TPOT(N₀) / TPOT(N)) / (N / N₀)."""
    if len(points) < 2:
        return None
    n0, t0 = points[0]
    for n, t in points[1:]:
        if t > 0 and (t0 / t) / (n / n0) < PAYS_EFFICIENCY:
            return n
    return None


def _kv_capacity(model: str, hardware: str, dtype: str, tp: int) -> int | None:
    """kvmath's KV tokens that fit per GPU beside the rank's weights (None for a GPU or model kvray lacks)."""
    spec = match_gpu(hardware)
    if spec is None:
        return None
    try:
        return kv_tokens_that_fit(resolve_geometry(model), spec, dtype, tp=tp)
    except KvrayInputError:
        return None


def fig_tp_scaling(model: str, records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/").replace("/", "--")).strip("-.") or "model"
    ran = [r for r in records if r["cell"]["model"] == model]
    with new_figure(
        f"exp7_tp_scaling_{slug}",
        out_dir,
        1,
        3,
        figsize=(13, 4),
        title=(f"exp7 · Tensor-parallel scaling: {model}", "TPOT, throughput per GPU, KV per GPU"),
    ) as d:
        ok = [r for r in ran if r.get("status") in ("ok", "partial") and (r.get("metrics") or {}).get("tpot_s_p50")]
        if not ok:
            return d.missing(f"no cell of {model} with a TPOT (kvray exp7)", "no TP cells")
        ax_tpot, ax_tps, ax_kv = d.axes
        groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for r in ok:
            groups.setdefault(_series_key(r), []).append(r)
        for i, (key, rows) in enumerate(sorted(groups.items())):
            hardware, source, concurrency = key
            rows = sorted(rows, key=_tp)
            tps = [_tp(r) for r in rows]
            tpot = [r["metrics"]["tpot_s_p50"] for r in rows]
            per_gpu = [r["metrics"]["output_tps"] / _tp(r) for r in rows]
            label = f"{hardware} c{concurrency} {source}"
            dash = "--" if source == "predicted" else "-"
            ax_tpot.plot(tps, [1e3 * t for t in tpot], dash, marker=style.marker(i), color=style.color(i), label=label)
            ax_tps.plot(tps, per_gpu, dash, marker=style.marker(i), color=style.color(i), label=label)
            d.result.series.append(label)
            stop = stops_paying(list(zip(tps, tpot, strict=True)))
            if stop is not None:
                ax_tpot.axvline(stop, color=style.color(i), linewidth=0.8, linestyle=":")
                d.result.notes.append(f"{label}: TP stops paying at {stop} (TPOT efficiency < {PAYS_EFFICIENCY:.0%})")
            else:
                d.result.notes.append(f"{label}: TP pays up to {tps[-1]} (TPOT efficiency ≥ {PAYS_EFFICIENCY:.0%})")
        for r in ran:
            if r.get("status") in OOM_STATUSES:
                ax_tpot.plot([_tp(r)], [0], marker="x", color="red", linestyle="none")
                d.result.oom_markers += 1
        degrees = sorted({_tp(r) for r in ran})
        dtype = str(ran[0]["cell"].get("dtype", "bf16"))
        for j, hardware in enumerate(sorted({k[0] for k in groups})):
            predicted = [(n, _kv_capacity(model, hardware, dtype, n)) for n in degrees]
            shown = [(n, c) for n, c in predicted if c is not None]
            if shown:
                ax_kv.plot(
                    [n for n, _ in shown],
                    [c for _, c in shown],
                    "--",
                    marker=style.marker(j),
                    color=style.color(j),
                    label=f"{hardware} kvmath",
                )
            reported = [
                (_tp(r), r["extra"]["kv_capacity"]["reported"].get("kv_cache_size_tokens"))
                for r in ok
                if _series_key(r)[0] == hardware and (r.get("extra") or {}).get("kv_capacity")
            ]
            reported = [(n, c) for n, c in reported if c]
            if reported:
                ax_kv.scatter(
                    [n for n, _ in reported],
                    [c for _, c in reported],
                    color=style.color(j),
                    label=f"{hardware} engine pool",
                )
        for ax, ylabel, title in (
            (ax_tpot, "TPOT p50 (ms)", "(a) TPOT"),
            (ax_tps, "output tokens/s per GPU", "(b) throughput per GPU"),
            (ax_kv, "KV tokens that fit per GPU", "(c) KV capacity per GPU"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_xticks(degrees, [str(n) for n in degrees])
            label_axes(ax, "tensor parallel degree", ylabel, title, legend_size=None)
        ax_tpot.legend(fontsize=6)
        if ax_kv.has_data():
            ax_kv.legend(fontsize=6)
        d.result.caption = (
            "TP splits weights and KV heads over N GPUs and adds two all-reduces per layer: latency falls "
            "sub-linearly while throughput per GPU falls; dotted lines mark where TP stops paying."
        )
    return d.result


def tp_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """One exp7 figure per model of a Dataset (kvray.analysis.dataset)."""
    records = dataset.records
    models = sorted({r["cell"]["model"] for r in records})
    return each_figure(
        out_dir,
        (
            (f"exp7_tp_scaling_{m.replace('/', '--')}", functools.partial(fig_tp_scaling, m, records, out_dir))
            for m in models
        ),
    )
