"""exp6's figures — KV reuse and pressure — from a results folder's records (cells.jsonl) alone.

exp6_hit_rate               prefix-cache hit rate, predicted (kvray/sim/reuse.py) vs measured (vLLM's counters),
                            one point per cell with y = x
exp6_ttft_vs_shared_prefix  p50 TTFT vs the fraction of each prompt that is a shared prefix, per backend
exp6_multi_turn             per turn of the multi-turn cells: mean TTFT, and prompt tokens served from cache
                            (measured per request, predicted) beside the turn's whole prompt
exp6_kv_pressure            the KV timeline of the cell that preempted most: KV usage, running / waiting, the
                            preemption counter, and the moment the pool filled; the title gives kvmath's predicted
                            fill concurrency
exp6_kv_dtype               tokens that fit the KV pool per KV dtype, as the engine reported and as kvmath predicts

A figure without data says so in its panel (no exp6 cells, or none of that kind); the figures are written when
any cell of the folder belongs to exp6 or carries prefix-cache figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.figures import style
from kvray.figures.common import FigureResult, figures_of, label_axes, new_figure

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

REUSE_FIGURES = ("exp6_hit_rate", "exp6_ttft_vs_shared_prefix", "exp6_multi_turn", "exp6_kv_pressure",
                 "exp6_kv_dtype")  # fmt: skip


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") in ("ok", "partial")]


def _kind(rec: dict[str, Any]) -> str:
    return str(rec["cell"]["workload"].get("kind", ""))


def has_reuse_data(records: list[dict[str, Any]]) -> bool:
    """True when any record is an exp6 cell or carries prefix-cache figures."""
    return any(
        r["cell"].get("experiment") == "exp6"
        or "prefix_cache" in (r.get("extra") or {})
        or _kind(r) in ("shared_prefix", "multi_turn")
        for r in records
    )


def shared_fraction(rec: dict[str, Any]) -> float:
    """Shared-prefix tokens over prompt tokens, over the cell's requests."""
    reqs = rec["cell"]["workload"]["requests"]
    total = sum(r["prompt_toks"] for r in reqs)
    return sum(r.get("shared_prefix_toks", 0) for r in reqs) / total if total else 0.0


def fig_hit_rate(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [r for r in _ok(records) if (r.get("memory") or {}).get("prefix_cache_hit_rate") is not None]
    with new_figure("exp6_hit_rate", out_dir, 1, 1, figsize=(4.6, 4.2)) as d:
        if not rows:
            return d.missing("no cell with a measured prefix-cache hit rate (kvray exp6 on vllm)", "no hit rates")
        ax = d.axes
        for i, kind in enumerate(sorted({_kind(r) for r in rows})):
            part = [r for r in rows if _kind(r) == kind]
            ax.scatter(
                [100 * r["memory"]["prefix_cache_hit_rate_predicted"] for r in part],
                [100 * r["memory"]["prefix_cache_hit_rate"] for r in part],
                color=style.color(i),
                marker=style.marker(i),
                label=kind,
            )
            d.result.series.append(kind)
        ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle=":", label="y = x")
        label_axes(ax, "predicted hit rate (%)", "measured hit rate (%)", "Prefix-cache hit rate")
        d.result.caption = (
            "Prefix-cache hits / prompt tokens: kvray's block-aligned prediction vs the engine's counters."
        )
        d.result.notes.append("measured: vLLM prefix_cache_hits / prefix_cache_queries over the measured repeats")
    return d.result


