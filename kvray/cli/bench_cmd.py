"""``kvray bench``: one cell measured in this process, no Ray — the GPU-box path (kvray/bench/cell.py) — unless
``--clients K`` > 1 sends a server backend's load from K Ray actors: then a local Ray is started for the run (or
the one this process already joined is used)."""

from __future__ import annotations

from typing import Annotated

import typer

from kvray.cli import render
from kvray.cli.options import (
    DeviceOpt,
    DtypeOpt,
    GenDistOpt,
    GenOpt,
    JsonOpt,
    LoadFlags,
    ModelOpt,
    NoCheckOomOpt,
    OptionOpt,
    PromptDistOpt,
    PromptToksOpt,
    RepeatsOpt,
    ServerFlags,
    SloOpt,
    TpOpt,
    TraceFlags,
    WarmupOpt,
    WeightsOpt,
    comma_ints,
    flag_groups,
    parse_option_pairs,
)
from kvray.errors import KvrayInputError


@flag_groups
def bench(
    model: ModelOpt = "facebook/opt-1.3b",
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", help="requests in flight at once (a closed loop: its users)")
    ] = 1,
    mixed: Annotated[str | None, typer.Option("--mixed", help="mixed prompt lengths, e.g. 128,128,4096")] = None,
    arrival_gap_s: Annotated[float, typer.Option("--arrival-gap-s", help="seconds between arrivals")] = 0.0,
    serving: LoadFlags = LoadFlags(),
    slo: SloOpt = None,
    prompt_dist: PromptDistOpt = None,
    gen_dist: GenDistOpt = None,
    traces: TraceFlags = TraceFlags(),
    dtype: DtypeOpt = "bf16",
    weights: WeightsOpt = "random",
    device: DeviceOpt = "auto",
    tp: TpOpt = 1,
    clients: Annotated[
        int, typer.Option("--clients", help="server backends: send the load from K Ray actors (default 1: this one)")
    ] = 1,
    backend: Annotated[
        str, typer.Option("--backend", help="hf | hf-paged | vllm | openai | ollama | synthetic | sim")
    ] = "hf",
    warmup: WarmupOpt = 1,
    repeats: RepeatsOpt = 3,
    option: OptionOpt = None,
    servers: ServerFlags = ServerFlags(),
    no_check_oom: NoCheckOomOpt = False,
    output: Annotated[str, typer.Option("--output", help="results folder")] = "results",
    replace: Annotated[
        bool, typer.Option("--replace", help="measure a cell the folder already has again, replacing its row")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure one cell in-process (no Ray unless --clients > 1): latency, throughput, memory and KV; writes the
    dataset."""
    from kvray.bench.cell import bench_cell, check_output, measure_and_record
    from kvray.plan.loads import parse_dist, parse_slo

    load, concurrency = serving.load_and_concurrency(concurrency)
    options = parse_option_pairs([*(option or []), *servers.option_pairs()])
    cell = bench_cell(
        model,
        prompt_toks=prompt_toks,
        gen_toks=gen_toks,
        concurrency=concurrency,
        mixed=comma_ints("--mixed", mixed) if mixed else None,
        arrival_gap_s=arrival_gap_s,
        dtype=dtype,
        weights=weights,
        device=device,
        backend=backend,
        warmup=warmup,
        repeats=repeats,
        options=options,
        load=load,
        slo=parse_slo(slo, "--slo") if slo else None,
        prompt_dist=parse_dist(prompt_dist, "--prompt-dist") if prompt_dist else None,
        gen_dist=parse_dist(gen_dist, "--gen-dist") if gen_dist else None,
        tensor_parallel=tp,
        clients=clients,
        trace=traces.replay_options(),
    )
    check_output(cell, output, replace)  # before the model loads
    started = join_ray(clients) if clients > 1 else False
    try:
        record = measure_and_record(cell, output, check_oom=not no_check_oom, replace=replace)
    finally:
        if started:
            from kvray.sweep.ray_env import shutdown

            shutdown()
    if as_json:
        render.print_json(render.bench_json(record))
    else:
        render.bench_result(record)
    if record.result.status != "ok":
        raise typer.Exit(1)


def join_ray(clients: int) -> bool:
    """Ray for ``--clients``: the cluster this process joined, else a local one started now (True: started here,
    to be shut down after the run); one line when Ray is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a finder that refuses it: as good as absent
        found = False
    if not found:
        raise KvrayInputError(f"--clients {clients} sends the load from Ray actors, but Ray is not installed here")
    from kvray.sweep.ray_env import connect

    return connect("local")
