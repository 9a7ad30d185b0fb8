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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n:.2f}"


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="HF id, bundled id or local directory with config.json")],
    dtype: DtypeOpt = "bf16",
    as_json: JsonOpt = False,
) -> None:
    """Geometry, parameters, weight bytes and KV bytes per token of MODEL, and how much KV fits per GPU."""
    from kvray.gpus import GPUS
    from kvray.kvmath import dtype_bytes, kv_bytes_per_token, normalize_dtype
    from kvray.oom import RUNTIME_OVERHEAD_BYTES
    from kvray.resolve import resolve_geometry

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
        ("weights", _human_bytes(weights)),
        ("KV per token (hf)", _human_bytes(per_token)),
        ("KV per token (paged)", _human_bytes(per_token_paged)),
        ("KV per 1k tokens", _human_bytes(per_token * 1000)),
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
    from kvray.env import collect_environment, format_banner

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
    from kvray.oom import check_oom_risk

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
