"""``report.md`` and a self-contained ``report.html`` from a results folder alone (no Ray, no torch).

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice,
so the Markdown and the HTML always say the same thing. The HTML embeds every figure as base64 PNG:
one file to mail or attach to a review. Every number comes from kvray.analysis (the findings, and the
views the figures draw).

``make_all(output_dir)`` is what ``kvray run`` and the exp commands call at the end: figures, then report.
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
    PEAK_COLUMNS,
    View,
    as_number,
    experiment_rows,
    first_value,
    mixed_pairs,
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
    """A latency percentile in ms with the number of samples it pools: "12.3 (n=24)"."""
    value = _fmt_ms(r[column])
    n = as_number(r.get(column.rsplit("_p", 1)[0] + "_n"))
    return value if value == "—" or n is None else f"{value} (n={int(n)})"


def _fmt_failed(r: Any) -> str:
    """Failed requests of all measured repeats: "0", or "2/24 (8.3%)"."""
    failed, total = as_number(r.get("requests_failed")), as_number(r.get("requests"))
    if failed is None or total is None:
        return "—"
    return "0" if failed == 0 else f"{int(failed)}/{int(total)} ({failed / total:.1%})"


CELL_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("c", lambda r: f"{int(r['concurrency'])}"),
    ("prompt", lambda r: str(r["prompt_toks_list"]) if r["workload"] == "mixed" else f"{int(r['prompt_toks'])}"),
    ("gen", lambda r: f"{int(r['gen_toks'])}"),
    ("status", lambda r: str(r["status"]) + (" ⚠" if r.get("_suspect") else "")),
    ("peak mem", lambda r: _fmt_bytes(first_value(r, PEAK_COLUMNS)[0])),
    ("KV measured", lambda r: _fmt_bytes(r["kv_measured_bytes"])),
    ("KV predicted", lambda r: _fmt_bytes(r["kv_predicted_bytes"])),
    ("KV error", lambda r: _fmt_pct(r["kv_rel_error"])),
    ("out tok/s", lambda r: _fmt_num(r["output_tps"])),
    ("failed", _fmt_failed),  # beside the latencies: they pool only the successful requests
    ("TTFT p50 ms", lambda r: _fmt_percentile(r, "ttft_s_p50")),
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


def mixed_table(view: View) -> Block | None:
    pairs = mixed_pairs(view)
    if not pairs:
        return None
    rows = []
    for p in pairs:
        for stat in MIXED_STATS:
            ratio = p.ratio(stat)
            rows.append(
                [
                    p.series,
                    f"{p.n_short} × {p.short_toks} + {p.n_long} × {p.long_toks}",
                    stat.replace("_s_", " ").upper().replace("P", "p"),
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
    for exp, (heading, fig_names) in EXPERIMENTS.items():
        blocks += experiment_blocks(view, exp, heading, suspects)
        for name in fig_names:
            blocks += figure(name)
    others = cells[~cells["experiment"].isin(list(EXPERIMENTS))] if len(cells) else cells
    if len(others):
        blocks.append(Block("h2", "Other cells"))
        blocks.append(cell_table(view, others, ("experiment", "workload", "concurrency", "prompt_toks"), suspects))
    blocks.append(Block("h2", "Across hardware and KV prediction"))
    for name in FIGURES[5:]:  # fig6 cross-hardware, fig7 KV predicted vs measured
        blocks += figure(name)
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
