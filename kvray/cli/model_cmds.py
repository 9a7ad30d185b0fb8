"""Commands that answer from arithmetic alone, nothing measured: info, env, check, predict, calibrate.

None of them needs torch, transformers or ray (tests check that ``info`` and ``predict`` never load them).
"""

from __future__ import annotations

from typing import Annotated

import typer

from kvray.cli import render
from kvray.cli.options import (
    DtypeOpt,
    JsonOpt,
    KvDtypeOpt,
    ModelNamedOpt,
    ModelPositional,
    TpOpt,
    one_model,
    output_option,
)
from kvray.errors import KvrayInputError


def info(
    model_arg: ModelPositional = None,
    model: ModelNamedOpt = None,
    dtype: DtypeOpt = "bf16",
    tp: TpOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Geometry, parameters, weight bytes and KV bytes per token of a model, and how much KV fits per GPU.

    ``--tp N``: weights and KV per GPU when the model is split over N GPUs (vLLM's tensor parallelism);
    the TP 1/2/4/8 table is always shown."""
    from kvray.model.kvmath import normalize_dtype
    from kvray.model.oom import model_summary
    from kvray.model.resolve import resolve_geometry

    name = one_model(model_arg, model)
    dtype = normalize_dtype(dtype)  # a bad dtype fails before the model is looked up
    _check_tp_flag([tp])
    g = resolve_geometry(name)
    summary = model_summary(g, dtype, tp)
    if as_json:
        render.print_json(summary)
    else:
        render.model_info(g, summary)


def env(as_json: JsonOpt = False) -> None:
    """Platform, Python, CUDA driver, GPUs (NVML, torch fallback) and library versions."""
    import sys

    from kvray.hardware.env import collect_environment, format_banner

    environment = collect_environment()
    if as_json:
        render.print_json(environment.to_dict())
    else:
        sys.stdout.write(format_banner(environment) + "\n")


def check(
    model_arg: ModelPositional = None,
    model: ModelNamedOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="concurrent sequences")] = 1,
    seq_len: Annotated[int, typer.Option("--seq-len", help="cached tokens per sequence (prompt + generated)")] = 2048,
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name (default: this machine's)")] = None,
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    tp: TpOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """OOM risk of CONCURRENCY sequences of SEQ_LEN tokens: weights + KV + activations vs memory (per GPU
    of a ``--tp`` group)."""
    from kvray.model.oom import check_oom_risk

    name = one_model(model_arg, model)
    _check_tp_flag([tp])
    risk = check_oom_risk(name, concurrency, seq_len, dtype=dtype, gpu=gpu, kv_dtype=kv_dtype, tp=tp)
    if as_json:
        render.print_json(risk.to_dict())
    else:
        render.oom_risk(risk)


def _check_tp_flag(values: list[int]) -> None:
    """--tp values are positive: one line and exit 2 before any model is looked up."""
    if not values or any(v <= 0 for v in values):
        raise KvrayInputError(f"--tp values must be positive integers, got {' '.join(map(str, values))}")


def _gpu_names(text: str) -> list[str]:
    """``--gpu H100,L4`` → canonical GPU names; ``all`` → every GPU kvray knows."""
    from kvray.hardware.gpus import GPUS, get_gpu

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise KvrayInputError("--gpu needs at least one GPU name")
    if any(n.lower() == "all" for n in names):
        return list(GPUS)
    return [get_gpu(n).name for n in names]


def predict(
    model_arg: ModelPositional = None,
    model: ModelNamedOpt = None,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU name(s), comma-separated, or 'all'")] = "H100-SXM",
    concurrency: Annotated[
        list[int], typer.Option("--concurrency", "-c", help="concurrent requests: --concurrency 1 2 4 8")
    ] = [1],  # noqa: B006 - typer reads the default, never mutates it
    prompt_toks: Annotated[list[int], typer.Option("--prompt-toks", help="prompt tokens: 512 1024 …")] = [512],  # noqa: B006
    gen_toks: Annotated[list[int], typer.Option("--gen-toks", help="generated tokens per request")] = [64],  # noqa: B006
    dtype: DtypeOpt = "bf16",
    kv_dtype: KvDtypeOpt = None,
    layout: Annotated[str, typer.Option("--layout", help="hf (static, padded) | paged (vLLM blocks)")] = "hf",
    block_size: Annotated[int, typer.Option("--block-size", help="paged KV block size in tokens")] = 16,
    tp: Annotated[
        list[int], typer.Option("--tp", help="tensor parallel degrees: --tp 1 2 4 8 (memory and tok/s per GPU)")
    ] = [1],  # noqa: B006
    no_calibration: Annotated[bool, typer.Option("--no-calibration", help="ignore calibrated η")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Predict TTFT, TPOT, E2E, tokens/s, peak memory and OOM for each cell on each GPU — no GPU needed."""
    from kvray.hardware.gpus import get_gpu
    from kvray.model.kvmath import LAYOUTS, normalize_dtype
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import Efficiency, efficiency_for, predict_cell

    name = one_model(model_arg, model)
    if layout not in LAYOUTS:
        raise KvrayInputError(f"unknown --layout {layout!r} (known: {', '.join(LAYOUTS)})")
    for flag, values in (("--concurrency", concurrency), ("--prompt-toks", prompt_toks), ("--gen-toks", gen_toks)):
        if any(v <= 0 for v in values):
            raise KvrayInputError(f"{flag} values must be positive, got {' '.join(map(str, values))}")
    if block_size <= 0:
        raise KvrayInputError(f"--block-size must be positive, got {block_size}")
    _check_tp_flag(tp)
    dtype = normalize_dtype(dtype)
    kv_dtype = normalize_dtype(kv_dtype or dtype)
    gpus = _gpu_names(gpu)
    g = resolve_geometry(name)
    from kvray.model.parallel import check_tensor_parallel

    for n in tp:
        check_tensor_parallel(g, n)
    effs = {card: Efficiency() if no_calibration else efficiency_for(get_gpu(card), layout) for card in gpus}
    # LEAD: the grid below is the library's work; a `predict_grid` in kvray/sim would make this one call.
    rows = [
        predict_cell(
            g,
            card,
            c,
            p,
            n,
            dtype=dtype,
            kv_dtype=kv_dtype,
            layout=layout,
            block_size=block_size,
            eff=effs[card],
            tp=degree,
        )
        for card in gpus
        for degree in tp
        for p in prompt_toks
        for n in gen_toks
        for c in concurrency
    ]
    if as_json:
        render.print_json(
            {
                "model": g.name,
                "efficiency": {card: eff.describe() for card, eff in effs.items()},
                "predictions": [p.to_dict() for p in rows],
            }
        )
    else:
        render.predictions(f"Predicted: {g.name}, {dtype} (KV {kv_dtype}, {layout} layout)", rows, effs)


def calibrate(
    results_dir: Annotated[str, typer.Argument(help="a results folder with measured cells (cells.jsonl)")],
    output: Annotated[
        str | None, output_option("calibration file written (default $KVRAY_CALIBRATION)", metavar="FILE")
    ] = None,
    include_simulated: Annotated[
        bool, typer.Option("--include-simulated", help="also fit rows from the sim backend")
    ] = False,
    cpu_host: Annotated[
        bool, typer.Option("--cpu-host", help="also fit CPU rows, against this machine's measured peaks (cpu-host)")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fit the step model (η_compute, η_memory, CPU costs per step and per request) per GPU from measured cells."""
    from kvray.analysis.calibrate import calibrate as fit

    host = None
    if cpu_host:
        from kvray.hardware.host import measure_host

        host = measure_host()
    fits, path = fit(results_dir, out=output, include_simulated=include_simulated, host=host)
    if as_json:
        render.print_json({"path": str(path), "fits": [f.to_entry(results_dir) for f in fits]})
    else:
        render.calibration(results_dir, fits, path)
