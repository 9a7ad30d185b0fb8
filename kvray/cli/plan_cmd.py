"""``kvray plan``: the cheapest deployment (GPU type × TP × replicas × KV choices) that serves a traffic within its
SLOs, from the serving simulator and a price table — no GPU, no Ray (kvray/capacity/, docs/capacity.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import (
    DtypeOpt,
    GenDistOpt,
    GenOpt,
    JsonOpt,
    ModelOpt,
    PromptDistOpt,
    PromptToksOpt,
    SeedOpt,
    SloOpt,
    TraceFlags,
    flag_groups,
    output_option,
    split_values,
)
from kvray.errors import KvrayInputError

if TYPE_CHECKING:
    from kvray.capacity.planner import Plan

PLAN_JSON = "plan.json"


@flag_groups
def plan(
    model: ModelOpt = "meta-llama/Meta-Llama-3-8B",
    rate: Annotated[float | None, typer.Option("--rate", help="requests/s the deployment must serve")] = None,
    traces: TraceFlags = TraceFlags(),
    prompt_dist: PromptDistOpt = None,
    gen_dist: GenDistOpt = None,
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 128,
    prefix_toks: Annotated[
        int, typer.Option("--prefix-toks", help="shared prefix tokens per group (with --groups)")
    ] = 0,
    groups: Annotated[int, typer.Option("--groups", help="shared-prefix groups, one drawn per request (seeded)")] = 0,
    slo: SloOpt = None,
    percentile: Annotated[float, typer.Option("--percentile", help="the SLOs hold at this percentile")] = 99,
    gpus: Annotated[
        list[str] | None, typer.Option("--gpus", help="GPU types: H100-SXM A100-80GB-SXM L4 (default) | all")
    ] = None,
    tp: Annotated[list[int] | None, typer.Option("--tp", help="tensor parallel degrees (1 2 4 8)")] = None,
    kv_dtype: Annotated[list[str] | None, typer.Option("--kv-dtype", help="KV dtypes: bf16 fp8 (default bf16)")] = None,
    prefix_caching: Annotated[
        list[str] | None, typer.Option("--prefix-caching", help="on off (default: on with --groups/--trace, else off)")
    ] = None,
    router: Annotated[
        str,
        typer.Option("--router", help="replicas behind: prefix_affinity (default) | round_robin | least_loaded"),
    ] = "prefix_affinity",
    prices: Annotated[str | None, typer.Option("--prices", help="YAML: GPU type → $/GPU-hour (H100-SXM: 4.0)")] = None,
    calibration: Annotated[
        str | None, typer.Option("--calibration", help="calibration file from kvray calibrate (default: its own)")
    ] = None,
    dtype: DtypeOpt = "bf16",
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="search every candidate, even those whose ceiling costs more")
    ] = False,
    seed: SeedOpt = 0,
    host_memory_gib: Annotated[
        float, typer.Option("--host-memory-gib", help="host memory per GPU given to offloaded KV (CPU offload what-if)")
    ] = 256.0,
    host_link: Annotated[
        str, typer.Option("--host-link", help="the GPU's link to host memory: pcie (default) | nvlink-c2c (GH200)")
    ] = "pcie",
    measured: Annotated[
        str | None,
        typer.Option("--measured", help="a results folder whose measured cells join the Pareto figure (--output)"),
    ] = None,
    output: Annotated[str | None, output_option("folder for plan.json and the Pareto figures")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The cheapest GPU type × TP × replicas × KV choice that serves --rate within --slo, priced, and why the
    others lose — from the simulator, no GPU."""
    from kvray.capacity.planner import DEFAULT_GPUS, DEFAULT_TPS, plan_capacity
    from kvray.capacity.prices import load_prices
    from kvray.capacity.traffic import traffic_from_flags, traffic_from_trace
    from kvray.capacity.whatif import HostMemory
    from kvray.hardware.gpus import GPUS, get_gpu
    from kvray.model.kvmath import normalize_dtype
    from kvray.model.resolve import resolve_geometry
    from kvray.plan.loads import parse_dist, parse_slo
    from kvray.servers.router import POLICIES

    if router not in POLICIES:
        raise KvrayInputError(f"--router: unknown policy {router!r} (known: {', '.join(POLICIES)})")
    if not slo:
        raise KvrayInputError("--slo is required: thresholds like ttft_ms=500,tpot_ms=50")
    thresholds = parse_slo(slo, "--slo")
    host = HostMemory(host_memory_gib, host_link.lower())
    if rate is not None and not (rate > 0 and rate != float("inf")):
        raise KvrayInputError(f"--rate must be a positive number of requests/s, got {rate}")
    if not 0 < percentile <= 100:
        raise KvrayInputError(f"--percentile must be in (0, 100], got {percentile}")
    trace, speedup = traces.trace, traces.speedup
    if trace and (prompt_dist or gen_dist or groups or prefix_toks):
        raise KvrayInputError("--trace brings its own lengths and prefixes: drop --prompt-dist/--gen-dist/--groups")
    if not trace:
        traces.replay_options()  # None, or one line: the flags that cut a trace need --trace
    if speedup is not None and rate is not None:
        raise KvrayInputError("--speedup sets the rate planned for (the trace's mean rate × S): give it or --rate")
    gpu_names = split_values(gpus) or list(DEFAULT_GPUS)
    gpu_names = list(GPUS) if any(n.lower() == "all" for n in gpu_names) else [get_gpu(n).name for n in gpu_names]
    degrees = sorted(set(tp or DEFAULT_TPS))
    if any(d <= 0 for d in degrees):
        raise KvrayInputError(f"--tp values must be positive integers, got {' '.join(map(str, degrees))}")
    kv_dtypes = list(dict.fromkeys(normalize_dtype(k) for k in split_values(kv_dtype) or [dtype]))
    dtype = normalize_dtype(dtype)
    table = load_prices(prices)
    _check_calibration(calibration)
    if measured is not None and output is None:
        raise KvrayInputError("--measured draws into the Pareto figure: give --output DIR too")
    measured_records = _read_measured(measured) if measured is not None else []
    output_dir = _check_output(output)
    if trace:
        traffic = traffic_from_trace(trace, traces.trace_format, limit=traces.limit, speedup=speedup)
    else:
        prompt = parse_dist(prompt_dist, "--prompt-dist") if prompt_dist else prompt_toks
        gen = parse_dist(gen_dist, "--gen-dist") if gen_dist else gen_toks
        traffic = traffic_from_flags(prompt, gen, groups=groups, prefix_toks=prefix_toks, seed=seed)
    caching = _caching_flags(prefix_caching, traffic.has_prefixes)
    if rate is None:
        rate = traffic.trace_rate_rps
        if rate is None:
            raise KvrayInputError("--rate is required (requests/s), unless --trace gives one by its arrivals")
    g = resolve_geometry(model)
    result = plan_capacity(
        g,
        traffic,
        rate,
        thresholds,
        gpus=gpu_names,
        tps=degrees,
        kv_dtypes=kv_dtypes,
        prefix_caching=caching,
        prices=table,
        percentile=percentile,
        dtype=dtype,
        calibration=calibration,
        exhaustive=exhaustive,
        seed=seed,
        router=router,
        host=host,
    )
    written = _write(result, output_dir, measured_records, table) if output_dir is not None else []
    if as_json:
        render.print_json(result.to_dict())
    else:
        show(result)
    if output_dir is not None and not as_json:
        for note in written:
            render.line(f"note: {note}")
        render.line(f"wrote {output_dir / PLAN_JSON} and the Pareto figures in {output_dir / 'figures'}")


