"""``kvray route``: N vLLM replicas behind kvray's router, one shared-prefix load through each routing policy —
each policy's measured prefix-cache hit rate beside its prediction, and the TTFT it buys (kvray/capacity/replicas.py,
docs/capacity.md "Replicas behind a router")."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import (
    DtypeOpt,
    GenOpt,
    JsonOpt,
    ModelOpt,
    VllmPythonOpt,
    WeightsOpt,
    output_option,
    split_values,
)
from kvray.errors import KvrayInputError

ROUTE_JSON = "route.json"
ORDERS = ("grouped", "interleaved")
# each TTFT column's sample count beside it
COLUMNS: tuple[str, ...] = ("policy", "ok", "per replica", "hit rate", "predicted", "TTFT p50 ms", "p90", "n")
COLUMNS += ("hits p50", "n", "misses p50", "n")


def route(
    model: ModelOpt = "kvray/tiny-llama",
    replicas: Annotated[int, typer.Option("--replicas", help="vLLM replicas behind the router")] = 2,
    policies: Annotated[
        list[str] | None,
        typer.Option("--policies", help="routing policies: round_robin least_loaded prefix_affinity (default: all)"),
    ] = None,
    groups: Annotated[int, typer.Option("--groups", help="shared prefixes")] = 8,
    per_group: Annotated[int, typer.Option("--per-group", help="requests per shared prefix")] = 8,
    prefix_toks: Annotated[int, typer.Option("--prefix-toks", help="tokens of each group's shared prefix")] = 512,
    suffix_toks: Annotated[int, typer.Option("--suffix-toks", help="tokens of each request's own after it")] = 64,
    gen_toks: GenOpt = 8,
    order: Annotated[
        str,
        typer.Option("--order", help="grouped: a prefix's requests one after another (default) | interleaved"),
    ] = "grouped",
    block_size: Annotated[int, typer.Option("--block-size", help="vLLM's KV block size in tokens")] = 32,
    dtype: DtypeOpt = "fp32",
    weights: WeightsOpt = "random",
    vllm_python: VllmPythonOpt = None,
    vllm_args: Annotated[
        str, typer.Option("--vllm-args", help="further vLLM flags for every replica (default -O0: eager, fast start)")
    ] = "-O0",
    cpu_binds: Annotated[
        str | None,
        typer.Option("--cpu-binds", help="each replica's CPUs, '|'-separated: 0-3|4-7 (default: this host's, split)"),
    ] = None,
    prefix_chars: Annotated[
        int, typer.Option("--prefix-chars", help="prefix_affinity hashes the prompt's first N characters")
    ] = 200,
    output: Annotated[str | None, output_option(f"folder for {ROUTE_JSON}, written after each policy")] = None,
    as_json: JsonOpt = False,
) -> None:
    """N vLLM replicas behind kvray's router: each policy's measured prefix-cache hit rate against its prediction,
    and the TTFT difference, on one shared-prefix load (sent one request at a time)."""
    from kvray.capacity.replicas import check_policies, measure_routing
    from kvray.model.resolve import resolve_geometry
    from kvray.plan.reuse import shared_prefix_workload
    from kvray.runner.routed import ReplicaSettings
    from kvray.servers.process import ServerStartError
    from kvray.servers.router import POLICIES

    if replicas < 1:
        raise KvrayInputError(f"--replicas must be at least 1, got {replicas}")
    chosen = split_values(policies) or list(POLICIES)
    try:
        check_policies(chosen)
    except KvrayInputError as exc:
        raise KvrayInputError(f"--policies: {exc}") from None
    if order not in ORDERS:
        raise KvrayInputError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if block_size < 1:
        raise KvrayInputError(f"--block-size must be positive, got {block_size}")
    if prefix_chars < 1:
        raise KvrayInputError(f"--prefix-chars must be positive, got {prefix_chars}")
    for flag, value in (("--groups", groups), ("--per-group", per_group)):
        if value < 1:
            raise KvrayInputError(f"{flag} must be a positive integer, got {value}")
    workload = shared_prefix_workload(
        groups * per_group,
        groups,
        prefix_toks,
        suffix_toks,
        gen_toks,
        grouped=order == "grouped",
        one_at_a_time=True,
    )
    binds = tuple(b.strip() for b in cpu_binds.split("|")) if cpu_binds else ()
    if binds and (len(binds) != replicas or not all(binds)):
        raise KvrayInputError(
            f"--cpu-binds: {replicas} replicas need {replicas} '|'-separated CPU lists, got {cpu_binds!r}"
        )
    settings = ReplicaSettings(
        model,
        replicas,
        dtype=dtype,
        weights=weights,
        block_size=block_size,
        vllm_python=vllm_python,
        extra_args=vllm_args or None,
        cpu_binds=binds,
    )
    settings.check()
    resolve_geometry(model)  # a model kvray cannot read is one line here, not a server's traceback later
    out_dir = Path(output).expanduser() if output is not None else None
    if out_dir is not None:
        from kvray.data.location import check_writable_folder

        check_writable_folder(out_dir, f"--output {output}")

    def write(record: dict[str, Any]) -> None:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{ROUTE_JSON}.tmp"
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, out_dir / ROUTE_JSON)

    def log(line: str) -> None:
        sys.stderr.write(f"kvray route: {line}\n")
        sys.stderr.flush()

    try:
        record = measure_routing(
            settings, workload.requests, chosen, prefix_chars=prefix_chars, log=log, on_policy=write
        )
    except ServerStartError as exc:  # not the user's input: vLLM's own reason, from its log, and exit 1
        sys.stderr.write(f"kvray route: a vLLM replica did not start: {exc}\n")
        raise typer.Exit(1) from None
    if as_json:
        render.print_json(record)
    else:
        show(record)
    if out_dir is not None and not as_json:
        render.line(f"wrote {out_dir / ROUTE_JSON}", soft_wrap=True)
    if "stopped" in record:
        sys.stderr.write(f"kvray route: stopped {record['stopped']}\n")
        raise typer.Exit(1)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def show(record: dict[str, Any]) -> None:
    """The per-policy table, then the TTFT difference against the baseline."""
    w = record["workload"]
    out = render.console(min_width_when_piped=150)
    title = (
        f"{record['replicas']} vLLM replicas of {record['model']} behind kvray's router: {w['groups']} prefixes, "
        f"{w['requests']} requests one at a time, blocks of {record['block_size']}"
    )
    table = render.simple_table(
        title,
        COLUMNS,
        ["policy", "per replica"],
    )
    for policy, r in record["policies"].items():
        if "error" in r:
            table.add_row(policy, f"error: {r['error']}")
            continue
        table.add_row(
            policy,
            f"{r['requests_ok']}/{r['requests_sent']}",
            " / ".join(map(str, r["forwarded_per_replica"])),
            _rate(r["hit_rate_measured"]),
            _rate(r["hit_rate_predicted"]),
            _ms(r["ttft_ms_p50"]),
            _ms(r["ttft_ms_p90"]),
            str(r["n_ttft"]),
            _ms(r["ttft_ms_p50_expected_hits"]),
            str(r["n_expected_hits"]),
            _ms(r["ttft_ms_p50_expected_misses"]),
            str(r["n_expected_misses"]),
        )
    out.print(table)
    out.print(
        "hit rate: growth of each replica's vllm:prefix_cache_hits / _queries (its /metrics), summed; "
        "TTFT: client clock through the router; hits/misses: the requests the prediction says should hit or miss",
        soft_wrap=True,
    )
    base = record.get("ttft_baseline")
    for policy, diff in record.get("ttft_p50_difference_ms", {}).items():
        if policy != base and diff is not None:
            ref = record["policies"][base]["ttft_ms_p50"]
            out.print(
                f"TTFT p50 {policy} − {base}: {diff:+.1f} ms ({diff / ref:+.0%} of {base}'s {ref:.1f} ms)",
                soft_wrap=True,
            )
