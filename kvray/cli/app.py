"""The ``kvray`` command line. Each command validates its input, then calls one module that does the work.

Heavy libraries (torch, transformers, ray) are imported inside commands only, so ``kvray --help`` and
``kvray info`` with a bundled model start fast.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from kvray.errors import KvrayInputError
from kvray.units import human_bytes

app = typer.Typer(
    name="kvray",
    help="wrk for LLM inference, KV edition: measure, predict and plot KV-cache bottlenecks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 | fp16 | bf16 (| fp8 for KV figures)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="HF id, bundled id or local directory with config.json")],
    dtype: DtypeOpt = "bf16",
    as_json: JsonOpt = False,
) -> None:
    """Geometry, parameters, weight bytes and KV bytes per token of MODEL, and how much KV fits per GPU."""
    from kvray.hardware.gpus import GPUS
    from kvray.model.kvmath import dtype_bytes, kv_bytes_per_token, normalize_dtype
    from kvray.model.oom import RUNTIME_OVERHEAD_BYTES
    from kvray.model.resolve import resolve_geometry

    dtype = normalize_dtype(dtype)
    g = resolve_geometry(model)
    weights = g.weights_bytes(dtype_bytes(dtype))
    per_token = kv_bytes_per_token(g, dtype, "hf")
    per_token_paged = kv_bytes_per_token(g, dtype, "paged")
    fits = {
        name: max(int((0.9 * spec.memory_bytes - weights - RUNTIME_OVERHEAD_BYTES) // per_token), 0)
        for name, spec in GPUS.items()
    }
    record = {
        "model": g.name,
        "model_type": g.model_type,
        "dtype": dtype,
        "num_layers": g.num_layers,
        "hidden_size": g.hidden_size,
        "num_attention_heads": g.num_attention_heads,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "attention": g.attention,
        "sliding_window": g.sliding_window,
        "num_sliding_layers": g.num_sliding_layers,
        "kv_lora_rank": g.kv_lora_rank,
        "max_position_embeddings": g.max_position_embeddings,
        "vocab_size": g.vocab_size,
        "params": g.params,
        "active_params": g.active_params,
        "weights_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_bytes_per_token_paged": per_token_paged,
        "kv_bytes_per_1k_tokens": per_token * 1000,
        "kv_tokens_fitting_beside_weights": fits,
    }
    if as_json:
        _print_json(record)
        return
    from rich.table import Table

    table = Table(title=f"{g.name} ({dtype})", show_header=False)
    attention = g.attention.upper() + (f", sliding window {g.sliding_window}" if g.sliding_window else "")
    rows = [
        ("family", g.model_type),
        ("layers × hidden", f"{g.num_layers} × {g.hidden_size}"),
        ("attention", f"{attention}: {g.num_attention_heads} heads, {g.num_kv_heads} KV heads × {g.head_dim}"),
        ("max positions", f"{g.max_position_embeddings:,}"),
        ("parameters", f"{g.params:,} ({g.params / 1e9:.2f} B)"),
        ("weights", human_bytes(weights)),
        ("KV per token (hf)", human_bytes(per_token)),
        ("KV per token (paged)", human_bytes(per_token_paged)),
        ("KV per 1k tokens", human_bytes(per_token * 1000)),
    ]
    if g.kv_lora_rank is not None:
        rows.insert(3, ("MLA latent", f"kv_lora_rank {g.kv_lora_rank} + rope {g.qk_rope_head_dim}"))
    if g.is_moe:
        rows.insert(5, ("active parameters", f"{g.active_params:,}"))
    for key, value in rows:
        table.add_row(key, value)
    fit_table = Table(title="KV tokens that fit beside the weights (90% of memory)")
    fit_table.add_column("GPU")
    fit_table.add_column("memory", justify="right")
    fit_table.add_column("KV tokens", justify="right")
    for name, tokens in fits.items():
        fit_table.add_row(name, f"{GPUS[name].memory_gib:g} GiB", f"{tokens:,}" if tokens else "weights do not fit")
    console = _console()
    console.print(table)
    console.print(fit_table)


@app.command()
def env(as_json: JsonOpt = False) -> None:
    """Platform, Python, CUDA driver, GPUs (NVML, torch fallback) and library versions."""
    from kvray.hardware.env import collect_environment, format_banner

    environment = collect_environment()
    if as_json:
        _print_json(environment.to_dict())
    else:
        sys.stdout.write(format_banner(environment) + "\n")


@app.command()
def check(
    model: Annotated[str, typer.Argument(help="HF id, bundled id or local directory")],
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="concurrent sequences")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="cached tokens per sequence (prompt + generated)")] = 2048,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name (default: this machine's)")] = None,
    dtype: DtypeOpt = "bf16",
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV dtype if not --dtype")] = None,
    as_json: JsonOpt = False,
) -> None:
    """OOM risk of CONCURRENCY sequences of SEQ_LEN tokens: weights + KV + activations vs memory."""
    from kvray.model.oom import check_oom_risk

    risk = check_oom_risk(model, concurrency, seq_len, dtype=dtype, gpu=gpu, kv_dtype=kv_dtype)
    if as_json:
        _print_json(risk)
        return
    from rich.table import Table

    colour = {"low": "green", "medium": "yellow", "high": "red"}[risk["risk_level"]]
    table = Table(title=f"OOM risk: {risk['model']}, {concurrency} × {seq_len} tokens, {risk['dtype']}")
    table.add_column("item")
    table.add_column("GiB", justify="right")
    for key in ("weights_gb", "kv_gb", "activation_gb", "overhead_gb", "total_estimated_gb", "available_gb"):
        table.add_row(key.removesuffix("_gb").replace("_", " "), f"{risk[key]:.2f}")
    console = _console()
    console.print(table)
    console.print(
        f"risk: [bold {colour}]{risk['risk_level']}[/] ({risk['fraction_of_available']:.0%} of {risk['device']})"
    )
    console.print(f"max concurrency at {seq_len} tokens: {risk['max_concurrency']}")
    for rec in risk["recommendations"]:
        console.print(f"  • {rec}")


# --- bench: one cell, in-process, no Ray ----------------------------------------------------------------


VllmPythonOpt = Annotated[
    str | None, typer.Option("--vllm-python", help="Python of a vLLM install (default: $KVRAY_VLLM_PYTHON, this one)")
]
BaseUrlOpt = Annotated[
    str | None, typer.Option("--base-url", help="openai backend: server URL, e.g. http://127.0.0.1:8000")
]
ApiKeyEnvOpt = Annotated[
    str | None, typer.Option("--api-key-env", help="openai backend: environment variable holding the API key")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="ollama backend: server URL, e.g. http://127.0.0.1:11434")]


def server_options(vllm_python: str | None, base_url: str | None, api_key_env: str | None,
                   host: str | None) -> list[str]:  # fmt: skip
    """The server flags as --option KEY=VALUE pairs (the API key's *name* only; its value never leaves the env)."""
    pairs = {"vllm_python": vllm_python, "base_url": base_url, "api_key_env": api_key_env, "host": host}
    return [f"{k}={v}" for k, v in pairs.items() if v]


def _parse_options(pairs: list[str]) -> tuple[tuple[str, Any], ...]:
    """KEY=VALUE backend options; values are read as JSON when they parse (numbers, true, null), else text."""
    from kvray.spec import make_options

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise KvrayInputError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return make_options(**options)


def _bench_cell(
    model: str, prompt_toks: int, gen_toks: int, concurrency: int, mixed: str | None, arrival_gap_s: float,
    dtype: str, weights: str, device: str, backend: str, warmup: int, repeats: int, options: list[str],
) -> Any:  # fmt: skip
    """Validate every flag and build the Cell — all before any model loads."""
    from kvray.backends import REGISTRY
    from kvray.model.kvmath import normalize_dtype
    from kvray.model.resolve import resolve_geometry
    from kvray.spec import WEIGHTS, Cell, Workload

    if backend not in REGISTRY:
        raise KvrayInputError(f"unknown backend {backend!r} (known: {', '.join(REGISTRY)})")
    if weights not in WEIGHTS:
        raise KvrayInputError(f"unknown --weights {weights!r} (known: {', '.join(WEIGHTS)})")
    dtype = normalize_dtype(dtype, allow_fp8=False)
    if arrival_gap_s < 0:
        raise KvrayInputError(f"--arrival-gap-s must be >= 0, got {arrival_gap_s}")
    if mixed:
        try:
            lengths = [int(x) for x in mixed.split(",") if x.strip()]
        except ValueError:
            raise KvrayInputError(f"--mixed expects comma-separated prompt lengths, got {mixed!r}") from None
        workload = Workload.mixed(lengths, gen_toks, arrival_gap_s)
    else:
        workload = Workload.uniform(concurrency, prompt_toks, gen_toks, arrival_gap_s)
    try:
        g = resolve_geometry(model)
    except KvrayInputError:
        if backend not in ("openai", "ollama"):  # a remote server may serve a model kvray cannot resolve
            raise
        g = None
    if g is not None and workload.max_seq_len > g.max_position_embeddings:
        raise KvrayInputError(
            f"prompt + generated tokens ({workload.max_seq_len}) exceed {model}'s "
            f"max_position_embeddings ({g.max_position_embeddings})"
        )
    if backend == "hf":
        from kvray.backends.hf import resolve_device

        device = resolve_device(device)
    return Cell(
        model=model, workload=workload, backend=backend, dtype=dtype, weights=weights, device=device,
        warmup=warmup, repeats=repeats, options=_parse_options(options),
    )  # fmt: skip


def _bench_tables(result: Any) -> tuple[Any, Any]:
    from rich.table import Table

    m, mem = result.metrics, result.memory
    table = Table(title=f"{result.cell.label()} on {result.hardware.get('name', 'cpu')} — cell {result.cell_id}")
    table.add_column("latency (ms)")
    stats = ("mean", "p50", "p90", "p99", "max")
    for col in stats:
        table.add_column(col, justify="right")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s"):
        if f"{name}_mean" in m:
            table.add_row(name.removesuffix("_s").upper(), *(f"{m[f'{name}_{s}'] * 1e3:,.2f}" for s in stats))
    facts = Table(show_header=False, title="throughput and memory")
    if m:
        facts.add_row("output tokens/s", f"{m['output_tps']:,.1f} ± {m['output_tps_std']:,.1f}")
        facts.add_row("total tokens/s", f"{m['total_tps']:,.1f}")
        facts.add_row("requests/s", f"{m['rps']:,.2f}")
        facts.add_row("requests ok / all", f"{m['requests_ok']} / {m['requests']}")
    for key in ("weights_bytes", "baseline_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
                "nvml_peak_used_bytes", "rss_peak_bytes", "kv_measured_bytes", "kv_predicted_bytes"):  # fmt: skip
        if mem.get(key) is not None:
            facts.add_row(key.removesuffix("_bytes").replace("_", " "), human_bytes(mem[key]))
    if mem.get("kv_rel_error") is not None:
        facts.add_row("KV measured vs predicted", f"{mem['kv_rel_error']:+.2%}")
    return table, facts


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="HF id, bundled id or local directory")] = (
        "facebook/opt-1.3b"
    ),
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="prompt tokens per request")] = 512,
    gen_toks: Annotated[int, typer.Option("--gen-toks", help="generated tokens per request")] = 64,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="requests in the batch")] = 1,
    mixed: Annotated[str | None, typer.Option("--mixed", help="mixed prompt lengths, e.g. 128,128,4096")] = None,
    arrival_gap_s: Annotated[float, typer.Option("--arrival-gap-s", help="seconds between arrivals")] = 0.0,
    dtype: DtypeOpt = "bf16",
    weights: Annotated[str, typer.Option("--weights", help="random (no download) | pretrained")] = "random",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    backend: Annotated[
        str, typer.Option("--backend", help="hf | hf-paged | vllm | openai | ollama | synthetic | sim")
    ] = "hf",
    warmup: Annotated[int, typer.Option("--warmup", help="unmeasured runs first")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="measured runs")] = 3,
    option: Annotated[list[str] | None, typer.Option("--option", help="backend option KEY=VALUE (repeatable)")] = None,
    vllm_python: VllmPythonOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    host: HostOpt = None,
    no_check_oom: Annotated[bool, typer.Option("--no-check-oom", help="run even when OOM risk is high")] = False,
    output: Annotated[str, typer.Option("--output", help="results folder")] = "results",
    as_json: JsonOpt = False,
) -> None:
    """Measure one cell in-process (no Ray): latency, throughput, memory and KV; writes the dataset."""
    from pathlib import Path

    from kvray.backends import get_backend
    from kvray.bench.runner import run_cell
    from kvray.data.store import DatasetWriter, write_json_atomic

    cell = _bench_cell(
        model, prompt_toks, gen_toks, concurrency, mixed, arrival_gap_s, dtype, weights, device, backend,
        warmup, repeats, [*(option or []), *server_options(vllm_python, base_url, api_key_env, host)],
    )  # fmt: skip
    _check_server_options(cell)
    engine = get_backend(backend)
    try:
        result = run_cell(engine, cell, check_oom=not no_check_oom)
    finally:
        engine.close()
    out_dir = Path(output)
    added = DatasetWriter(out_dir).append(result)
    cell_json = out_dir / f"cell_{result.cell_id}.json"
    write_json_atomic(cell_json, result.to_dict())
    if as_json:
        keys = ("cell_id", "status", "reason", "metrics", "memory", "hardware")
        _print_json({**{k: result.to_dict()[k] for k in keys}, "output": str(out_dir), "cell_json": str(cell_json)})
    else:
        console = _console()
        if result.metrics:
            for table in _bench_tables(result):
                console.print(table)
        colour = "green" if result.status == "ok" else "red"
        console.print(f"status: [bold {colour}]{result.status}[/]" + (f" — {result.reason}" if result.reason else ""))
        note = "" if added else " (this cell_id was already in cells.jsonl: the earlier row is kept there)"
        console.print(f"wrote {cell_json} and {out_dir / 'cells.jsonl'}{note}")
    if result.status != "ok":
        raise typer.Exit(1)


