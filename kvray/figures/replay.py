"""exp8's figures — a trace replayed — from a results folder's records alone.

exp8_arrivals       per replayed cell: requests sent per second, and requests running (sent → last token), over
                    the run (repeat 0, the client's clock)
exp8_ttft_over_time each request's TTFT against when it was sent, per backend / GPU, with the SLO
exp8_hit_rate_pool  the trace's LRU prefix hit rate against the pool size (predicted curve, kvray/traces/footprint.py,
                    trace rule at the engine's block size) with the unbounded rate; measured hit rates (an engine's
                    counters) as points at the pool the engine had
exp8_sessions_slo   p95 TTFT against concurrent sessions (multi-turn cells), the SLO, and the most sessions of those
                    swept whose p95 TTFT met it

Each figure says so in its panel when the folder holds nothing of its kind.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.figures import style
from kvray.figures.common import FigureResult, figures_of, label_axes, new_figure
from kvray.spec import RequestSpec
from kvray.traces import footprint as fp

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

REPLAY_FIGURES = ("exp8_arrivals", "exp8_ttft_over_time", "exp8_hit_rate_pool", "exp8_sessions_slo")
MAX_CELLS = 6  # replayed cells drawn in one figure (the first by backend, GPU, speedup)


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") in ("ok", "partial")]


def is_replay(rec: dict[str, Any]) -> bool:
    return ((rec["cell"]["workload"].get("load") or {}).get("kind")) == "replay"


def has_replay_data(records: list[dict[str, Any]]) -> bool:
    return any(is_replay(r) or r["cell"].get("experiment") == "exp8" for r in records)


def label(rec: dict[str, Any]) -> str:
    load = rec["cell"]["workload"].get("load") or {}
    hw = rec.get("hardware", {}).get("name") or rec["cell"].get("hardware")
    speed = f" at {load['rate_rps']:.3g} req/s" if load.get("rate_rps") else ""
    return f"{rec['cell']['backend']} {hw}{speed}"


def _replays(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [r for r in _ok(records) if is_replay(r) and r.get("traces")]
    return sorted(rows, key=label)[:MAX_CELLS]


def _repeat0(rec: dict[str, Any]) -> list[dict[str, Any]]:
    traces = [t for t in rec.get("traces") or [] if t.get("repeat", 0) >= 0]
    first = min((t["repeat"] for t in traces), default=0)
    return [t for t in traces if t["repeat"] == first]


def _slo_ms(rec: dict[str, Any], key: str = "ttft_ms") -> float | None:
    value = (rec["cell"]["workload"].get("slo") or {}).get(key)
    return float(value) if value is not None else None


def fig_arrivals(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    import numpy as np

    rows = _replays(records)
    with new_figure("exp8_arrivals", out_dir, 2, 1, figsize=(7, 5), sharex=True) as d:
        if not rows:
            return d.missing("no replayed trace cells (kvray exp8, or a trace: grid block)", "no replay cells")
        ax_a, ax_r = d.axes
        for i, rec in enumerate(rows):
            ts = _repeat0(rec)
            sent = np.array([t["sent_s"] if t.get("sent_s") is not None else t["arrival_s"] for t in ts])
            ends = np.array([t["end_s"] for t in ts])
            horizon = float(ends.max()) if len(ends) else 0.0
            edges = np.arange(0.0, horizon + 1.0, 1.0)
            counts, _ = np.histogram(sent, bins=edges)
            ax_a.step(edges[:-1], counts, where="post", color=style.color(i), label=label(rec))
            grid = np.linspace(0.0, horizon, 400)
            running = [int(((sent <= t) & (ends > t)).sum()) for t in grid]
            ax_r.plot(grid, running, color=style.color(i), label=label(rec))
            d.result.series.append(label(rec))
        ax_a.set_ylabel("requests sent per s")
        ax_r.set_ylabel("requests running")
        ax_r.set_xlabel("time since the repeat's start (s)")
        ax_a.legend(fontsize=7)
        ax_a.set_title("Trace replay: arrivals and requests in flight")
        d.result.caption = "The trace's arrivals as sent (1 s bins) and the requests in flight, repeat 0 of each cell."
        d.result.notes.append("running: a request counts from its send to its last token (client clock)")
    return d.result


def fig_ttft_over_time(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = _replays(records)
    with new_figure("exp8_ttft_over_time", out_dir, 1, 1, figsize=(7, 4)) as d:
        if not rows:
            return d.missing("no replayed trace cells (kvray exp8)", "no replay cells")
        ax = d.axes
        for i, rec in enumerate(rows):
            pts = [
                (t.get("sent_s") or t["arrival_s"], 1e3 * (t["token_times_s"][0] - t["arrival_s"]))
                for t in _repeat0(rec)
                if t.get("status") == "ok" and t.get("token_times_s")
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=6, color=style.color(i), marker=style.marker(i), label=label(rec))
                d.result.series.append(label(rec))
        slo = next((s for r in rows if (s := _slo_ms(r)) is not None), None)
        if slo is not None:
            ax.axhline(slo, color="crimson", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_yscale("log")
        label_axes(ax, "sent at (s since the repeat's start)", "TTFT (ms)", "TTFT over the trace", markerscale=2)
        d.result.caption = "Each request's TTFT (first token − due time) against when it was sent; repeat 0."
    return d.result


def find_value(obj: Any, key: str) -> Any:
    """The first ``key`` anywhere in a nested mapping (a server's cache info sits at different depths)."""
    if isinstance(obj, dict):
        if obj.get(key) is not None:
            return obj[key]
        for v in obj.values():
            if (found := find_value(v, key)) is not None:
                return found
    return None


def pool_curve(rec: dict[str, Any], pools: list[int]) -> tuple[float, list[float], int]:
    """(unbounded rate, LRU rate per pool, block size) of a replayed record's requests, at the engine's block."""
    requests = [RequestSpec(**r) for r in rec["cell"]["workload"]["requests"]]
    block = int(
        find_value(rec.get("extra") or {}, "block_size")
        or dict(rec["cell"].get("options") or {}).get("block_size")
        or 16
    )
    blocks = fp.trace_blocks(requests, block)
    return fp.prefix_hit_rate(blocks), [fp.lru_hit_rate(blocks, p) for p in pools], block


def fig_hit_rate_pool(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [r for r in _ok(records) if is_replay(r)]
    with new_figure("exp8_hit_rate_pool", out_dir, 1, 1, figsize=(6, 4)) as d:
        if not rows:
            return d.missing("no replayed trace cells (kvray exp8)", "no replay cells")
        ax = d.axes
        rec = max(rows, key=lambda r: len(r["cell"]["workload"]["requests"]))
        n_blocks = sum(math.ceil(r["prompt_toks"] / 16) for r in rec["cell"]["workload"]["requests"])
        pools = sorted(
            {max(int(n_blocks * f), 1) for f in (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)}
        )
        full, rates, block = pool_curve(rec, pools)
        ax.plot(
            pools,
            [100 * x for x in rates],
            color=style.color(0),
            marker=".",
            label=f"LRU, predicted ({block}-token blocks)",
        )
        ax.axhline(100 * full, color="grey", linestyle=":", label=f"unbounded cache {100 * full:.1f} %")
        d.result.series.append("predicted")
        found = [
            (find_value(r.get("extra") or {}, "num_gpu_blocks"), (r.get("memory") or {}).get("prefix_cache_hit_rate"))
            for r in rows
        ]
        measured = [(int(b), float(h)) for b, h in found if b and h is not None]
        if measured:
            ax.scatter(
                [b for b, _ in measured],
                [100 * h for _, h in measured],
                color="crimson",
                zorder=3,
                label="measured (engine counters)",
            )
            d.result.series.append("measured")
        else:
            d.result.notes.append("no measured hit rate: the backends replayed do not count prefix-cache hits")
        ax.set_xscale("log")
        requests = len(rec["cell"]["workload"]["requests"])
        label_axes(
            ax,
            "KV pool (blocks)",
            "prefix hit rate (% of prompt blocks)",
            f"Hit rate vs pool size — {requests} requests",
        )
        d.result.caption = (
            "Trace rule (kvray/traces/footprint.py): leading blocks found, a request's blocks then most "
            "recent; measured points at the engine's pool, its hits ÷ prompt tokens."
        )
    return d.result


def fig_sessions_slo(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [
        r
        for r in _ok(records)
        if r["cell"]["workload"].get("kind") == "multi_turn" and r["cell"].get("experiment") == "exp8"
    ]
    with new_figure("exp8_sessions_slo", out_dir, 1, 1, figsize=(6, 4)) as d:
        if not rows:
            return d.missing("no exp8 session cells (kvray exp8 --sessions …)", "no session cells")
        ax = d.axes
        series: dict[str, list[tuple[int, float, int]]] = {}
        for r in rows:
            key = f"{r['cell']['backend']} {r.get('hardware', {}).get('name') or r['cell'].get('hardware')}"
            users = (r["cell"]["workload"].get("load") or {}).get("users") or 0
            m = r.get("metrics") or {}
            series.setdefault(key, []).append(
                (int(users), 1e3 * float(m.get("ttft_s_p95", math.nan)), int(m.get("ttft_s_n") or 0))
            )
        slo = next((s for r in rows if (s := _slo_ms(r)) is not None), None)
        for i, (key, pts) in enumerate(sorted(series.items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style.color(i), marker=style.marker(i), label=key)
            d.result.series.append(key)
            if slo is not None:
                met = [p[0] for p in pts if p[1] <= slo]
                if met:
                    best = max(met)
                    ax.annotate(
                        f"{best}",
                        (best, next(p[1] for p in pts if p[0] == best)),
                        color=style.color(i),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=8,
                    )
                    d.result.notes.append(f"{key}: at most {best} sessions of those swept meet p95 TTFT ≤ {slo:g} ms")
        if slo is not None:
            ax.axhline(slo, color="crimson", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        label_axes(ax, "concurrent sessions", "p95 TTFT (ms), steady turns", "Sessions under the TTFT SLO")
        d.result.caption = (
            "p95 TTFT of the turns after each session's first, against concurrent sessions; each "
            "turn leaves think_s after the previous answer."
        )
    return d.result


def replay_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """Every exp8 figure of a Dataset, its rows with their traces; one that fails is replaced by one saying why."""
    draws = (fig_arrivals, fig_ttft_over_time, fig_hit_rate_pool, fig_sessions_slo)
    return figures_of(dataset.records_with_traces, out_dir, zip(REPLAY_FIGURES, draws, strict=True))
