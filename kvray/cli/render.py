"""Everything the CLI prints: rich tables and lines for people, JSON for scripts.

Commands hand finished results here; nothing in this module computes a number. rich is imported inside
each function, so ``kvray --help`` and every ``--json`` path never load it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvray.units import human_bytes

if TYPE_CHECKING:
    from kvray.model.oom import OomRisk

RISK_COLOURS = {"low": "green", "medium": "yellow", "high": "red"}


def console(min_width_when_piped: int | None = None) -> Any:
    """A rich Console; writing to a file or pipe, at least ``min_width_when_piped`` columns so wide tables
    keep every column."""
    from rich.console import Console

    out = Console()
    if min_width_when_piped and not out.is_terminal:
        out.width = max(out.width, min_width_when_piped)
    return out


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def line(text: str, soft_wrap: bool = False) -> None:
    """One line for people (rich markup and highlighting apply; ``soft_wrap`` keeps a long path unbroken)."""
    console().print(text, soft_wrap=soft_wrap)


def simple_table(title: str, columns: Sequence[str], left: Sequence[str]) -> Any:
    """A compact table whose ``left`` columns are left-aligned and the rest right-aligned (numbers)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


# --- model facts: info, check -------------------------------------------------------------------------


def model_info(g: Any, summary: dict[str, Any]) -> None:
    """``kvray info``: the geometry table and the KV-fit table per GPU."""
    from rich.table import Table

    from kvray.hardware.gpus import GPUS
    from kvray.model.oom import KV_FIT_MEMORY_FRACTION

    table = Table(title=f"{g.name} ({summary['dtype']})", show_header=False)
    attention = g.attention.upper() + (f", sliding window {g.sliding_window}" if g.sliding_window else "")
    per_token = summary["kv_bytes_per_token"]
    rows = [
        ("family", g.model_type),
        ("layers × hidden", f"{g.num_layers} × {g.hidden_size}"),
        ("attention", f"{attention}: {g.num_attention_heads} heads, {g.num_kv_heads} KV heads × {g.head_dim}"),
        ("max positions", f"{g.max_position_embeddings:,}"),
        ("parameters", f"{g.params:,} ({g.params / 1e9:.2f} B)"),
        ("weights", human_bytes(summary["weights_bytes"])),
        ("KV per token (hf)", human_bytes(per_token)),
        ("KV per token (paged)", human_bytes(summary["kv_bytes_per_token_paged"])),
        ("KV per 1k tokens", human_bytes(per_token * 1000)),
    ]
    tp = summary.get("tensor_parallel", 1)
    if tp > 1:
        rows += [
            (f"weights per GPU (TP {tp})", human_bytes(summary["weights_bytes_per_gpu"])),
            (
                f"KV per token per GPU (TP {tp})",
                f"{human_bytes(summary['kv_bytes_per_token_per_gpu'])} ({summary['kv_heads_per_gpu']} KV heads per GPU)",
            ),
        ]
    if g.kv_lora_rank is not None:
        rows.insert(3, ("MLA latent", f"kv_lora_rank {g.kv_lora_rank} + rope {g.qk_rope_head_dim}"))
    if g.is_moe:
        rows.insert(5, ("active parameters", f"{g.active_params:,}"))
    for key, value in rows:
        table.add_row(key, value)
    fit_table = Table(title=f"KV tokens that fit beside the weights ({KV_FIT_MEMORY_FRACTION:.0%} of memory)")
    fit_table.add_column("GPU")
    fit_table.add_column("memory", justify="right")
    fit_table.add_column("KV tokens", justify="right")
    for name, tokens in summary["kv_tokens_fitting_beside_weights"].items():
        fit_table.add_row(name, f"{GPUS[name].memory_gib:g} GiB", f"{tokens:,}" if tokens else "weights do not fit")
    out = console()
    out.print(table)
    out.print(fit_table)
    if summary.get("per_tp"):
        out.print(_tp_table(summary["per_tp"]))


def _tp_table(per_tp: list[dict[str, Any]]) -> Any:
    """``kvray info``: per-GPU weights, KV per token and KV tokens that fit, one row per TP degree."""
    from rich.table import Table

    gpus = ("H100-SXM", "A100-80GB-SXM", "L40S", "L4")
    table = Table(title="Per GPU under tensor parallelism (vLLM's split): KV heads, weights, KV per token, KV tokens")
    for column in ("TP", "heads", "weights", "KV/tok", *(g.removesuffix("-SXM") for g in gpus)):
        table.add_column(column, justify="right")
    for row in per_tp:
        fits = row["kv_tokens_fitting_per_gpu"]
        table.add_row(
            str(row["tensor_parallel"]),
            str(row["kv_heads_per_gpu"]),
            human_bytes(row["weights_bytes_per_gpu"]),
            human_bytes(row["kv_bytes_per_token_per_gpu"]),
            *(f"{fits[n]:,}" if fits[n] else "-" for n in gpus),
        )
    return table


