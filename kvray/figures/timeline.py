"""fig10: one cell's timeline — its requests above the hardware and the engine, on one clock.

Top: each request of one measured repeat as a horizontal bar in three parts — queued (arrival → the engine took
it: ``start_s``), prefill (→ first token) and decode (→ last token). Below, sharing the time axis, the cell's
timeline.parquet rows (kvray/measure/telemetry.py): GPU utilisation and power per GPU (or, on a CPU worker,
the process tree's CPU % and RSS), the engine's KV usage, and its running / waiting requests — or, where the
engine exports no such gauge, the requests in flight and queued as the traces place them (labelled so). All
times are seconds since the repeat's t0 on ``time.perf_counter``, the clock the traces are on, so a TTFT spike
can be read against a saturated GPU, a full KV pool or a growing queue at the same instant.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.errors import KvrayInputError
from kvray.figures import style
from kvray.figures.common import FigureResult, each_figure, new_figure

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

PHASES = (("queued", "#bbbbbb"), ("prefill", "#e69f00"), ("decode", "#0072b2"))


def figure_name(cell_id: str) -> str:
    return f"fig10_timeline_{cell_id}"


def _series(tl: Any, source: str, metric: str) -> tuple[list[float], list[float]]:
    rows = tl[(tl["source"] == source) & (tl["metric"] == metric)].sort_values("t_s")
    return rows["t_s"].tolist(), rows["value"].tolist()


def _request_bars(ax: Any, traces: list[dict[str, Any]]) -> int:
    """Queued / prefill / decode bars, one row per request in arrival order; failed requests outlined in red."""
    ordered = sorted(traces, key=lambda t: (t["arrival_s"], t["request_id"]))
    for y, t in enumerate(ordered):
        times = t.get("token_times_s") or []
        first = times[0] if times else t["end_s"]
        last = times[-1] if times else t["end_s"]
        spans = ((t["arrival_s"], t["start_s"]), (t["start_s"], first), (first, last))
        for (label, colour), (a, b) in zip(PHASES, spans, strict=True):
            if b > a:
                edge = "#d55e00" if t.get("status", "ok") != "ok" else "none"
                ax.barh(y, b - a, left=a, height=0.8, color=colour, edgecolor=edge, label=label if y == 0 else None)
    from matplotlib.ticker import MaxNLocator

    ax.set_ylabel("request (by arrival)")
    ax.set_ylim(len(ordered) - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one request: tick 0, not ±0.5
    handles = [style_patch(colour, label) for label, colour in PHASES]
    ax.legend(handles=handles, fontsize=6.5, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=3, frameon=False)
    return len(ordered)


def style_patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def _traces_counts(traces: list[dict[str, Any]], ts: list[float]) -> tuple[list[int], list[int]]:
    """(in flight, queued) at each time by the traces: start ≤ t < last token, arrival ≤ t < start."""
    inflight, queued = [], []
    for x in ts:
        inflight.append(sum(1 for t in traces if t["start_s"] <= x < (t.get("token_times_s") or [t["end_s"]])[-1]))
        queued.append(sum(1 for t in traces if t["arrival_s"] <= x < t["start_s"]))
    return inflight, queued


def fig10_timeline(record: dict[str, Any], timeline: Any, out_dir: Path, repeat: int = 0) -> FigureResult:
    """The timeline figure of one cell (``record``: its cells.jsonl dict; ``timeline``: its timeline rows)."""
    cell_id = record["cell_id"]
    traces = [t for t in record.get("traces", []) if t.get("repeat") == repeat]
    tl = timeline[(timeline["cell_id"] == cell_id) & (timeline["repeat"] == repeat)] if len(timeline) else timeline
    c = record["cell"]
    context = f"{c['model']} · {c['backend']} · {record.get('hardware', {}).get('name', '?')} · cell {cell_id}"
    with new_figure(
        figure_name(cell_id),
        out_dir,
        4,
        1,
        figsize=(10, 8.5),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.3, 1.3, 1.3]},
        title=(f"One cell on one clock: requests, hardware and engine (repeat {repeat})", context),
    ) as d:
        result = d.result
        ax_req, ax_hw, ax_kv, ax_q = d.axes
        if not traces:
            return d.missing(f"cell {cell_id} has no request traces for repeat {repeat}", "no traces to draw")
        result.series.append(f"{_request_bars(ax_req, traces)} requests")
        ax_req.set_title("requests: queued → prefill → decode", fontsize=8.5, loc="left")

        gpus = sorted(s for s in set(tl["source"]) if str(s).startswith("gpu:")) if len(tl) else []
        twin = ax_hw.twinx()
        twin.grid(False)
        if gpus:
            for i, gpu in enumerate(gpus):
                ax_hw.plot(*_series(tl, gpu, "gpu_util_pct"), color=style.color(i), label=f"{gpu} util %")
                twin.plot(*_series(tl, gpu, "power_w"), color=style.color(i), linestyle="--", label=f"{gpu} W")
                result.series += [f"{gpu} gpu_util_pct", f"{gpu} power_w"]
            ax_hw.set_ylabel("GPU util %")
            twin.set_ylabel("power (W)")
        else:
            t_cpu, cpu = _series(tl, "cpu", "cpu_pct") if len(tl) else ([], [])
            t_rss, rss = _series(tl, "cpu", "rss_bytes") if len(tl) else ([], [])
            ax_hw.plot(t_cpu, cpu, color=style.color(0), label="CPU % (100 = 1 core)")
            twin.plot(t_rss, [v / 2**30 for v in rss], color=style.color(1), linestyle="--", label="RSS GiB")
            ax_hw.set_ylabel("CPU %")
            twin.set_ylabel("RSS (GiB)")
            twin.set_ylim(bottom=0)
            if cpu:
                result.series.append("cpu cpu_pct")
            else:
                result.notes.append("no telemetry samples for this cell (telemetry_interval_s = 0, or an old dataset)")
        handles = ax_hw.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        if handles:
            ax_hw.legend(
                handles,
                [str(h.get_label()) for h in handles],
                fontsize=6.5,
                loc="lower right",
                bbox_to_anchor=(1.0, 1.0),
                ncols=4,
                frameon=False,
            )
        scope = record.get("extra", {}).get("energy", {}).get("telemetry_scope") or "kvray process"
        ax_hw.set_title(f"hardware ({'NVML' if gpus else 'CPU: ' + scope})", fontsize=8.5, loc="left")

        t_kv, kv = _series(tl, "engine", "kv_usage") if len(tl) else ([], [])
        if kv:
            ax_kv.step(t_kv, [100 * v for v in kv], where="post", color=style.color(2), label="KV usage %")
            ax_kv.set_ylabel("KV usage %")
            result.series.append("engine kv_usage")
        else:
            ax_kv.text(
                0.5,
                0.5,
                f"{c['backend']} exports no KV-usage gauge",
                ha="center",
                va="center",
                transform=ax_kv.transAxes,
                fontsize=8,
                color="#555555",
            )
        ax_kv.set_title("KV cache (engine)", fontsize=8.5, loc="left")

        t_run, running = _series(tl, "engine", "running") if len(tl) else ([], [])
        if running:
            t_wait, waiting = _series(tl, "engine", "waiting")
            ax_q.step(t_run, running, where="post", color=style.color(3), label="running (engine)")
            ax_q.step(t_wait, waiting, where="post", color=style.color(4), linestyle="--", label="waiting (engine)")
            result.series += ["engine running", "engine waiting"]
        else:
            ends = [(t.get("token_times_s") or [t["end_s"]])[-1] for t in traces]
            grid = sorted({t["arrival_s"] for t in traces} | {t["start_s"] for t in traces} | set(ends))
            inflight, queued = _traces_counts(traces, grid)
            ax_q.step(grid, inflight, where="post", color=style.color(3), label="in flight (traces)")
            ax_q.step(grid, queued, where="post", color=style.color(4), linestyle="--", label="queued (traces)")
            result.series += ["traces in flight", "traces queued"]
            result.notes.append(f"{c['backend']} exports no running/waiting gauges: counts are the traces' own")
        ax_q.set_ylabel("requests")
        ax_q.legend(fontsize=6.5, loc="upper right")
        ax_q.set_xlabel("seconds since the repeat's t0 (time.perf_counter: the traces' clock)")
        n = int((tl["source"] != "engine").sum()) if len(tl) else 0
        result.notes.append(
            f"{n} telemetry values, {int((tl['source'] == 'engine').sum()) if len(tl) else 0} engine "
            f"values in repeat {repeat}; {_energy_note(record)}"
        )
        result.caption = "Requests, hardware and engine gauges of one cell on the traces' clock."
    return result


def _energy_note(record: dict[str, Any]) -> str:
    energy = record.get("extra", {}).get("energy") or {}
    joules = energy.get("energy_j")
    if isinstance(joules, int | float) and joules == joules:
        return f"energy {joules:.1f} J ({energy.get('energy_basis')}), {energy.get('j_per_output_tok', 0):.3g} J/token"
    return f"energy not measured: {energy.get('energy_reason') or 'no telemetry'}"


def cell_timelines(dataset: Dataset, cell_ids: list[str], out_dir: Path) -> list[FigureResult]:
    """fig10 of each of ``cell_ids`` of a Dataset (kvray.analysis.dataset); an input error naming the known cells
    for an id the folder lacks. A figure that fails is replaced by one saying why."""
    records = {r["cell_id"]: r for r in dataset.records_with_traces_of(cell_ids)}
    if unknown := [c for c in cell_ids if c not in records]:
        known = sorted(r["cell_id"] for r in dataset.records)
        listed = ", ".join(known[:8]) + (" …" if len(known) > 8 else "")
        raise KvrayInputError(f"no cell {unknown[0]!r} in {dataset.folder} (cells: {listed})")

    def draw(cell_id: str) -> FigureResult:
        return fig10_timeline(records[cell_id], dataset.timeline_of(cell_id), out_dir)

    return each_figure(out_dir, ((figure_name(c), functools.partial(draw, c)) for c in cell_ids))
