"""Figures of the static-vs-paged and in-process-vs-server comparison (exp4), from a results folder alone.

fig8_backend_compare  the same workload on each backend vs concurrency: peak memory, output throughput,
                      p99 TTFT and E2E, and KV reserved vs KV used (a paged engine reserves its pool up front;
                      a static cache holds exactly what it allocated, so for hf the two coincide)
fig9_kv_timeline      KV usage and running / waiting requests over one cell's measured runs, per backend that
                      records a timeline (vLLM's Prometheus metrics, hf-paged's own cache)

Memory is read per row by the one definition every reader shares (kvray.analysis.views.PEAK_COLUMNS), because
backends see different things: a server's GPU memory (``server_gpu_peak_bytes``) or its process tree's RSS,
torch's allocator (``peak_allocated_bytes``), this process (``rss_peak_bytes``) or the whole GPU; the footnote
says which one each backend used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.analysis.views import as_number, peak_memory
from kvray.figures import style
from kvray.figures.common import FigureResult, new_figure

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

SERVER_FIGURES = ("fig8_backend_compare", "fig9_kv_timeline")
BACKEND_ORDER = ("hf", "hf-paged", "vllm", "openai", "ollama", "sim", "synthetic")


def kv_reserved_used(row: Any) -> tuple[float | None, float | None]:
    """(reserved, used) KV bytes of a row: a paged engine's pool and peak use, else the static cache for both."""
    get = row.get if hasattr(row, "get") else row.__getitem__
    measured = as_number(get("kv_measured_bytes"))
    reserved = as_number(get("kv_reserved_bytes")) or measured
    used = as_number(get("kv_used_peak_bytes"))
    return reserved, used if used is not None else measured


def memory_bytes(row: Any) -> tuple[float | None, str | None]:
    """(bytes, what measured them): the row's peak memory by the one definition (kvray.analysis.views.PEAK_COLUMNS,
    a server's GPU memory first)."""
    return peak_memory(row)


def _backend_key(name: str) -> tuple[int, str]:
    return (BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER), name)


def _rows(cells: Any) -> Any:
    exp4 = cells[cells["experiment"] == "exp4"] if "experiment" in cells.columns else cells.iloc[0:0]
    rows = exp4 if len(exp4) else cells
    if "workload" in rows.columns:
        rows = rows[rows["workload"] == "uniform"]
    return rows


def fig8_backend_compare(cells: Any, out_dir: Path) -> FigureResult:
    """Four panels vs concurrency, one colour per backend."""
    rows = _rows(cells)
    ok = rows[rows["status"] == "ok"] if len(rows) else rows
    if len(ok):  # drawn against concurrency: an open loop's row (a rate, no concurrency) has no place on it
        ok = ok[ok["concurrency"].notna()]
    with new_figure("fig8_backend_compare", out_dir, 1, 4, figsize=(15, 3.6), layout=None) as d:
        result = d.result
        if not len(ok):
            d.missing("needs ok cells of several backends (kvray exp4)", "no ok cells to compare")
            return result
        backends = sorted(ok["backend"].unique(), key=_backend_key)
        sources: dict[str, str] = {}
        ax_mem, ax_tps, ax_lat, ax_kv = d.axes
        for i, backend in enumerate(backends):
            part = ok[ok["backend"] == backend].sort_values("concurrency")
            colour, mark = style.color(i), style.marker(i)
            x = part["concurrency"].astype(float).tolist()
            mem = [memory_bytes(r) for _, r in part.iterrows()]
            if any(m for m, _ in mem):
                ax_mem.plot(x, [(m or math.nan) / 2**20 for m, _ in mem], color=colour, marker=mark, label=backend)
                sources[backend] = next(desc for m, desc in mem if desc)
            ax_tps.plot(x, part["output_tps"].astype(float), color=colour, marker=mark, label=backend)
            # TTFT means different things per backend: the engine's clock in-process, the client's over HTTP.
            basis = str(part["ttft_basis"].iloc[0]) if "ttft_basis" in part.columns else "engine"
            ax_lat.plot(
                x, part["ttft_s_p99"].astype(float) * 1e3, color=colour, marker=mark, label=f"{backend} TTFT ({basis})"
            )
            ax_lat.plot(
                x,
                part["e2e_s_p99"].astype(float) * 1e3,
                color=colour,
                marker=mark,
                linestyle="--",
                markerfacecolor="white",
                label=f"{backend} E2E",
            )
            kv = [kv_reserved_used(r) for _, r in part.iterrows()]
            if any(r for r, _ in kv):  # hollow markers, staggered sizes: equal pools stay visible as rings
                ax_kv.plot(
                    x,
                    [(r or math.nan) / 2**20 for r, _ in kv],
                    color=colour,
                    linestyle="--",
                    marker=mark,
                    markerfacecolor="none",
                    markersize=5 + 3 * i,
                    label=f"{backend} reserved",
                )
                ax_kv.plot(
                    x, [(u or math.nan) / 2**20 for _, u in kv], color=colour, marker=mark, label=f"{backend} used"
                )
            result.series.append(backend)
        ticks = sorted({float(c) for c in ok["concurrency"]})
        for ax, title, ylabel in (
            (ax_mem, "peak memory", "MiB"),
            (ax_tps, "output throughput", "tokens/s"),
            (ax_lat, "p99 latency (— TTFT, -- E2E)", "ms"),
            (ax_kv, "KV reserved (--) vs used (—)", "MiB"),
        ):
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("concurrent requests")
            if len(ticks) > 1 and ticks[-1] / ticks[0] >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.legend(fontsize=6.5)
        for ax in (ax_lat, ax_kv):
            ax.set_yscale("log")
        first = ok.iloc[0]
        model = Path(str(first["model"])).name if Path(str(first["model"])).is_absolute() else first["model"]
        style.figure_title(
            d.fig,
            "Static vs paged KV, in-process vs server",
            f"{model} · {first['dtype']} · prompt {first['prompt_toks']} · gen {first['gen_toks']}",
        )
        d.fig.subplots_adjust(top=0.78, wspace=0.32)
        result.notes = [f"memory of {b}: {desc}" for b, desc in sources.items()]
        result.notes.append(
            "KV used: peak of the samples taken during the run (vLLM's /metrics, hf-paged's cache); "
            "a run shorter than a scrape may have none"
        )
        failed = rows[rows["status"] != "ok"]
        if len(failed):
            result.notes.append(
                f"{len(failed)} cells not ok (not drawn): "
                + ", ".join(sorted({f"{r.backend} c{r.concurrency} {r.status}" for r in failed.itertuples()}))
            )
        result.caption = "Same workload per backend: memory, throughput, tail latency and KV reserved vs used."
    return result