def fig_ttft_vs_shared(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [r for r in _ok(records) if _kind(r) == "shared_prefix" and (r.get("metrics") or {}).get("ttft_s_p50")]
    with new_figure("exp6_ttft_vs_shared_prefix", out_dir, 1, 1, figsize=(5, 3.8)) as d:
        if not rows:
            return d.missing("no shared_prefix cells (kvray exp6)", "no shared_prefix cells")
        ax = d.axes
        for i, backend in enumerate(sorted({r["cell"]["backend"] for r in rows})):
            part = sorted((r for r in rows if r["cell"]["backend"] == backend), key=shared_fraction)
            ax.plot(
                [100 * shared_fraction(r) for r in part],
                [1e3 * r["metrics"]["ttft_s_p50"] for r in part],
                color=style.color(i),
                marker=style.marker(i),
                label=backend,
            )
            d.result.series.append(backend)
        label_axes(ax, "shared prefix (% of prompt tokens)", "p50 TTFT (ms)", "TTFT vs shared-prefix fraction")
        d.result.caption = "The larger the shared prefix, the less prefill a prefix cache leaves to do."
    return d.result


def per_turn(rec: dict[str, Any]) -> list[dict[str, float]]:
    """Per turn of a multi_turn record: mean TTFT (s), prompt tokens, cached tokens measured and predicted."""
    reqs = rec["cell"]["workload"]["requests"]
    conversations = len({r.get("prefix_group") for r in reqs}) or 1
    cached = {
        (p["repeat"], p["request_id"]): p
        for p in (rec.get("extra") or {}).get("prefix_cache", {}).get("per_request", [])
    }
    turns: dict[int, dict[str, list[float]]] = {}
    for t in rec.get("traces") or []:
        if t.get("status") != "ok" or not t.get("token_times_s"):
            continue
        k = t["request_id"] // conversations
        acc = turns.setdefault(k, {"ttft": [], "prompt": [], "cached": [], "predicted": []})
        acc["ttft"].append(t["token_times_s"][0] - t["arrival_s"])
        acc["prompt"].append(t["prompt_toks"])
        p = cached.get((t["repeat"], t["request_id"]), {})
        for key, name in (("cached", "cached_toks"), ("predicted", "cached_toks_predicted")):
            if p.get(name) is not None:
                acc[key].append(p[name])
    out = []
    for k in sorted(turns):
        acc = turns[k]
        out.append({"turn": k, **{key: (sum(v) / len(v) if v else math.nan) for key, v in acc.items()}})
    return out


def fig_multi_turn(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [r for r in _ok(records) if _kind(r) == "multi_turn" and r.get("traces")]
    with new_figure("exp6_multi_turn", out_dir, 1, 2, figsize=(10, 3.8)) as d:
        if not rows:
            return d.missing("no multi_turn cells with traces (kvray exp6)", "no multi_turn cells")
        ax_t, ax_c = d.axes
        for i, rec in enumerate(rows):
            turns = per_turn(rec)
            x = [t["turn"] + 1 for t in turns]
            label = rec["cell"]["backend"]
            ax_t.plot(x, [1e3 * t["ttft"] for t in turns], color=style.color(i), marker=style.marker(i), label=label)
            ax_c.plot(x, [t["prompt"] for t in turns], color=style.color(i), linestyle=":", label=f"{label} prompt")
            ax_c.plot(
                x,
                [t["cached"] for t in turns],
                color=style.color(i),
                marker=style.marker(i),
                label=f"{label} cached (measured)",
            )
            ax_c.plot(
                x,
                [t["predicted"] for t in turns],
                color=style.color(i),
                linestyle="--",
                marker="x",
                label=f"{label} cached (predicted)",
            )
            d.result.series.append(label)
        ax_t.set(xlabel="turn", ylabel="mean TTFT (ms)", title="TTFT per turn")
        ax_c.set(xlabel="turn", ylabel="tokens", title="prompt tokens per turn, and those served from cache")
        ax_t.legend(fontsize=7)
        ax_c.legend(fontsize=6.5)
        d.result.caption = "Each turn resends the conversation: its prompt grows, and the previous turn's prompt hits."
        d.result.notes.append("the history's answers are synthetic (docs/kv_reuse.md): only earlier prompts can hit")
    return d.result


def fig_kv_pressure(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    def preempted(r: dict[str, Any]) -> float:
        return float((r.get("metrics") or {}).get("preemptions") or 0)

    rows = [r for r in _ok(records) if (r.get("extra") or {}).get("kv_timeline") and preempted(r) > 0]
    with new_figure("exp6_kv_pressure", out_dir, 1, 1, figsize=(6.5, 3.8)) as d:
        if not rows:
            return d.missing("no cell preempted (a KV pool smaller than the running set: kvray exp6)", "no preemption")
        rec = max(rows, key=preempted)
        ax = d.axes
        first = min(p.get("repeat", 0) for p in rec["extra"]["kv_timeline"])
        points = [p for p in rec["extra"]["kv_timeline"] if p.get("repeat", 0) == first]
        t = [p["t_s"] for p in points]
        ax.step(
            t, [100 * (p.get("kv_usage") or 0) for p in points], where="post", color=style.color(0), label="KV usage %"
        )
        twin = ax.twinx()
        base = points[0].get("preemptions") or 0 if points else 0
        for j, (key, values) in enumerate(
            (
                ("running", [p.get("running") for p in points]),
                ("waiting", [p.get("waiting") for p in points]),
                ("preemptions", [(p.get("preemptions") or 0) - base for p in points]),
            )
        ):
            twin.step(
                t,
                [v if v is not None else math.nan for v in values],
                where="post",
                color=style.color(j + 1),
                linestyle="--",
                label=key,
            )
        twin.set_ylabel("requests / preemptions")
        twin.grid(False)
        fills = (rec["extra"].get("prefix_cache") or {}).get("pool_fills") or []
        fill: dict[str, Any] = next((f for f in fills if f.get("repeat") == first), {})
        full_at, after = fill.get("pool_full_at_s"), fill.get("pool_full_after_s")
        if full_at is not None:
            ax.axvline(full_at, color="black", linewidth=0.9, linestyle=":", label=f"pool full by {full_at:.2f} s")
            if after is not None and after < full_at:  # the scrapes bracket the moment: (after, at]
                ax.axvspan(after, full_at, color="black", alpha=0.08, label=f"filled after {after:.2f} s")
        ax.set(xlabel="seconds into the run", ylabel="KV usage (% of pool)")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [str(h.get_label()) for h in handles], fontsize=6.5, loc="center right")
        overfill = (rec.get("memory") or {}).get("kv_fill_concurrency_predicted")
        conc = len(rec["cell"]["workload"]["requests"])
        ax.set_title(
            f"{rec['cell']['backend']}: {conc} requests, {int(preempted(rec))} preemptions; "
            f"kvmath: the pool overfills from {overfill} requests"
        )
        d.result.series.append(rec["cell"]["backend"])
        d.result.caption = "When the running set outgrows the KV pool the engine preempts (and later recomputes)."
    return d.result


def fig_kv_dtype(records: list[dict[str, Any]], out_dir: Path) -> FigureResult:
    rows = [r for r in _ok(records) if ((r.get("extra") or {}).get("kv_capacity") or {}).get("kv_dtype")]
    with new_figure("exp6_kv_dtype", out_dir, 1, 1, figsize=(5, 3.8)) as d:
        if not rows:
            return d.missing("no cell reported its KV capacity (vllm cells do)", "no KV capacity reported")
        ax = d.axes
        seen: dict[str, tuple[float, float]] = {}
        for r in rows:
            cap = r["extra"]["kv_capacity"]
            reported = (cap.get("reported") or {}).get("kv_cache_size_tokens")
            seen[f"{r['cell']['backend']} {cap['kv_dtype']}"] = (
                reported or math.nan,
                cap.get("predicted_tokens") or math.nan,
            )
        names = sorted(seen)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [seen[n][0] for n in names], width=0.4, color=style.color(0), label="reported")
        ax.bar([i + 0.2 for i in x], [seen[n][1] for n in names], width=0.4, color=style.color(1), label="kvmath")
        ax.set_xticks(list(x), names, rotation=20, fontsize=7)
        ax.set_ylabel("tokens that fit the KV pool")
        ax.legend(fontsize=7)
        ax.set_title("KV capacity per KV dtype")
        d.result.series.extend(names)
        d.result.caption = "The same pool holds more tokens in a narrower KV dtype."
    return d.result


def reuse_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """Every exp6 figure of a Dataset (kvray.analysis.dataset): its rows with their traces (the per-turn figure)."""
    draws = (fig_hit_rate, fig_ttft_vs_shared, fig_multi_turn, fig_kv_pressure, fig_kv_dtype)
    return figures_of(dataset.records_with_traces, out_dir, zip(REUSE_FIGURES, draws, strict=True))