def oom_risk(risk: OomRisk) -> None:
    """``kvray check``: the memory budget, the risk level and what to do about it."""
    from rich.table import Table

    per_gpu = f", per GPU of TP {risk.tensor_parallel}" if risk.per_gpu else ""
    table = Table(title=f"OOM risk: {risk.model}, {risk.concurrency} × {risk.seq_len} tokens, {risk.dtype}{per_gpu}")
    table.add_column("item")
    table.add_column("GiB", justify="right")
    for key in ("weights_gb", "kv_gb", "activation_gb", "overhead_gb", "total_estimated_gb", "available_gb"):
        table.add_row(key.removesuffix("_gb").replace("_", " "), f"{getattr(risk, key):.2f}")
    out = console()
    out.print(table)
    colour = RISK_COLOURS[risk.risk_level]
    out.print(f"risk: [bold {colour}]{risk.risk_level}[/] ({risk.fraction_of_available:.0%} of {risk.device})")
    out.print(f"max concurrency at {risk.seq_len} tokens: {risk.max_concurrency}")
    for rec in risk.recommendations:
        out.print(f"  • {rec}")


# --- bench: one measured cell ---------------------------------------------------------------------------


def bench_json(record: Any) -> dict[str, Any]:
    """``kvray bench --json``: the result's headline fields and where it was written."""
    data = record.result.to_dict()
    keys = ("cell_id", "status", "reason", "metrics", "memory", "hardware")
    return {**{k: data[k] for k in keys}, "output": str(record.output_dir), "cell_json": str(record.cell_json)}


def bench_result(record: Any) -> None:
    """``kvray bench``: latency percentiles, throughput and memory, the status and the files written."""
    result = record.result
    out = console()
    if result.metrics:
        for table in _bench_tables(result):
            out.print(table)
    colour = "green" if result.status == "ok" else "red"
    out.print(f"status: [bold {colour}]{result.status}[/]" + (f" — {result.reason}" if result.reason else ""))
    note = "" if record.added else " (replacing this cell's earlier row, --replace)"
    out.print(f"wrote {record.cell_json} and {record.output_dir / 'cells.jsonl'}{note}")


def bench_stat(m: dict[str, Any], name: str, stat: str) -> str:
    """One cell of ``kvray bench``'s latency table, in ms: a percentile the sample cannot hold
    (kvray.measure.metrics.min_samples: p90 needs 10 values, p99 100) reads "max of n" — the value is the max
    column's — never a p99 that is the maximum of 4 requests; "-" where the metric has no value."""
    from kvray.measure.metrics import min_samples

    n = m.get(f"{name}_n")
    if stat.startswith("p") and n is not None and n == n and int(n) < min_samples(float(stat[1:])):
        return f"max of {int(n)}" if n else "-"
    value = m.get(f"{name}_{stat}")
    return "-" if value is None or value != value else f"{value * 1e3:,.2f}"


def bench_throughput(m: dict[str, Any]) -> str:
    """Output tokens/s: the mean over repeats with their standard deviation and count; one repeat has no spread."""
    repeats = int(m.get("output_tps_n") or 1)
    if repeats < 2:
        return f"{m['output_tps']:,.1f} (1 repeat, no spread)"
    return f"{m['output_tps']:,.1f} ± {m['output_tps_std']:,.1f} (sd over {repeats} repeats)"


def _bench_tables(result: Any) -> tuple[Any, Any]:
    from rich.table import Table

    m, mem = result.metrics, result.memory
    table = Table(title=f"{result.cell.label()} on {result.hardware.get('name', 'cpu')} — cell {result.cell_id}")
    table.add_column("latency (ms)")
    table.add_column("n", justify="right")
    stats = ("mean", "p50", "p90", "p99", "max")
    for col in stats:
        table.add_column(col, justify="right")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s"):
        if f"{name}_mean" in m:
            n = m.get(f"{name}_n")
            table.add_row(
                name.removesuffix("_s").upper(),
                "-" if n is None or n != n else f"{int(n):,}",
                *(bench_stat(m, name, s) for s in stats),
            )
    facts = Table(show_header=False, title="throughput and memory")
    if m:
        facts.add_row("output tokens/s", bench_throughput(m))
        facts.add_row("total tokens/s", f"{m['total_tps']:,.1f}")
        facts.add_row("requests/s", f"{m['rps']:,.2f}")
        facts.add_row("requests ok / all", f"{m['requests_ok']} / {m['requests']}")
        if m.get("tpot_bunched_n"):
            facts.add_row("TPOT/ITL left out", f"{m['tpot_bunched_n']} bunched stream(s): tokens read < 0.25 ms apart")
    if m.get("client_lag_s_p99_by_client"):  # the load came from K client actors
        lags = ", ".join("-" if x is None else f"{x * 1e3:.1f}" for x in json.loads(m["client_lag_s_p99_by_client"]))
        facts.add_row(f"client lag p99 ms, {result.cell.clients} clients", lags)
    for key in (
        "weights_bytes",
        "baseline_bytes",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "nvml_peak_used_bytes",
        "rss_peak_bytes",
        "kv_measured_bytes",
        "kv_predicted_bytes",
    ):
        if mem.get(key) is not None:
            facts.add_row(key.removesuffix("_bytes").replace("_", " "), human_bytes(mem[key]))
    if mem.get("kv_rel_error") is not None:
        facts.add_row("KV measured vs predicted", f"{mem['kv_rel_error']:+.2%}")
    return table, facts