def timelines(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend, the record (cells.jsonl dict) with a KV timeline at the highest concurrency."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        points = (rec.get("extra") or {}).get("kv_timeline") or []
        if rec.get("status") != "ok" or not points:
            continue
        backend = rec["cell"]["backend"]
        conc = len(rec["cell"]["workload"]["requests"])
        if backend not in best or conc > len(best[backend]["cell"]["workload"]["requests"]):
            best[backend] = rec
    return dict(sorted(best.items(), key=lambda kv: _backend_key(kv[0])))


def fig9_kv_timeline(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    """KV usage (%) and running / waiting requests over the first measured repeat, one panel per backend."""
    chosen = timelines(records)
    panels = max(len(chosen), 1)
    with new_figure("fig9_kv_timeline", out_dir, 1, panels, figsize=(5 * panels, 3.2), squeeze=False, layout=None) as d:
        result = d.result
        if not chosen:
            d.missing(
                "no KV timeline recorded (vllm or hf-paged cells record one)", "no cell carries extra.kv_timeline"
            )
            return result
        for ax, (backend, rec) in zip(d.axes[0], chosen.items(), strict=True):
            _timeline_panel(ax, backend, rec)
            result.series.append(backend)
        style.figure_title(
            d.fig, "KV cache usage during a run", "first measured repeat of the largest cell per backend"
        )
        d.fig.subplots_adjust(top=0.78, wspace=0.45)
        result.caption = "How full the KV pool gets and how many requests run or wait, sampled during the run."
    return result


def _timeline_panel(ax: Any, backend: str, rec: dict[str, Any]) -> None:
    """KV usage (%) on the left axis, running and waiting requests on the right, as steps over time."""
    points = [p for p in rec["extra"]["kv_timeline"] if p.get("repeat", 0) == 0]
    t = [p["t_s"] for p in points]
    usage = [100 * p["kv_usage"] if p.get("kv_usage") is not None else math.nan for p in points]
    ax.step(t, usage, where="post", color=style.color(0), label="KV usage %")
    ax.set_ylabel("KV usage (% of pool)")
    ax.set_xlabel("seconds into the run")
    twin = ax.twinx()
    for j, key in enumerate(("running", "waiting")):
        values = [p[key] if p.get(key) is not None else math.nan for p in points]
        twin.step(t, values, where="post", color=style.color(j + 1), linestyle="--", label=key)
    twin.set_ylabel("requests")
    twin.grid(False)
    conc = len(rec["cell"]["workload"]["requests"])
    ax.set_title(f"{backend}: {conc} requests")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], fontsize=6.5, loc="center right")


def has_server_data(records: list[dict[str, Any]]) -> bool:
    """True when rows (a Dataset's ``records``) hold exp4 cells or KV timelines — what fig8 / fig9 draw."""
    return any(r["cell"].get("experiment") == "exp4" or (r.get("extra") or {}).get("kv_timeline") for r in records)


def server_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """fig8 and fig9 of a Dataset (kvray.analysis.dataset), each saying what is missing where data is."""
    with style.styled():
        return [fig8_backend_compare(dataset.cells, out_dir), fig9_kv_timeline(dataset.records, out_dir)]
