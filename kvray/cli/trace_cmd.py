"""``kvray trace FILE``: describe a trace without running it — requests, sessions, rates, lengths and its KV footprint
(prefix hit rate, LRU hit rate per pool size, working set over time, the pool where hits halve). docs/traces.md."""

from __future__ import annotations

from typing import Annotated

import typer

from kvray.cli.options import JsonOpt, LimitOpt, ModelNamedOpt, SpeedupOpt
from kvray.errors import KvrayInputError


def trace(
    path: Annotated[
        str, typer.Argument(help="trace file: Mooncake JSONL, Azure CSV, BurstGPT CSV, kvray traces.jsonl")
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", help="mooncake | azure | burstgpt | kvray | conversations (default: from the content)"
        ),
    ] = None,
    model: ModelNamedOpt = None,
    block_tokens: Annotated[
        int | None, typer.Option("--block-tokens", help="cache block size in tokens (default: the trace's, else 16)")
    ] = None,
    pool_blocks: Annotated[
        str | None, typer.Option("--pool-blocks", help="LRU pool sizes in blocks, e.g. 16,64,256")
    ] = None,
    speedup: SpeedupOpt = None,
    limit: LimitOpt = None,
    start_s: Annotated[float | None, typer.Option("--start-s", help="window start (trace seconds)")] = None,
    duration_s: Annotated[float | None, typer.Option("--duration-s", help="window length (seconds)")] = None,
    no_steady: Annotated[bool, typer.Option("--no-steady", help="keep a ramp (no automatic steady window)")] = False,
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="KV dtype for bytes (with --model)")] = "bf16",
    as_json: JsonOpt = False,
) -> None:
    """Describe a trace without running it: rates, lengths and its KV footprint (prefix hits, LRU pools)."""
    from kvray.cli.options import comma_ints
    from kvray.cli.render import print_json
    from kvray.plan.replay import check_trace_key
    from kvray.plan.trace_summary import describe_trace

    raw = {
        "path": path,
        "format": fmt,
        "speedup": speedup,
        "limit": limit,
        "start_s": start_s,
        "duration_s": duration_s,
    }
    opts = check_trace_key({k: v for k, v in raw.items() if v is not None} | ({"steady": False} if no_steady else {}))
    try:
        pools = comma_ints("--pool-blocks", pool_blocks) if pool_blocks else []
    except KvrayInputError:
        raise KvrayInputError(
            f"--pool-blocks expects comma-separated block counts, e.g. 16,64,256; got {pool_blocks!r}"
        ) from None
    summary = describe_trace(opts, block_toks=block_tokens, pool_blocks=pools, model=model, kv_dtype=kv_dtype)
    if as_json:
        print_json(summary)
        return
    typer.echo(_text(summary))


def _text(s: dict) -> str:
    p, o = s["prompt_toks"], s["output_toks"]
    lines = [
        f"{s['path']} ({s['format']}): {s['requests']} requests, {s['sessions']} sessions over {s['duration_s']:.1f} s",
        f"  rate: mean {s['mean_rps'] or 0:.3g} req/s, peak {s['peak_rps']:.3g} req/s (1 s window)",
        f"  prompt tokens: mean {p['mean']:.0f}, p50 {p['p50']:.0f}, p90 {p['p90']:.0f}, p99 {p['p99']:.0f}, max {p['max']:.0f}",
        f"  output tokens: mean {o['mean']:.0f}, p50 {o['p50']:.0f}, p90 {o['p90']:.0f}, p99 {o['p99']:.0f}, max {o['max']:.0f}",
        f"  KV blocks of {s['block_toks']} tokens: {s['prompt_blocks']} prompt blocks, {s['unique_blocks']} distinct",
        f"  prefix hit rate (unbounded cache): {100 * s['prefix_hit_rate']:.1f} %",
    ]
    for entry in s["pool_hit_rates"]:
        size = f" ({entry['pool_bytes'] / 2**30:.2f} GiB)" if "pool_bytes" in entry else ""
        lines.append(f"  LRU pool of {entry['pool_blocks']} blocks{size}: hit rate {100 * entry['hit_rate']:.1f} %")
    if s["half_hit_pool_blocks"] is not None:
        lines.append(f"  hits fall to half the unbounded rate below a pool of {s['half_hit_pool_blocks']} blocks")
    peak = max(s["working_set"], key=lambda w: w["blocks"])
    lines.append(
        f"  working set: at most {peak['blocks']} distinct blocks in a {len(s['working_set'])}th of the trace "
        f"(from {peak['t_s']:.1f} s)"
    )
    lines += [f"  note: {n}" for n in s["notes"]]
    return "\n".join(lines)