def _caching_flags(values: list[str] | None, has_prefixes: bool) -> list[bool]:
    words = split_values(values)
    if not words:
        return [True] if has_prefixes else [False]
    known = {"on": True, "off": False, "true": True, "false": False}
    bad = [w for w in words if w.lower() not in known]
    if bad:
        raise KvrayInputError(f"--prefix-caching takes on and/or off, got {' '.join(bad)}")
    return list(dict.fromkeys(known[w.lower()] for w in words))


def _check_output(output: str | None) -> Path | None:
    """``--output``'s folder, checked writable before anything is simulated."""
    if output is None:
        return None
    from kvray.data.location import check_writable_folder

    check_writable_folder(output, f"--output {output}")
    return Path(output)


def _check_calibration(path: str | None) -> None:
    """``--calibration FILE``: a calibration file ``kvray calibrate`` wrote, or one line and exit 2."""
    if path is None:
        return
    import json

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise KvrayInputError(f"--calibration {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError:
        raise KvrayInputError(f"--calibration {path}: not JSON (a file from kvray calibrate)") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise KvrayInputError(f"--calibration {path}: no 'entries' (a file from kvray calibrate)")


def _read_measured(folder: str) -> list[dict[str, Any]]:
    from kvray.cli.output_cmds import require_results

    return require_results(folder)


def _write(result: Plan, folder: Path, measured: list[dict[str, Any]], prices: Mapping[str, Any]) -> list[str]:
    """plan.json and figures/pareto_plan (its predicted probes and ``measured``'s cells of the plan's model);
    plan.json's ``pareto`` says what the figure drew. Returns notes for the terminal."""
    import json

    from kvray.capacity.pareto import points_from_plan, points_from_records
    from kvray.figures.pareto import plan_figures

    folder.mkdir(parents=True, exist_ok=True)
    data = result.to_dict(probes=True)
    mine = [r for r in measured if r["cell"].get("model") == result.model]
    extra = points_from_records(mine, prices)
    figures = plan_figures(data, folder / "figures", extra=extra)
    data["pareto"] = {
        "figures": [str(p.relative_to(folder)) for f in figures for p in f.paths],
        "series": [s for f in figures for s in f.series],
        "predicted_points": len(points_from_plan(data)),
        "measured_points": [p.to_dict() for p in extra],
    }
    (folder / PLAN_JSON).write_text(json.dumps(data, indent=2, default=str) + "\n")
    notes = []
    if measured and not extra:
        models = sorted({str(r["cell"].get("model")) for r in measured})
        notes.append(
            f"--measured: no ok cell of {result.model} with a TPOT and a throughput there (its models: "
            f"{', '.join(models)}); the figure shows predictions only"
        )
    return notes


def _money(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


def show(result: Plan) -> None:
    """The best deployment first, then every candidate with why it loses."""
    from rich.table import Table

    out = render.console(min_width_when_piped=160)
    slo = ", ".join(f"{k} {v:g}" for k, v in result.slo.items())
    out.print(
        f"[bold]Plan[/]: {result.model}, {result.rate_rps:g} req/s of {result.traffic}; SLO p{result.percentile:g} "
        f"{slo}"
    )
    best = result.best
    if best is not None:
        assert best.max_rps_per_replica is not None
        out.print(
            f"[bold green]Best[/]: {best.replicas} × {best.gpu} TP{best.tp} (KV {best.kv_dtype}"
            f"{', prefix caching' if best.prefix_caching else ''}) = {best.gpus} GPU{'s' if best.gpus != 1 else ''}, "
            f"{_money(best.cost_per_hour)}/h, "
            f"{_money(best.cost_per_mtok_output)} per M output tokens ({_money(best.cost_per_mtok_total)} per M total); "
            f"one replica serves {best.max_rps_per_replica:.3g} req/s within the SLO"
        )
    table = Table(title=f"{len(result.candidates)} candidates, {result.searched} searched in {result.elapsed_s:.1f} s")
    for col in ("GPU", "TP", "KV", "prefix $", "req/s/replica", "replicas", "$/h", "$/M out", "$/M total", "why not"):
        table.add_column(col, overflow="fold")
    for c in result.candidates:
        rps = "—" if c.max_rps_per_replica is None else f"{c.max_rps_per_replica:.3g}"
        table.add_row(
            c.gpu,
            str(c.tp),
            c.kv_dtype,
            "on" if c.prefix_caching else "off",
            rps,
            "—" if c.replicas is None else str(c.replicas),
            _money(c.cost_per_hour),
            _money(c.cost_per_mtok_output),
            _money(c.cost_per_mtok_total),
            "best" if c is best else c.reason,
        )
    out.print(table)
    what = result.what_ifs
    if "offload" in what:
        out.print(f"CPU offload: {what['offload']['verdict']}")
    if "disaggregation" in what:
        d = what["disaggregation"]
        out.print(
            f"Disaggregated prefill/decode: {d['verdict']}; each prompt's KV "
            f"({d['kv_transfer_bytes_per_request'] / 2**20:.1f} MiB) adds {d['ttft_added_s'] * 1e3:.2f} ms to TTFT over "
            f"{d['link']} (a mean prompt alone: {d['ttft_alone_ms']:.1f} ms, no queueing)"
        )
    if "routing_hit_rate_predicted" in what:
        r = what["routing_hit_rate_predicted"]
        rates = ", ".join(f"{k} {v:.1%}" for k, v in r.items() if k not in ("replicas", "requests"))
        out.print(f"Prefix-cache hit rate behind a router of {r['replicas']} replicas (predicted): {rates}")
    for note in result.notes:
        out.print(f"note: {note}")