# --- plot / report / exp1-3: figures and findings from a results folder ----------------------------------


def _expand_space_lists(command: Any, args: list[str]) -> list[str]:
    """Let each multiple-value option of ``command`` take every value after one flag, as the seed's
    ``--concurrency 1 2 4 8`` does: rewritten to ``--concurrency 1 --concurrency 2 …`` for click, which also
    keeps repeated flags working. Commas split values too (``--concurrency 1,2,4``)."""
    import re

    names = {o for p in command.params if getattr(p, "multiple", False) for o in getattr(p, "opts", [])}
    out: list[str] = []
    flag: str | None = None  # the list option whose values are being read
    given = 0  # values seen for it
    for tok in [*args, None]:
        if flag is not None and tok is not None and (not tok.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", tok)):
            out += [x for value in tok.split(",") if value for x in (flag, value)]
            given += 1
            continue
        if flag is not None and not given:
            out.append(flag)  # a list flag without a value: click reports it
        flag, given = None, 0
        if tok is None:
            break
        name, eq, value = tok.partition("=")
        if name in names and tok != "--":
            flag = name
            if eq:
                out += [x for v in value.split(",") if v for x in (flag, v)]
                given = 1
            continue
        out.append(tok)
    return out


class _SpaceListCommand(typer.core.TyperCommand):
    """A command whose multiple-value options take space-separated values after one flag."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _expand_space_lists(self, list(args)))


ResultsDirArg = Annotated[str, typer.Argument(help="a results folder (cells.jsonl from kvray run / exp / bench)")]


def _print_figures(results: list[Any]) -> None:
    console = _console()
    for r in results:
        what = "empty — " + "; ".join(r.notes[:1]) if r.empty else f"{len(r.series)} series"
        if r.oom_markers:
            what += f", {r.oom_markers} OOM cell(s) marked"
        console.print(f"  {r.name}: {what}", highlight=False)
    if results:
        console.print(f"wrote {len(results)} figures (PNG 300 dpi + SVG) to {results[0].paths[0].parent}")


@app.command()
def plot(
    results_dir: ResultsDirArg,
    out: Annotated[str | None, typer.Option("--out", help="figures folder (default RESULTS_DIR/figures)")] = None,
) -> None:
    """Regenerate every figure from a results folder alone (no Ray, no torch): fig1 … fig7, PNG + SVG."""
    from kvray.figures.plots import make_figures
    from kvray.figures.server import server_figures_if_any

    _print_figures(make_figures(results_dir, out) + server_figures_if_any(results_dir, out))


@app.command()
def report(
    results_dir: ResultsDirArg,
    no_figures: Annotated[
        bool, typer.Option("--no-figures", help="embed the figures already on disk instead of redrawing")
    ] = False,
) -> None:
    """Write report.md and a self-contained report.html: environment, a table per experiment, findings."""
    from kvray.report import make_report

    paths = make_report(results_dir, figures=not no_figures)
    _print_figures(paths.figures)
    _print_findings(paths.findings)
    _console().print(f"wrote {paths.markdown} and {paths.html}")


def _print_findings(findings: list[Any]) -> None:
    console = _console()
    for f in findings:
        console.print(f"  • {f.text}", highlight=False, soft_wrap=True)


def _make_all_after_run(output_dir: Any) -> None:
    """Figures and report at the end of a run; a failure here never loses the run's data."""
    try:
        from kvray.report import make_all

        paths = make_all(output_dir)
    except Exception as exc:  # the dataset is written: say what failed and how to retry
        sys.stderr.write(f"kvray: warning: figures/report failed ({type(exc).__name__}: {exc}); "
                         f"retry with `kvray report {output_dir}`\n")  # fmt: skip
        return
    _print_findings(paths.findings)
    _console().print(f"figures in {paths.markdown.parent / 'figures'}; report {paths.markdown} and {paths.html}",
                     soft_wrap=True)  # fmt: skip


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="HF id, bundled id or local directory")]
GenOpt = Annotated[int, typer.Option("--gen-toks", help="generated tokens per request")]
BackendsOpt = Annotated[
    list[str] | None, typer.Option("--backend", help="backend(s), space-separated: hf | sim | synthetic … (default hf)")
]
HardwareOpt = Annotated[
    list[str] | None,
    typer.Option("--hardware", help="any (default) | each (every GPU type in the cluster) | GPU types: H100 A100"),
]
WeightsOpt = Annotated[str, typer.Option("--weights", help="random (no download) | pretrained")]
KvDtypeOpt = Annotated[str | None, typer.Option("--kv-dtype", help="KV dtype if not --dtype")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="measured runs per cell")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="unmeasured runs per cell first")]
OptionOpt = Annotated[list[str] | None, typer.Option("--option", help="backend option KEY=VALUE (repeatable)")]
OutputDirOpt = Annotated[
    str | None, typer.Option("--output-dir", "--output", help="results folder (default results/<exp>-<model>)")
]
AddressOpt = Annotated[
    str,
    typer.Option(
        "--address", help="Ray: local (default) | auto | ray://host:port | http://HOST:8265 (Jobs API, remote)"
    ),
]
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", help="Ray cluster-launcher file: run there (kvray launch), fetch the data")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the cells and their predicted memory; run nothing")]
NoPlotsOpt = Annotated[bool, typer.Option("--no-plots", help="skip the figures and report at the end")]
NoCheckOomOpt = Annotated[bool, typer.Option("--no-check-oom", help="run cells even when OOM risk is high")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log what each stage does")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="live progress table")]


def _common(model: str, backend: list[str] | None, dtype: str, kv_dtype: str | None, weights: str, device: str,
            hardware: list[str] | None, warmup: int, repeats: int, option: list[str] | None) -> Any:  # fmt: skip
    from kvray.plan.experiments import Common, hardware_arg

    backends = [b for item in (backend or ["hf"]) for b in item.split(",") if b]
    return Common(model=model, backends=backends, dtype=dtype, kv_dtype=kv_dtype, weights=weights, device=device,
                  hardware=hardware_arg(hardware), warmup=warmup, repeats=repeats,
                  options=dict(_parse_options(option or [])))  # fmt: skip


def _run_experiment(job: Any, notes: list[str], output_dir: str | None, address: str, cluster: str | None,
                    dry_run: bool, as_json: bool, no_plots: bool, no_check_oom: bool, verbose: bool,
                    progress: bool) -> None:  # fmt: skip
    """Dry run: the cells and their predicted memory. Otherwise: the job on Ray, then figures and report."""
    from pathlib import Path

    for note in notes:
        sys.stderr.write(f"kvray: note: {note}\n")
    if dry_run:
        from kvray.plan.experiments import dry_run_rows

        rows = dry_run_rows(job)
        if as_json:
            _print_json({"job": job.name, "cells": rows})
            return
        from rich.table import Table

        table = Table(title=f"{job.name}: {len(rows)} cells (dry run — predicted memory, nothing runs)")
        for col in ("cell", "backend", "hardware", "c", "prompt", "gen", "weights GiB", "KV GiB", "act GiB",
                    "total GiB", "of GiB", "risk"):  # fmt: skip
            table.add_column(col, justify="left" if col in ("cell", "backend", "hardware", "risk") else "right")
        colour = {"low": "green", "medium": "yellow", "high": "red"}
        for r in rows:
            table.add_row(r["cell_id"], r["backend"], r["hardware"] if r["hardware"] != "any" else r["device"],
                          str(r["concurrency"]), str(r["prompt_toks"]), str(r["gen_toks"]), f"{r['weights_gb']:.2f}",
                          f"{r['kv_gb']:.3f}", f"{r['activation_gb']:.3f}", f"{r['total_estimated_gb']:.2f}",
                          f"{r['available_gb']:.1f}", f"[{colour[r['risk_level']]}]{r['risk_level']}[/]")  # fmt: skip
        console = _console()
        if not console.is_terminal:
            console.width = max(console.width, 130)
        console.print(table)
        console.print("high risk cells are refused at run time unless --no-check-oom (the pre-flight check)")
        return
    import logging

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from kvray.sweep.driver import default_output_dir, run_job, status_counts

    if cluster or address.startswith(("http://", "https://")):  # remote: through the Jobs API, data fetched
        import tempfile

        from kvray.plan.experiments import write_job_file
        from kvray.sweep.launch import launch

        out = Path(output_dir) if output_dir else default_output_dir(job)
        extra = ["--no-check-oom"] if no_check_oom else []  # launch adds --no-plots itself
        with tempfile.TemporaryDirectory(prefix="kvray-exp-") as tmp:
            status, _ = launch(str(write_job_file(job, tmp)), str(out), address=None if cluster else address,
                               cluster=cluster, extra_args=extra, log=sys.stdout.write)  # fmt: skip
        _console().print(f"remote job {status} → {out}")
    else:
        out = run_job(job, Path(output_dir) if output_dir else None, address=address, check_oom=not no_check_oom,
                      progress=progress)  # fmt: skip
    counts = {k: v for k, v in status_counts(out, job).items() if v}
    _console().print(f"{job.name}: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no cells'} → {out}")
    if not no_plots:
        _make_all_after_run(out)


@app.command(cls=_SpaceListCommand)
def exp1(
    model: ModelOpt = "facebook/opt-1.3b",
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="prompt tokens per request")] = 512,
    gen_toks: GenOpt = 64,
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 2 4 8 (default)")
    ] = None,
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    weights: WeightsOpt = "random",
    backend: BackendsOpt = None,
    hardware: HardwareOpt = None,
    device: DeviceOpt = "auto",
    warmup: WarmupOpt = 1,
    repeats: RepeatsOpt = 3,
    option: OptionOpt = None,
    output_dir: OutputDirOpt = None,
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    no_plots: NoPlotsOpt = False,
    no_check_oom: NoCheckOomOpt = False,
    verbose: VerboseOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Exp1, concurrency sweep: peak memory, KV and throughput as concurrent requests grow (fig1, fig2)."""
    from kvray.plan.experiments import exp1_job

    common = _common(model, backend, dtype, kv_dtype, weights, device, hardware, warmup, repeats, option)
    job = exp1_job(common, prompt_toks, gen_toks, concurrency)
    _run_experiment(job, [], output_dir, address, cluster, dry_run, as_json, no_plots, no_check_oom, verbose, progress)


@app.command(cls=_SpaceListCommand)
def exp2(
    model: ModelOpt = "facebook/opt-1.3b",
    seqlens: Annotated[
        list[int] | None, typer.Option("--seqlens", help="prompt lengths: 128 512 1024 2048 4096 (default)")
    ] = None,
    gen_toks: GenOpt = 64,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="requests per cell")] = 1,
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    weights: WeightsOpt = "random",
    backend: BackendsOpt = None,
    hardware: HardwareOpt = None,
    device: DeviceOpt = "auto",
    warmup: WarmupOpt = 1,
    repeats: RepeatsOpt = 3,
    option: OptionOpt = None,
    output_dir: OutputDirOpt = None,
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    no_plots: NoPlotsOpt = False,
    no_check_oom: NoCheckOomOpt = False,
    verbose: VerboseOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Exp2, sequence-length sweep: latency (log-log exponent) and memory as prompts grow (fig3, fig4)."""
    from kvray.plan.experiments import exp2_job

    common = _common(model, backend, dtype, kv_dtype, weights, device, hardware, warmup, repeats, option)
    job, notes = exp2_job(common, seqlens, gen_toks, concurrency)
    _run_experiment(
        job, notes, output_dir, address, cluster, dry_run, as_json, no_plots, no_check_oom, verbose, progress
    )


