"""The report's page, in order: summary, environment, findings, a section per registered experiment, the cells
of no experiment, the general figures, the timelines of the cells worth a look, definitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvray.analysis.dataset import Dataset
from kvray.analysis.evidence import Finding
from kvray.analysis.findings import suspect_cells
from kvray.analysis.views import simulated_mask
from kvray.document import Block, FigureBlocks, cell_table, render_html, render_markdown
from kvray.document.blocks import fmt_bytes
from kvray.experiments import Page, compute_findings, experiments, finding_rules
from kvray.experiments.sections import section_of
from kvray.figures.common import FIGURES_DIR, FigureResult

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# Figures of no one experiment, drawn from the View for every folder (kvray/figures/plots.py).
GENERAL_FIGURES = ("fig6_cross_hardware", "fig7_kv_predicted_vs_measured")
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


@dataclass
class ReportPaths:
    markdown: Path
    html: Path
    figures: list[FigureResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def draw_figures(dataset: Dataset, out_dir: Path) -> list[FigureResult]:
    """Every figure of the dataset into ``out_dir``: each registered experiment's (exp4–exp7's only where the
    folder holds their data), then the general ones. What ``kvray plot`` and the report draw."""
    from kvray.figures.plots import plot_view

    drawn = [f for exp in experiments() if exp.draw is not None for f in exp.draw(dataset, out_dir)]
    return drawn + plot_view(dataset.view, out_dir, GENERAL_FIGURES)


def make_report(results_dir: str | Path, figures: bool = True, dataset: Dataset | None = None) -> ReportPaths:
    """Figures (unless ``figures`` is False: the report then embeds the ones already on disk), findings and the
    report of the folder ``results_dir``, read once (``dataset``: already loaded)."""
    out = Path(results_dir)
    data = dataset or Dataset.load(out)
    drawn = draw_figures(data, out / FIGURES_DIR) + timeline_figures(data) if figures else []
    findings = compute_findings(data.view)
    blocks = build_blocks(data, findings, drawn)
    md_path, html_path = out / REPORT_MD, out / REPORT_HTML
    md_path.write_text(render_markdown(blocks, out))
    html_path.write_text(render_html(blocks, out))
    return ReportPaths(md_path, html_path, drawn, findings)


make_all = make_report  # what `kvray run` and the exp commands call at the end: figures, then report


def build_blocks(dataset: Dataset, findings: list[Finding], figures: list[FigureResult]) -> list[Block]:
    """The whole report (module docstring)."""
    out = dataset.folder
    cells = dataset.view.cells
    figure = FigureBlocks(out / FIGURES_DIR, figures)
    page = Page(dataset, figure, suspect_cells(findings))
    blocks = summary_blocks(dataset)
    blocks += environment_blocks(dataset) if len(cells) else []
    blocks += findings_blocks(findings)
    for exp in experiments():
        blocks += section_of(exp)(exp, page)
    names = [exp.name for exp in experiments()]
    others = cells[~cells["experiment"].isin(names)] if len(cells) else cells
    if len(others):
        blocks.append(Block("h2", "Other cells"))
        blocks.append(
            cell_table(dataset.view, others, ("experiment", "workload", "concurrency", "prompt_toks"), page.suspects)
        )
    blocks.append(Block("h2", "Across hardware and KV prediction"))
    for name in GENERAL_FIGURES:
        blocks += figure(name)
    blocks += timeline_blocks(dataset)
    blocks.append(Block("h2", "Definitions"))
    blocks.append(Block("ul", items=list(DEFINITIONS)))
    return blocks


def summary_blocks(dataset: Dataset) -> list[Block]:
    """Title, what the dataset holds, and what it lacks (columns, measurements: simulated cells)."""
    view, manifest, out = dataset.view, dataset.manifest, dataset.folder
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


def environment_blocks(dataset: Dataset) -> list[Block]:
    """Per hardware type its memory, cells and backends; the job and runs; the last run's workers."""
    blocks = [Block("h2", "Environment and hardware")]
    cells, manifest = dataset.view.cells, dataset.manifest
    rows = []
    for hw, part in cells.groupby("hardware", dropna=False):
        cap = part["capacity_bytes"].dropna()
        acc = part["accelerator_type"].dropna() if "accelerator_type" in part else part["hardware"].iloc[:0]
        sim = simulated_mask(part)
        rows.append(
            [
                str(hw),
                str(part["hardware_label"].iloc[0]),
                fmt_bytes(cap.iloc[0]) if len(cap) else "—",
                str(acc.iloc[0]) if len(acc) else "—",
                str(len(part)),
                ", ".join(sorted({str(b) for b in part["backend"]})),
                "yes" if sim.all() else "partly" if sim.any() else "no",
            ]
        )
    headers = ["hardware", "short name", "memory", "Ray accelerator type", "cells", "backends", "simulated"]
    blocks.append(Block("table", headers=headers, rows=rows))
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


def findings_blocks(findings: list[Finding]) -> list[Block]:
    """The findings grouped under their rules' titles, in rule order; a sentence when there is none."""
    blocks = [Block("h2", "Findings")]
    if not findings:
        blocks.append(
            Block(
                "p",
                "No finding can be computed from this dataset (it needs ok cells of exp1, exp2 "
                "or exp3, or cells with measured and predicted KV).",
            )
        )
    titles = {rule.key: rule.title for rule in reversed(finding_rules())}  # a key's first rule names it
    for key in dict.fromkeys(rule.key for rule in finding_rules()):
        texts = [f.text for f in findings if f.key == key]
        if texts:
            blocks.append(Block("h3", titles[key]))
            blocks.append(Block("ul", items=texts))
    return blocks


def _worth_a_look(dataset: Dataset) -> dict[str, str]:
    """The cells whose timelines the report shows: those worth a look that the folder still has a row of."""
    known = {r["cell_id"] for r in dataset.records}
    return {cell_id: why for cell_id, why in dataset.cells_worth_a_look.items() if cell_id in known}


def timeline_figures(dataset: Dataset) -> list[FigureResult]:
    """fig10 of the cells worth a look (kvray.analysis.dataset.Dataset.cells_worth_a_look)."""
    from kvray.figures.timeline import cell_timelines

    return cell_timelines(dataset, list(_worth_a_look(dataset)), dataset.folder / FIGURES_DIR)


def timeline_blocks(dataset: Dataset) -> list[Block]:
    """Each cell worth a look, why, and its fig10 where it is on disk."""
    from kvray.figures.timeline import figure_name

    why = dataset.cells_worth_a_look
    out = dataset.folder
    blocks = [Block("h2", "Timelines of the cells worth a look")] if why else []
    for cell_id, reason in why.items():
        png = out / FIGURES_DIR / f"{figure_name(cell_id)}.png"
        blocks.append(Block("p", f"Cell {cell_id}: {reason} (`kvray plot {out} --cell {cell_id}`)."))
        if png.is_file():
            blocks.append(
                Block(
                    "figure",
                    f"{figure_name(cell_id)}: requests, hardware and engine on one clock",
                    path=png,
                    svg=png.with_suffix(".svg"),
                )
            )
    return blocks
