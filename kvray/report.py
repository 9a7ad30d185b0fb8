"""``report.md`` and a self-contained ``report.html`` from a results folder alone (no Ray, no torch).

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice,
so the Markdown and the HTML always say the same thing. The HTML embeds every figure as base64 PNG:
one file to mail or attach to a review. Every number comes from kvray.analysis (the findings, and the
views the figures draw).

``make_all(output_dir)`` is what ``kvray run`` and the exp commands call at the end: figures, then report.

One piece on purpose (over 500 lines): the block model, its two renderers and the per-experiment sections
share private helpers and must change together, so a reader sees the whole report's order on one page.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvray.analysis.findings import Finding, compute_findings, suspect_cells
from kvray.analysis.views import (
    MIXED_STATS,
    OOM_STATUSES,
    View,
    as_number,
    experiment_rows,
    kv_memory_saved,
    mixed_pairs,
    peak_memory,
    prepare,
    simulated_mask,
)
from kvray.units import human_bytes

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
EXPERIMENTS = {
    "exp1": ("Exp1 — concurrency sweep", ("fig1_mem_vs_concurrency", "fig2_tps_vs_concurrency")),
    "exp2": ("Exp2 — sequence-length sweep", ("fig3_latency_vs_seqlen", "fig4_mem_vs_seqlen")),
    "exp3": ("Exp3 — mixed lengths (tail latency)", ("fig5_mixed_lengths_latency",)),
    "exp4": ("Exp4 — static vs paged KV, in-process vs server", ("fig8_backend_compare", "fig9_kv_timeline")),
    "exp7": ("Exp7 — tensor-parallel scaling", ()),  # one figure per model: exp7_tp_scaling_<model> (on disk)
}
FINDING_TITLES = {
    "sanity": "⚠ Implausible measurements (warnings: these cells are suspect, not results)",
    "failures": "Cells with failed requests (percentiles over the successful ones only)",
    "memory_slope": "Memory per extra concurrent request",
    "oom_boundary": "Max concurrency / length before OOM",
    "throughput_plateau": "Throughput plateau",
    "latency_exponent": "Latency vs sequence length (log-log fit)",
    "mixed_penalty": "Tail-latency penalty of short requests in mixed batches",
    "kv_error": "Predicted vs measured KV",
}


@dataclass
class ReportPaths:
    markdown: Path
    html: Path
    figures: list[Any] = field(default_factory=list)  # kvray.figures.common.FigureResult
    findings: list[Finding] = field(default_factory=list)


def make_all(output_dir: str | Path, figures: bool = True) -> ReportPaths:
    """Every figure (unless ``figures`` is False: the report then embeds the ones already on disk) and
    the report, for the results folder ``output_dir``."""
    return make_report(output_dir, figures=figures)


def make_report(results_dir: str | Path, figures: bool = True) -> ReportPaths:
    from kvray.data.store import load_dataset
    from kvray.figures import FIGURES_DIR, plot_view, server_figures_if_any

    out = Path(results_dir)
    cells, traces, manifest = load_dataset(out)
    view = prepare(cells, traces)
    fig_results = plot_view(view, out / FIGURES_DIR) + server_figures_if_any(out) if figures else []
    if figures:
        from kvray.figures.parallelism import tp_figures_if_any

        fig_results += tp_figures_if_any(out)  # exp7: one TP-scaling figure per model
    findings = compute_findings(view)
    blocks = build_blocks(view, manifest, findings, fig_results, out)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    md_path.write_text(render_markdown(blocks, out))
    html_path.write_text(render_html(blocks, out))
    return ReportPaths(md_path, html_path, fig_results, findings)


# ---------------------------------------------------------------- blocks


@dataclass
class Block:
    kind: str  # h1 | h2 | h3 | p | ul | table | figure
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None  # figure PNG
    svg: Path | None = None


# A table cell: the value formatted, or "—" where the row has no number.


def _fmt_bytes(v: Any) -> str:
    return human_bytes(float(v)) if as_number(v) is not None else "—"


def _fmt_ms(v: Any) -> str:
    return f"{float(v) * 1e3:,.1f}" if as_number(v) is not None else "—"


def _fmt_num(v: Any, digits: int = 1) -> str:
    return f"{float(v):,.{digits}f}" if as_number(v) is not None else "—"


def _fmt_pct(v: Any) -> str:
    return f"{float(v):+.2%}" if as_number(v) is not None else "—"


def _fmt_percentile(r: Any, column: str) -> str:
    """A latency percentile in ms with its 95 % interval and the number of samples it pools:
    "12.3 [11.9–12.8] (n=24)"; a percentile the sample cannot hold is shown as what it is: "max 14.1 of 9"."""
    from kvray.measure.metrics import min_samples

    metric, pct = column.rsplit("_p", 1)
    n = as_number(r.get(metric + "_n"))
    if n is not None and n < min_samples(float(pct)) and as_number(r.get(metric + "_max")) is not None:
        return f"max {_fmt_ms(r[metric + '_max'])} of {int(n)}"
    value = _fmt_ms(r[column])
    low, high = as_number(r.get(column + "_ci_low")), as_number(r.get(column + "_ci_high"))
    if value != "—" and low is not None and high is not None:
        value += f" [{_fmt_ms(low)}–{_fmt_ms(high)}]"
    return value if value == "—" or n is None else f"{value} (n={int(n)})"


def _fmt_tps(r: Any) -> str:
    """Mean output tok/s with its 95 % interval over repeats: "512.3 [498.1–526.5] (3 rep)"; one repeat: "(1 rep)"."""
    value = _fmt_num(r["output_tps"])
    low, high, n = (as_number(r.get(k)) for k in ("output_tps_ci_low", "output_tps_ci_high", "output_tps_n"))
    if value != "—" and low is not None and high is not None:
        value += f" [{_fmt_num(low)}–{_fmt_num(high)}]"
    return value if value == "—" or n is None else f"{value} ({int(n)} rep)"


def _fmt_failed(r: Any) -> str:
    """Failed requests of all measured repeats: "0", or "2/24 (8.3%)"."""
    failed, total = as_number(r.get("requests_failed")), as_number(r.get("requests"))
    if failed is None or total is None:
        return "—"
    return "0" if failed == 0 else f"{int(failed)}/{int(total)} ({failed / total:.1%})"


CELL_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("c", lambda r: _fmt_num(r["concurrency"], 0)),  # an open loop has none: "—"
    ("prompt", lambda r: str(r["prompt_toks_list"]) if r["workload"] == "mixed" else f"{int(r['prompt_toks'])}"),
    ("gen", lambda r: f"{int(r['gen_toks'])}"),
    ("status", lambda r: str(r["status"]) + (" ⚠" if r.get("_suspect") else "")),
    ("peak mem", lambda r: _fmt_bytes(peak_memory(r)[0])),
    ("KV measured", lambda r: _fmt_bytes(r["kv_measured_bytes"])),
    ("KV predicted", lambda r: _fmt_bytes(r["kv_predicted_bytes"])),
    ("KV error", lambda r: _fmt_pct(r["kv_rel_error"])),
    ("out tok/s [95 % CI]", _fmt_tps),
    ("failed", _fmt_failed),  # beside the latencies: they pool only the successful requests
    ("TTFT p50 ms [95 % CI]", lambda r: _fmt_percentile(r, "ttft_s_p50")),
    ("TTFT p99 ms", lambda r: _fmt_percentile(r, "ttft_s_p99")),
    ("TPOT p50 ms", lambda r: _fmt_percentile(r, "tpot_s_p50")),
    ("E2E p99 ms", lambda r: _fmt_percentile(r, "e2e_s_p99")),
)


def cell_table(view: View, rows: Any, sort: tuple[str, ...], suspects: set[str] | None = None) -> Block:
    """One row per cell; the series column only when the dataset holds several series; a sanity warning's
    suspect cells marked ⚠ beside their status."""
    headers = (["series"] if view.series_keys else []) + [name for name, _ in CELL_COLUMNS]
    body = []
    labelled = rows.assign(
        _series=[view.series_label(r) for _, r in rows.iterrows()],
        _suspect=rows["cell_id"].astype(str).isin(suspects or set()),
    )
    for _, r in labelled.sort_values(["_series", *sort]).iterrows():
        row = {k: r[k] for k in r.index}
        body.append(([str(r["_series"])] if view.series_keys else []) + [fn(row) for _, fn in CELL_COLUMNS])
    return Block("table", headers=headers, rows=body)


def environment_blocks(view: View, manifest: dict[str, Any]) -> list[Block]:
    blocks = [Block("h2", "Environment and hardware")]
    cells = view.cells
    rows = []
    for hw, part in cells.groupby("hardware", dropna=False):
        cap = part["capacity_bytes"].dropna()
        acc = part["accelerator_type"].dropna() if "accelerator_type" in part else part["hardware"].iloc[:0]
        sim = simulated_mask(part)
        rows.append(
            [
                str(hw),
                str(part["hardware_label"].iloc[0]),
                _fmt_bytes(cap.iloc[0]) if len(cap) else "—",
                str(acc.iloc[0]) if len(acc) else "—",
                str(len(part)),
                ", ".join(sorted({str(b) for b in part["backend"]})),
                "yes" if sim.all() else "partly" if sim.any() else "no",
            ]
        )
    blocks.append(
        Block(
            "table",
            headers=["hardware", "short name", "memory", "Ray accelerator type", "cells", "backends", "simulated"],
            rows=rows,
        )
    )
    facts = []
    if manifest.get("kvray_version"):
        facts.append(f"kvray {manifest['kvray_version']}")
    job = manifest.get("job") or {}
    if isinstance(job, dict) and job.get("name"):
        facts.append(f"job `{job['name']}`" + (f" — {job['description']}" if job.get("description") else ""))
    if manifest.get("created_at"):
        facts.append(f"dataset created {manifest['created_at']}")
    runs = manifest.get("runs") or []
    if runs:
        facts.append(f"{len(runs)} run(s); last started {runs[-1].get('started_at', '?')}")
    if facts:
        blocks.append(Block("p", "; ".join(facts) + "."))
    envs = []
    for run in runs[-1:]:
        for w in run.get("workers") or []:
            env = w.get("environment") or {}
            libs = env.get("libraries") or {}
            lib_text = ", ".join(
                f"{k} {v}" for k, v in libs.items() if v and k in ("torch", "transformers", "ray", "vllm")
            )
            gpus = ", ".join(str(g.get("name")) for g in env.get("gpus") or []) or "no GPU"
            envs.append(
                [
                    str(w.get("worker_id", "?")),
                    str(w.get("name", "?")),
                    str(env.get("hostname", "?")),
                    f"{env.get('platform', '?')}; Python {env.get('python', '?')}",
                    f"{gpus}; driver {env.get('cuda_driver') or '—'}",
                    lib_text or "—",
                ]
            )
    if envs:
        blocks.append(Block("h3", "Workers"))
        blocks.append(Block("table", headers=["worker", "device", "host", "platform", "GPUs", "libraries"], rows=envs))
    return blocks


def _mixed_stat(p: Any, stat: str) -> tuple[str, str]:
    """(label, statistic) of a mixed-table row: "TTFT p99", or "TTFT max of 6 (too few for p99)" and the
    maximum where the short requests cannot hold that percentile (kvray.measure.metrics.min_samples)."""
    from kvray.measure.metrics import min_samples

    metric, pct = stat.rsplit("_p", 1)
    n = min(int(p.alone.get("requests", 0)), int(p.mixed.get("requests", 0)))
    name = metric.removesuffix("_s").upper()
    if n >= min_samples(float(pct)):
        return f"{name} p{pct}", stat
    return f"{name} max of {n} (too few for p{pct})", f"{metric}_max"


def mixed_table(view: View) -> Block | None:
    pairs = mixed_pairs(view)
    if not pairs:
        return None
    rows = []
    for p in pairs:
        for label, stat in (_mixed_stat(p, s) for s in MIXED_STATS):
            ratio = p.ratio(stat)
            rows.append(
                [
                    p.series,
                    f"{p.n_short} × {p.short_toks} + {p.n_long} × {p.long_toks}",
                    label,
                    _fmt_ms(p.alone.get(stat, math.nan)),
                    _fmt_ms(p.mixed.get(stat, math.nan)),
                    f"×{ratio:.2f}" if ratio == ratio else "—",
                    f"{int(p.alone.get('requests', 0))} / {int(p.mixed.get('requests', 0))}",
                ]
            )
    return Block(
        "table",
        headers=["series", "mixed batch", "short requests'", "alone ms", "mixed ms", "ratio", "n alone / mixed"],
        rows=rows,
    )


# How each experiment's cell table is sorted (after the series).
TABLE_SORT = {
    "exp2": ("prompt_toks", "concurrency"),
    "exp4": ("backend", "concurrency", "prompt_toks"),
}
DEFINITIONS = (
    "TTFT = first token − arrival (includes queueing); TPOT = (end − first token) / (output − 1); "
    "E2E = end − arrival; output tok/s = output tokens / makespan, mean over repeats (docs/metrics.md).",
    "Latency percentiles pool the successful requests of all repeats; n is how many samples each pools. A "
    "partial cell ran but some requests failed (column failed): its percentiles cover only the rest.",
    "[low–high] is a 95 % interval: bootstrap over repeats, then requests, for a percentile; Student's t over "
    "repeats for throughput (none for one repeat). A p99 needs 100 samples (a p95 20, a p90 10): below that "
    'the cell shows what the number is, "max … of n" (docs/metrics.md, "How sure is a number").',
    "Peak memory: torch max_memory_allocated on a GPU, process RSS peak on a CPU; KV error = "
    "(measured − predicted) / predicted KV bytes.",
    "OOM cells: oom (ran out), skipped_after_oom (larger than one that ran out), refused (pre-flight check "
    "predicted OOM) — the boundary is a result.",
)


def build_blocks(
    view: View, manifest: dict[str, Any], findings: list[Finding], figures: list[Any], out: Path
) -> list[Block]:
    """The whole report: summary, environment, findings, a section per experiment, the rest, definitions."""
    from kvray.figures import FIGURES

    cells = view.cells
    blocks = summary_blocks(view, manifest, out)
    blocks += environment_blocks(view, manifest) if len(cells) else []
    blocks += findings_blocks(findings)
    figure = _figure_blocks(figures, out)
    suspects = suspect_cells(findings)
    from kvray.figures import FIGURES_DIR

    for exp, (heading, fig_names) in EXPERIMENTS.items():
        blocks += experiment_blocks(view, exp, heading, suspects)
        if exp == "exp7":  # kvray/figures/parallelism.py: one figure per model, named after it
            fig_names = tuple(sorted(p.stem for p in (out / FIGURES_DIR).glob("exp7_tp_scaling_*.png")))
        for name in fig_names:
            blocks += figure(name)
    others = cells[~cells["experiment"].isin(list(EXPERIMENTS))] if len(cells) else cells
    if len(others):
        blocks.append(Block("h2", "Other cells"))
        blocks.append(cell_table(view, others, ("experiment", "workload", "concurrency", "prompt_toks"), suspects))
    blocks.append(Block("h2", "Across hardware and KV prediction"))
    for name in FIGURES[5:]:  # fig6 cross-hardware, fig7 KV predicted vs measured
        blocks += figure(name)
    blocks += timeline_blocks(view, out, redraw=bool(figures))
    blocks += reuse_blocks(out, redraw=bool(figures))
    blocks += serving_blocks(view, out, redraw=bool(figures))
    blocks.append(Block("h2", "Definitions"))
    blocks.append(Block("ul", items=list(DEFINITIONS)))
    return blocks


def summary_blocks(view: View, manifest: dict[str, Any], out: Path) -> list[Block]:
    """Title, what the dataset holds, and what it lacks (columns, measurements: simulated cells)."""
    cells = view.cells
    job: dict[str, Any] = manifest["job"] if isinstance(manifest.get("job"), dict) else {}
    title = f"kvray report — {job.get('name') or out.resolve().name}"
    blocks = [Block("h1", title)]
    counts = cells["status"].value_counts().to_dict() if len(cells) else {}
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells"
    blocks.append(
        Block(
            "p",
            f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} from `{out}`: "
            f"{len(cells)} cells ({summary}). " + view.context(cells) + ".",
        )
    )
    if not len(cells):
        blocks.append(Block("p", "The dataset is empty: run `kvray run JOB` or `kvray exp1 …` first."))
    if view.missing_columns:
        blocks.append(Block("p", "Columns not in this dataset (shown as —): " + ", ".join(view.missing_columns) + "."))
    simulated = simulated_mask(cells) if len(cells) else None
    if simulated is not None and simulated.any():
        blocks.append(
            Block(
                "p",
                f"**{int(simulated.sum())} of {len(cells)} cells are simulated** (kvray's "
                "roofline model): their times and memory are predictions, not measurements.",
            )
        )
    return blocks


def findings_blocks(findings: list[Finding]) -> list[Block]:
    """The findings grouped under FINDING_TITLES, in that order; a sentence when there is none."""
    blocks = [Block("h2", "Findings")]
    if not findings:
        blocks.append(
            Block(
                "p",
                "No finding can be computed from this dataset (it needs ok cells of exp1, exp2 "
                "or exp3, or cells with measured and predicted KV).",
            )
        )
    for key, heading in FINDING_TITLES.items():
        texts = [f.text for f in findings if f.key == key]
        if texts:
            blocks.append(Block("h3", heading))
            blocks.append(Block("ul", items=texts))
    return blocks


def experiment_blocks(view: View, exp: str, heading: str, suspects: set[str] | None = None) -> list[Block]:
    """An experiment's section before its figures: every cell, the cells that did not fit and why, and for
    exp3 the short requests alone vs mixed."""
    rows = experiment_rows(view, exp)
    blocks = [Block("h2", heading)]
    if not len(rows):
        return blocks + [Block("p", f"No {exp} cells in this dataset (`kvray {exp} --help`).")]
    blocks.append(cell_table(view, rows, TABLE_SORT.get(exp, ("workload", "concurrency", "prompt_toks")), suspects))
    ooms = rows[rows["status"].isin(OOM_STATUSES) & rows["reason"].astype(bool)]
    if len(ooms):
        blocks.append(Block("p", "Cells that did not fit (the reason each gave):"))
        blocks.append(
            Block(
                "ul",
                items=[
                    f"{view.series_label(r) + ': ' if view.series_keys else ''}{r['status']} at c={int(r['concurrency'])}"
                    f" × {r['prompt_toks_list'] if r['workload'] == 'mixed' else int(r['prompt_toks'])} prompt tokens"
                    f" — {str(r['reason'])[:240]}"
                    for _, r in ooms.head(8).iterrows()
                ],
            )
        )
    table = mixed_table(view) if exp == "exp3" else None
    if table is not None:
        blocks.append(Block("h3", "Short requests: alone vs batched with long ones"))
        blocks.append(table)
    return blocks


def timeline_blocks(view: View, out: Path, redraw: bool = True) -> list[Block]:
    """fig10 of the cells worth a look — the most concurrent (its highest p99 TTFT), and any whose engine
    preempted — with why each."""
    import contextlib

    from kvray.data.store import attach_traces, read_results, read_timeline
    from kvray.figures import FIGURES_DIR
    from kvray.figures.style import styled
    from kvray.figures.timeline import fig10_timeline, figure_name

    cells = view.cells
    measured = cells[cells["status"].isin(["ok", "partial"])] if len(cells) else cells
    why: dict[str, str] = {}
    if len(measured) and "ttft_s_p99" in measured and measured["ttft_s_p99"].notna().any():
        # the most concurrent cell shows queueing and batching; among those, the one whose requests waited longest
        ranked = measured[measured["ttft_s_p99"].notna()]
        load = ranked["concurrency"].fillna(0) if "concurrency" in ranked else 0
        top = ranked.assign(_load=load).sort_values(["_load", "ttft_s_p99"], ascending=False).iloc[0]
        why[str(top["cell_id"])] = (
            f"most concurrent ({int(top['_load'])} requests at once), p99 TTFT {_fmt_ms(top['ttft_s_p99'])} ms"
        )
    timeline = read_timeline(out)
    pre = timeline[(timeline["source"] == "engine") & (timeline["metric"] == "preemptions")]
    grew = pre.groupby("cell_id")["value"].agg(lambda v: v.max() - v.min()) if len(pre) else pre["value"]
    for cell_id, count in grew[grew > 0].sort_values(ascending=False).head(3).items():
        why[str(cell_id)] = why.get(str(cell_id), "") + f"{'; ' if cell_id in why else ''}{int(count)} preemptions"
    records = {r["cell_id"]: r for r in read_results(out, traces=False) if r["cell_id"] in why}
    attach_traces(out, list(records.values()))
    blocks = [Block("h2", "Timelines of the cells worth a look")] if why else []
    for cell_id, reason in why.items():
        png = out / FIGURES_DIR / f"{figure_name(cell_id)}.png"
        if (redraw or not png.is_file()) and cell_id in records:
            with styled(), contextlib.suppress(Exception):  # one figure must not cost the report
                fig10_timeline(records[cell_id], timeline, out / FIGURES_DIR)
        blocks.append(Block("p", f"Cell {cell_id}: {reason} (`kvray plot {out} --cell {cell_id}`)."))
        if png.is_file():
            blocks.append(Block("figure", f"{figure_name(cell_id)}: requests, hardware and engine on one clock",
                                path=png, svg=png.with_suffix(".svg")))  # fmt: skip
    return blocks


def reuse_blocks(out: Path, redraw: bool = True) -> list[Block]:
    """Exp6 — KV reuse and pressure: each reuse cell's prefix-cache hit rate and saved KV, measured beside
    predicted, its preemptions and fill point, then the exp6 figures (kvray/figures/reuse.py); none without them."""
    from kvray.data.store import read_results
    from kvray.figures import FIGURES_DIR
    from kvray.figures.reuse import REUSE_FIGURES, has_reuse_data, make_reuse_figures

    records = read_results(out, traces=False)
    if not has_reuse_data(records):
        return []
    figures = make_reuse_figures(out) if redraw else []
    blocks = [Block("h2", "Exp6 — KV reuse and pressure")]
    rows = []
    saved = kv_memory_saved(records)
    for r in records:
        m = r.get("memory") or {}
        keys = ("prefix_cache_hit_rate", "prefix_cache_hit_rate_predicted", "kv_not_recomputed_bytes", "preemptions")
        if not any(m.get(k) is not None for k in keys) and r["cell"].get("experiment") != "exp6":
            continue
        wl = r["cell"]["workload"]
        rows.append([r["cell_id"], r["cell"]["backend"], str(wl.get("kind")), str(len(wl["requests"])), r["status"],
                     *(f"{float(m[k]):.1%}" if as_number(m.get(k)) is not None else "—"
                       for k in ("prefix_cache_hit_rate", "prefix_cache_hit_rate_predicted")),
                     _fmt_bytes(m.get("kv_not_recomputed_bytes")), _fmt_bytes(m.get("kv_not_recomputed_bytes_predicted")),
                     _fmt_bytes(saved.get(r["cell_id"])),
                     _fmt_num((r.get("metrics") or {}).get("preemptions"), 0), _fmt_num(m.get("pool_full_at_s"), 2),
                     _fmt_num(m.get("kv_fill_concurrency_predicted"), 0)])  # fmt: skip
    blocks.append(Block("table", headers=["cell", "backend", "workload", "requests", "status", "hit rate",
                                          "predicted", "KV not recomputed", "predicted", "KV memory saved per GPU",
                                          "preemptions", "pool full at s",
                                          "fills from (kvmath)"], rows=rows))  # fmt: skip
    blocks.append(Block("p", "Hit rate: the engine's prefix-cache hits / prompt tokens over the measured repeats "
                             "(vLLM /metrics); predicted: a block prefix cache replayed on the prompts kvray sent "
                             "(docs/kv_reuse.md). KV not recomputed: hit tokens × KV bytes per token per GPU, per repeat — "
                             "the prefill the cache skipped, not memory. KV memory saved per GPU: peak KV of the same "
                             "cell with the prefix cache off − with it on; — where the dataset has only one arm."))  # fmt: skip
    failed = [r for r in records if r["status"] not in ("ok", "partial") and r["cell"].get("experiment") == "exp6"]
    if failed:  # e.g. a KV dtype this engine's build refuses on this hardware, in the engine's own words
        blocks.append(Block("ul", items=[f"{r['cell_id']} ({r['cell']['backend']}, kv_dtype "
                                         f"{r['cell'].get('kv_dtype') or r['cell']['dtype']}): {r['status']} — "
                                         f"{str(r.get('reason'))[:300]}" for r in failed]))  # fmt: skip
    by_name = {f.name: f for f in figures}
    for name in REUSE_FIGURES:
        png = out / FIGURES_DIR / f"{name}.png"
        if png.is_file():
            notes = by_name[name].notes if name in by_name else []
            blocks.append(Block("figure", name + (": " + "; ".join(notes) if notes else ""), path=png,
                                svg=png.with_suffix(".svg")))  # fmt: skip
    return blocks


def serving_blocks(view: View, out: Path, redraw: bool = True) -> list[Block]:
    """Serving: per configuration (backend · hardware · model · SLO) the highest goodput and the load it came at,
    the knee and saturation rate of any search, then fig11/fig12 (kvray/figures/serving.py); none without rows."""
    from kvray.figures.serving import SERVING_FIGURES, make_serving_figures, search_rows, serving_rows

    rows = serving_rows(view.cells)
    if not len(rows):
        return []
    figures = make_serving_figures(out) if redraw else []
    searches = search_rows(view.cells)
    keys = ["backend", "hardware", "model", "slo"]
    table = []
    for config, part in rows.groupby([rows[k].astype(object).fillna("—").astype(str) for k in keys], sort=True):
        good = part["goodput_rps"].astype(float)
        best = part.loc[good.idxmax()] if good.notna().any() and good.max() > 0 else None  # None: SLO never met
        mine = searches[(searches[keys[:3]].astype(str) == list(config[:3])).all(axis=1)] if len(searches) else searches
        at = ("no SLO given" if config[3] == "—" else "SLO met at no load") if best is None else (f"{int(best['users'])} users" if best["load"] == "closed"
                                       else f"{float(best['offered_rps']):.3g} req/s {best['load']}")  # fmt: skip
        behind = int(part["client_behind"].fillna(False).astype(bool).sum()) if "client_behind" in part else 0
        table.append([*config[:3], _fmt_num((None if config[3] == "—" else 0.0) if best is None else best["goodput_rps"], 2), at,
                      "—" if best is None or as_number(best["slo_attainment"]) is None
                      else f"{float(best['slo_attainment']):.1%}",
                      _fmt_num(mine["knee_rps"].max() if len(mine) else None, 2),
                      _fmt_num(mine["saturation_rps"].max() if len(mine) else None, 2),
                      _fmt_num(part["achieved_rps"].astype(float).max(), 2), config[3], str(len(part)),
                      str(int(part["requests_steady"].sum())), str(behind)])  # fmt: skip
    blocks = [Block("h2", "Serving — goodput under SLOs"),
              Block("table", headers=["backend", "hardware", "model", "max goodput req/s", "at", "SLO met",
                                      "knee req/s", "saturation req/s", "max achieved req/s", "SLO", "rows",
                                      "steady requests", "client behind"], rows=table),
              Block("p", "Goodput: achieved requests/s × the fraction of steady-state requests meeting every SLO "
                         "threshold (ramp-up and drain excluded; docs/metrics.md, Serving load). Knee: the highest "
                         "offered rate a saturation search found sustainable; saturation: the highest achieved "
                         "rate any of its probes measured. Rows whose client fell behind its schedule did not "
                         "offer the rate they name.")]  # fmt: skip
    figure = _figure_blocks(figures, out)
    for name in SERVING_FIGURES:
        blocks += figure(name)
    return blocks


def _figure_blocks(figures: list[Any], out: Path) -> Callable[[str], list[Block]]:
    """A function: figure name → its block (PNG, SVG link, the figure's notes as caption), none if not on disk."""
    from kvray.figures import FIGURES_DIR

    by_name = {f.name: f for f in figures}
    fig_dir = out / FIGURES_DIR

    def figure_blocks(name: str) -> list[Block]:
        png, svg = fig_dir / f"{name}.png", fig_dir / f"{name}.svg"
        if not png.is_file():
            return []
        result = by_name.get(name)
        caption = name + (": " + "; ".join(result.notes) if result is not None and result.notes else "")
        return [Block("figure", caption, path=png, svg=svg if svg.is_file() else None)]

    return figure_blocks


# ---------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            lines.append("|" + "|".join("---" for _ in b.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "figure" and b.path is not None:
            rel = b.path.relative_to(out).as_posix()
            lines.append(f"![{b.text.split(':')[0]}]({rel})")
            if b.svg is not None:
                lines.append(f"*{_md_cell(b.text)}* ([SVG]({b.svg.relative_to(out).as_posix()}))")
            lines.append("")
    return "\n".join(lines)


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}h2{margin-top:1.8em;font-size:1.3em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f6f9}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.8em;color:#555}code{background:#f3f3f3;padding:0 3px}
"""


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the report uses: `code` and **bold**."""
    import re

    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_html(blocks: list[Block], out: Path) -> str:
    title = next((b.text for b in blocks if b.kind == "h1"), "kvray report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "figure" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            name = b.text.split(":")[0]
            parts.append(
                f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{_inline(b.text)}</figcaption></figure>'
            )
    parts.append("</body></html>")
    return "\n".join(parts)