@app.command(cls=_SpaceListCommand)
def exp3(
    model: ModelOpt = "facebook/opt-1.3b",
    short: Annotated[int, typer.Option("--short", help="prompt tokens of the short requests")] = 128,
    long: Annotated[int, typer.Option("--long", help="prompt tokens of the long request(s)")] = 4096,
    gen_toks: GenOpt = 64,
    n_short: Annotated[int, typer.Option("--n-short", help="short requests per batch")] = 3,
    n_long: Annotated[int, typer.Option("--n-long", help="long requests in the mixed batch")] = 1,
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    weights: WeightsOpt = "random",
    backend: BackendsOpt = None,
    hardware: HardwareOpt = None,
    device: DeviceOpt = "auto",
    warmup: WarmupOpt = 1,
    repeats: RepeatsOpt = 3,
    option: OptionOpt = None,
    output_dir: OutputDirOpt = None,
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    no_plots: NoPlotsOpt = False,
    no_check_oom: NoCheckOomOpt = False,
    verbose: VerboseOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Exp3, mixed lengths: short requests alone vs batched with long ones — the tail-latency penalty (fig5)."""
    from kvray.plan.experiments import exp3_job

    common = _common(model, backend, dtype, kv_dtype, weights, device, hardware, warmup, repeats, option)
    job, notes = exp3_job(common, short, long, gen_toks, n_short, n_long)
    _run_experiment(
        job, notes, output_dir, address, cluster, dry_run, as_json, no_plots, no_check_oom, verbose, progress
    )


# --- exp4 and server flags: static vs paged KV, in-process vs servers (kvray/backends/{hf_paged,vllm,openai,ollama}.py)


def _check_server_options(cell: Any) -> None:
    """A server backend's URL, API-key variable and knobs, checked before anything starts (exit 2 if bad)."""
    if cell.backend == "openai":
        from kvray.backends.openai import HTTPSettings

        HTTPSettings.from_cell(cell)
    elif cell.backend == "ollama":
        from kvray.backends.ollama import OllamaSettings

        OllamaSettings.from_cell(cell)
    elif cell.backend == "vllm":
        from kvray.backends.vllm import vllm_launcher

        vllm_launcher(cell.option_dict)


@app.command(cls=_SpaceListCommand)
def exp4(
    model: ModelOpt = "facebook/opt-1.3b",
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="prompt tokens per request")] = 512,
    gen_toks: GenOpt = 64,
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 4 16 64 (default)")
    ] = None,
    backends: Annotated[
        list[str] | None,
        typer.Option("--backends", "--backend", help="hf hf-paged vllm (default) | openai | ollama"),
    ] = None,
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    weights: WeightsOpt = "random",
    hardware: HardwareOpt = None,
    device: DeviceOpt = "auto",
    warmup: WarmupOpt = 1,
    repeats: RepeatsOpt = 3,
    option: OptionOpt = None,
    vllm_python: VllmPythonOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    host: HostOpt = None,
    output_dir: OutputDirOpt = None,
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    no_plots: NoPlotsOpt = False,
    no_check_oom: NoCheckOomOpt = False,
    verbose: VerboseOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Exp4, static vs paged KV: the same workload on hf, hf-paged and vLLM (or servers) — fig8, fig9."""
    from kvray.plan.experiments import exp4_job

    chosen = [b for item in (backends or ["hf", "hf-paged", "vllm"]) for b in item.split(",") if b]
    if "openai" in chosen and not base_url and not any(o.startswith("base_url=") for o in option or []):
        raise KvrayInputError("--backends openai needs --base-url")
    if "ollama" in chosen and not host and not any(o.startswith("host=") for o in option or []):
        raise KvrayInputError("--backends ollama needs --host")
    options = [*(option or []), *server_options(vllm_python, base_url, api_key_env, host)]
    common = _common(model, chosen, dtype, kv_dtype, weights, device, hardware, warmup, repeats, options)
    job = exp4_job(common, prompt_toks, gen_toks, concurrency)
    _run_experiment(job, [], output_dir, address, cluster, dry_run, as_json, no_plots, no_check_oom, verbose, progress)


# --- predict / calibrate (the simulator) ---------------------------------------------------------------


def _gpu_names(text: str) -> list[str]:
    from kvray.hardware.gpus import GPUS, get_gpu

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KvrayInputError("--gpu needs at least one GPU name")
    if any(n.lower() == "all" for n in names):
        return list(GPUS)
    return [get_gpu(n).name for n in names]


@app.command(cls=_SpaceListCommand)
def predict(
    model: Annotated[str, typer.Argument(help="HF id, bundled id or local directory with config.json")],
    gpu: Annotated[str, typer.Option("--gpu", help="GPU name(s), comma-separated, or 'all'")] = "H100-SXM",
    concurrency: Annotated[
        list[int], typer.Option("--concurrency", "-c", help="concurrent requests: --concurrency 1 2 4 8")
    ] = [1],  # noqa: B006 - typer reads the default, never mutates it
    prompt_toks: Annotated[list[int], typer.Option("--prompt-toks", help="prompt tokens: 512 1024 …")] = [512],  # noqa: B006
    gen_toks: Annotated[list[int], typer.Option("--gen-toks", help="generated tokens per request")] = [64],  # noqa: B006
    dtype: DtypeOpt = "bf16",
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV dtype if not --dtype")] = None,
    layout: Annotated[str, typer.Option("--layout", help="hf (static, padded) | paged (vLLM blocks)")] = "hf",
    block_size: Annotated[int, typer.Option("--block-size", help="paged KV block size in tokens")] = 16,
    no_calibration: Annotated[bool, typer.Option("--no-calibration", help="ignore calibrated η")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Predict TTFT, TPOT, E2E, tokens/s, peak memory and OOM for each cell on each GPU — no GPU needed."""
    from kvray.hardware.gpus import get_gpu
    from kvray.model.kvmath import LAYOUTS, normalize_dtype
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import Efficiency, efficiency_for, predict_cell

    if layout not in LAYOUTS:
        raise KvrayInputError(f"unknown --layout {layout!r} (known: {', '.join(LAYOUTS)})")
    for flag, values in (("--concurrency", concurrency), ("--prompt-toks", prompt_toks), ("--gen-toks", gen_toks)):
        if any(v <= 0 for v in values):
            raise KvrayInputError(f"{flag} values must be positive, got {' '.join(map(str, values))}")
    if block_size <= 0:
        raise KvrayInputError(f"--block-size must be positive, got {block_size}")
    dtype = normalize_dtype(dtype)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    gpus = _gpu_names(gpu)
    g = resolve_geometry(model)
    effs = {name: Efficiency() if no_calibration else efficiency_for(get_gpu(name), layout) for name in gpus}
    predictions = [
        predict_cell(g, name, c, p, n, dtype, kv_dtype, layout, block_size, effs[name])
        for name in gpus
        for p in prompt_toks
        for n in gen_toks
        for c in concurrency
    ]
    if as_json:
        _print_json(
            {
                "model": g.name,
                "efficiency": {name: eff.describe() for name, eff in effs.items()},
                "predictions": [p.to_dict() for p in predictions],
            }
        )
        return
    from rich.table import Table

    def ms(seconds: float) -> str:
        value = seconds * 1e3
        if value != value:  # NaN: TPOT of a single generated token
            return "-"
        return f"{value:.2f}" if value < 10 else f"{value:,.1f}" if value < 1e3 else f"{value:,.0f}"

    from rich import box

    title = f"Predicted: {g.name}, {dtype} (KV {kv_dtype}, {layout} layout)"
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("GPU", "c", "prompt", "gen", "TTFT", "TPOT", "E2E", "tok/s", "GiB", "fits", "bound"):
        table.add_column(col, justify="left" if col in ("GPU", "fits", "bound") else "right")
    roof = {"compute": "C", "memory": "M", "overhead": "O", "": "-"}
    for p in predictions:
        table.add_row(
            p.gpu,
            str(p.concurrency),
            str(p.prompt_toks),
            str(p.gen_toks),
            ms(p.ttft_s),
            ms(p.tpot_s),
            f"{p.e2e_s:.3g}",
            f"{p.output_tps:,.0f}",
            f"{p.total_bytes / 2**30:.1f}",
            "yes" if p.fits else "[red]OOM[/]",
            f"{roof[p.prefill_bound]}/{roof[p.decode_bound]}",
        )
    console = _console()
    if not console.is_terminal:  # a file or pipe: room for every column
        console.width = max(console.width, 120)
    console.print(table)
    for name, eff in effs.items():
        console.print(f"{name} ({get_gpu(name).memory_gib:g} GiB): {eff.describe()}")
    console.print("TTFT, TPOT in ms; E2E in s; GiB = predicted peak (weights + KV + activations + runtime)")
    console.print("bound = the roof limiting prefill/decode: C compute, M memory, O overhead (docs/simulator.md)")