# --- the simulator: predict, calibrate -----------------------------------------------------------------


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    if value != value:  # NaN: TPOT of a single generated token
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:,.1f}" if value < 1e3 else f"{value:,.0f}"


def predictions(title: str, rows: list[Any], efficiencies: dict[str, Any]) -> None:
    """``kvray predict``: one row per cell and GPU, then the efficiencies each GPU was predicted with."""
    from kvray.hardware.gpus import get_gpu

    with_tp = any(p.tensor_parallel > 1 for p in rows)
    columns = (
        "GPU",
        *(("TP",) if with_tp else ()),
        "c",
        "prompt",
        "gen",
        "TTFT",
        "TPOT",
        "E2E",
        "tok/s",
        "GiB",
        "fits",
        "bound",
    )
    table = simple_table(title, columns, left=("GPU", "fits", "bound"))
    table.collapse_padding = True
    roof = {"compute": "C", "memory": "M", "overhead": "O", "communication": "N", "": "-"}
    for p in rows:
        table.add_row(
            p.gpu,
            *((str(p.tensor_parallel),) if with_tp else ()),
            str(p.concurrency),
            str(p.prompt_toks),
            str(p.gen_toks),
            _ms(p.ttft_s),
            _ms(p.tpot_s),
            f"{p.e2e_s:.3g}",
            f"{p.output_tps:,.0f}",
            f"{p.total_bytes / 2**30:.1f}",
            "yes" if p.fits else "[red]OOM[/]",
            f"{roof[p.prefill_bound]}/{roof[p.decode_bound]}",
        )
    out = console(min_width_when_piped=120)
    out.print(table)
    for name, eff in efficiencies.items():
        out.print(f"{name} ({get_gpu(name).memory_gib:g} GiB): {eff.describe()}")
    out.print("TTFT, TPOT in ms; E2E in s; GiB = predicted peak (weights + KV + activations + runtime)")
    out.print("bound = the roof limiting prefill/decode: C compute, M memory, O overhead (docs/simulator.md)")
    if with_tp:
        out.print("TP > 1: GiB per GPU, tok/s for the whole group; N = TP all-reduce over the GPUs' link dominates")


def calibration(results_dir: str, fits: list[Any], path: Any) -> None:
    """``kvray calibrate``: the fitted η per GPU and layout, and the prediction error before → after."""

    def err(d: dict[str, float], kind: str) -> str:
        return f"{d[kind]:.1%}" if kind in d else "—"

    columns = ("GPU", "layout", "rows", "η_compute", "η_memory", "µs/layer", "TTFT err", "TPOT err")
    table = simple_table(f"Calibration from {results_dir}", columns, left=("GPU", "layout"))
    for f in fits:
        mark = {roof: "" if ok else " (not identified)" for roof, ok in f.identified.items()}
        table.add_row(
            f.gpu,
            f.layout,
            str(f.rows),
            f"{f.eta_compute:.3f}{mark['compute']}",
            f"{f.eta_memory:.3f}{mark['memory']}",
            f"{f.layer_overhead_s * 1e6:.3g}{mark['overhead']}",
            f"{err(f.median_abs_rel_error_before, 'ttft')} → {err(f.median_abs_rel_error_after, 'ttft')}",
            f"{err(f.median_abs_rel_error_before, 'tpot')} → {err(f.median_abs_rel_error_after, 'tpot')}",
        )
    out = console(min_width_when_piped=120)
    out.print(table)
    out.print("µs/layer: fixed cost per layer per forward pass; err: median |relative error|, default η → fitted")
    names = {
        "step_overhead_s": "per step",
        "request_step_s": "per running request per step",
        "admit_s": "per admission",
        "finish_s": "per finish",
    }
    for f in fits:
        cpu = [
            f"{getattr(f, k, 0.0) * 1e3:.3g} ms {name}" + ("" if f.identified.get(k, True) else " (not identified)")
            for k, name in names.items()
        ]
        out.print(f"{f.gpu} {f.layout} CPU side: {', '.join(cpu)}")
    out.print(f"saved to {path}")