@app.command(name="calibrate")
def calibrate_command(
    results_dir: Annotated[str, typer.Argument(help="a results folder with measured cells (cells.jsonl)")],
    out: Annotated[str | None, typer.Option("--out", help="calibration file (default $KVRAY_CALIBRATION)")] = None,
    include_simulated: Annotated[
        bool, typer.Option("--include-simulated", help="also fit rows from the sim backend")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit η_compute, η_memory (and a per-layer overhead) per GPU from measured cells; predictions use them."""
    from kvray.analysis.calibrate import calibrate as fit

    fits, path = fit(results_dir, out=out, include_simulated=include_simulated)
    if as_json:
        _print_json({"path": str(path), "fits": [f.to_entry(results_dir) for f in fits]})
        return
    from rich.table import Table

    def err(d: dict[str, float], kind: str) -> str:
        return f"{d[kind]:.1%}" if kind in d else "—"

    from rich import box

    table = Table(title=f"Calibration from {results_dir}", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for col in ("GPU", "layout", "rows", "η_compute", "η_memory", "µs/layer", "TTFT err", "TPOT err"):
        table.add_column(col, justify="left" if col in ("GPU", "layout") else "right")
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
    console = _console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)
    console.print("µs/layer: fixed cost per layer per forward pass; err: median |relative error|, default η → fitted")
    console.print(f"saved to {path}")


# --- run: a sweep of cells on Ray ----------------------------------------------------------------------


@app.command()
def run(
    job_file: Annotated[str, typer.Argument(help="job file, e.g. jobs/quickstart.yaml")],
    address: Annotated[
        str, typer.Option("--address", help="local (start Ray here) | auto (join this machine's) | ray://host:port")
    ] = "local",
    output: Annotated[str | None, typer.Option("--output", help="results folder (default results/<job name>)")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume", help="skip cells already in the folder (default); --no-resume refuses it"),
    ] = True,
    dashboard: Annotated[bool, typer.Option("--dashboard", help="start Ray's dashboard on 127.0.0.1")] = False,
    check_oom: Annotated[
        bool, typer.Option("--check-oom/--no-check-oom", help="refuse cells predicted not to fit (default)")
    ] = True,
    no_plots: NoPlotsOpt = False,
) -> int:
    """Run JOB_FILE's sweep on Ray: a worker per GPU (or CPU) holding its model, rows streaming into one dataset."""
    from kvray.plan.job import load_job

    job = load_job(job_file)
    from kvray.sweep.driver import SweepError, last_run, run_job, status_counts

    try:
        out = run_job(job, output, address=address, resume=resume, check_oom=check_oom, dashboard=dashboard)
    except SweepError as exc:
        sys.stderr.write(f"kvray: sweep stopped: {exc}\n")
        return 1
    from rich.table import Table

    from kvray.data.store import read_results

    counts = status_counts(out, job)
    record = last_run(out)
    table = Table(title=f"{job.name}: {sum(counts.values())} cells")
    table.add_column("status")
    table.add_column("cells", justify="right")
    colours = {"ok": "green", "oom": "yellow", "skipped_after_oom": "yellow", "refused": "yellow", "error": "red"}
    for status, n in counts.items():
        table.add_row(f"[{colours.get(status, 'white')}]{status}[/]", str(n))
    console = _console()
    console.print(table)
    console.print(
        f"{record.get('cells_to_run', 0)} run now, {record.get('cells_already_done', 0)} already done, "
        f"{record.get('wall_s', 0.0):.1f} s → {out}"
    )
    failed = [r for r in read_results(out) if r["status"] in ("error", "oom")][:5]
    for r in failed:
        console.print(f"  {r['status']} {r['cell_id']}: {r.get('reason') or ''}", markup=False)
    if not no_plots:
        _make_all_after_run(out)
    return 1 if counts.get("error") else 0


@app.command()
def launch(
    job: Annotated[str, typer.Option("--job", help="job file to run on the cluster")],
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Ray cluster-launcher file: brought up (idempotent) first")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="dashboard URL of an existing cluster, http://HOST:8265")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="local results folder (default results/<job name>)")
    ] = None,
    down: Annotated[bool, typer.Option("--down", help="tear the --cluster down afterwards")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="give up (and stop the job) after this long")
    ] = 3600.0,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip figures and report at the end")] = False,
) -> int:
    """Run JOB on a Ray cluster through the Jobs API and bring its dataset back here."""
    from kvray.plan.job import load_job
    from kvray.sweep.launch import launch as launch_job

    name = load_job(job).name
    out = output or f"results/{name}"
    status, files = launch_job(
        job, out, address=address, cluster=cluster, down=down, timeout_s=timeout_s,
        log=lambda text: sys.stdout.write(text),
    )  # fmt: skip
    _console().print(f"job {status}: {len(files)} files in {out}")
    if not no_plots:
        _make_all_after_run(out)
    return 0 if status.endswith("SUCCEEDED") else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        from typer._click import exceptions as click_exceptions  # typer >= 0.20 vendors click
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef]

    try:
        result = app(args=argv, prog_name="kvray", standalone_mode=False)
    except KvrayInputError as exc:
        sys.stderr.write(f"kvray: error: {exc}\n")
        sys.exit(2)
    except click_exceptions.UsageError as exc:
        sys.stderr.write(f"kvray: error: {exc.format_message()}\n")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("kvray: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:  # `kvray info … | head`
        sys.exit(0)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