# --- sweeps: dry run, run summary ----------------------------------------------------------------------


def dry_run(job_name: str, rows: list[dict[str, Any]]) -> None:
    """``kvray expN --dry-run``: each cell with the memory the pre-flight check predicts, and its risk."""
    from rich.table import Table

    table = Table(title=f"{job_name}: {len(rows)} cells (dry run — predicted memory, nothing runs)")
    with_tp = any(r.get("tensor_parallel", 1) > 1 for r in rows)
    for col in (
        "cell",
        "backend",
        "hardware",
        *(("TP",) if with_tp else ()),
        "c",
        "prompt",
        "gen",
        "weights GiB",
        "KV GiB",
        "act GiB",
        "total GiB",
        "of GiB",
        "risk",
    ):
        table.add_column(col, justify="left" if col in ("cell", "backend", "hardware", "risk") else "right")
    for r in rows:
        table.add_row(
            r["cell_id"],
            r["backend"],
            r["hardware"] if r["hardware"] != "any" else r["device"],
            *((str(r.get("tensor_parallel", 1)),) if with_tp else ()),
            str(r["concurrency"]),
            str(r["prompt_toks"]),
            str(r["gen_toks"]),
            f"{r['weights_gb']:.2f}",
            f"{r['kv_gb']:.3f}",
            f"{r['activation_gb']:.3f}",
            f"{r['total_estimated_gb']:.2f}",
            f"{r['available_gb']:.1f}",
            f"[{RISK_COLOURS[r['risk_level']]}]{r['risk_level']}[/]",
        )
    out = console(min_width_when_piped=130)
    out.print(table)
    out.print("high risk cells are refused at run time unless --no-check-oom (the pre-flight check)")
    if with_tp:
        out.print("TP > 1: the memory columns are one GPU's of the cell's tensor-parallel group")


def run_summary(
    job_name: str, counts: dict[str, int], record: dict[str, Any], out_dir: Any, failed: list[dict[str, Any]]
) -> None:
    """``kvray run``: cells per status, what ran now, and the first failures' reasons."""
    from rich.table import Table

    table = Table(title=f"{job_name}: {sum(counts.values())} cells")
    table.add_column("status")
    table.add_column("cells", justify="right")
    colours = {"ok": "green", "oom": "yellow", "skipped_after_oom": "yellow", "refused": "yellow", "error": "red"}
    for status, n in counts.items():
        table.add_row(f"[{colours.get(status, 'white')}]{status}[/]", str(n))
    out = console()
    out.print(table)
    out.print(
        f"{record.get('cells_to_run', 0)} run now, {record.get('cells_already_done', 0)} already done, "
        f"{record.get('wall_s', 0.0):.1f} s → {out_dir}"
    )
    for r in failed:
        out.print(f"  {r['status']} {r['cell_id']}: {r.get('reason') or ''}", markup=False)
    stragglers(record)


def stragglers(record: dict[str, Any]) -> None:
    """A line per worker the run named a straggler (kvray/sweep/stragglers.py), after the counts."""
    from kvray.sweep.stragglers import Straggler

    for s in record.get("stragglers") or []:
        console().print(f"straggler: {Straggler(**s).describe()}", markup=False, highlight=False, soft_wrap=True)


def experiment_summary(job_name: str, counts: dict[str, int], out_dir: Any) -> None:
    """The exp commands' last line: cells per status and where the dataset is."""
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells"
    console().print(f"{job_name}: {done} → {out_dir}")


# --- figures, findings, report ------------------------------------------------------------------------


def figures(results: list[Any]) -> None:
    """One line per figure drawn (or what it lacks), then where they went."""
    out = console()
    for r in results:
        what = "empty — " + "; ".join(r.notes[:1]) if r.empty else f"{len(r.series)} series"
        if r.oom_markers:
            what += f", {r.oom_markers} OOM cell(s) marked"
        out.print(f"  {r.name}: {what}", highlight=False)
    if results:
        out.print(f"wrote {len(results)} figures (PNG 300 dpi + SVG) to {results[0].paths[0].parent}")


def findings(items: list[Any]) -> None:
    out = console()
    for f in items:
        out.print(f"  • {f.text}", highlight=False, soft_wrap=True)


def warning(text: str) -> None:
    sys.stderr.write(f"kvray: warning: {text}\n")


def note(text: str) -> None:
    sys.stderr.write(f"kvray: note: {text}\n")
