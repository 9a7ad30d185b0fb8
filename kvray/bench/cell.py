"""``kvray bench``'s one cell: built from plain arguments and checked whole before any model loads, then
measured in this process and written to the dataset.

Everything a user can get wrong (a backend name, a dtype, a length the model cannot hold, a server URL)
fails here as one KvrayInputError line, so a bad flag never costs a model load or leaves a half-written
results folder behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.backends import backend_class, check_cell, check_clients, get_backend
from kvray.data.layout import LOCK_NAME
from kvray.data.reader import read_results
from kvray.data.writer import DatasetWriter, drop_row, write_json_atomic
from kvray.errors import KvrayInputError
from kvray.model.kvmath import normalize_dtype
from kvray.model.resolve import resolve_geometry
from kvray.spec import OPEN_LOOPS, WEIGHTS, Cell, LoadSpec, Workload, make_options

if TYPE_CHECKING:
    from kvray.measure.trace import CellResult
    from kvray.spec import Cell


def bench_cell(
    model: str,
    *,
    prompt_toks: int = 512,
    gen_toks: int = 64,
    concurrency: int = 1,
    mixed: Sequence[int] | None = None,
    arrival_gap_s: float = 0.0,
    dtype: str = "bf16",
    weights: str = "random",
    device: str = "auto",
    backend: str = "hf",
    warmup: int = 1,
    repeats: int = 3,
    options: Mapping[str, Any] | None = None,
    load: Mapping[str, Any] | None = None,
    slo: Mapping[str, float] | None = None,
    prompt_dist: Mapping[str, Any] | None = None,
    gen_dist: Mapping[str, Any] | None = None,
    tensor_parallel: int = 1,
    clients: int = 1,
    trace: Mapping[str, Any] | None = None,
) -> Cell:
    """The Cell ``kvray bench`` measures: ``concurrency`` equal requests, or one request per ``mixed`` prompt
    length, on ``backend``; validated whole (the backend's own checks included) and returned as it will run.
    ``clients`` > 1 (server backends) sends the load from that many Ray actors (kvray/backends/http/clients.py)."""
    engine = backend_class(backend)  # an unknown name is one line listing the known ones
    try:
        check_clients(backend, clients)
    except KvrayInputError as exc:
        raise KvrayInputError(f"--clients: {exc}") from None
    if weights not in WEIGHTS:
        raise KvrayInputError(f"unknown --weights {weights!r} (known: {', '.join(WEIGHTS)})")
    dtype = normalize_dtype(dtype, allow_fp8=False)
    if arrival_gap_s < 0:
        raise KvrayInputError(f"--arrival-gap-s must be >= 0, got {arrival_gap_s}")
    if trace:  # a replayed trace (kvray/plan/replay.py): its requests, lengths and arrivals
        from kvray.plan.replay import replay_workload

        if mixed or load or prompt_dist or gen_dist:
            raise KvrayInputError("--trace sets the requests and their arrivals: no --mixed, --load or distributions")
        workload = replay_workload(trace, slo or {})
    elif mixed:
        if load or slo or prompt_dist or gen_dist:
            raise KvrayInputError("--mixed sets its own requests: it takes no --load, --slo or length distribution")
        workload = Workload.mixed(list(mixed), gen_toks, arrival_gap_s)
    elif load or slo or prompt_dist or gen_dist:
        workload = serving_workload(
            concurrency, prompt_dist or prompt_toks, gen_dist or gen_toks, arrival_gap_s, load or {}, slo
        )
    else:
        workload = Workload.uniform(concurrency, prompt_toks, gen_toks, arrival_gap_s)
    try:
        g = resolve_geometry(model)
    except KvrayInputError:
        if engine.needs_model_geometry:  # a server may serve a model kvray cannot resolve
            raise
        g = None
    if weights == "pretrained" and engine.needs_model_geometry and not engine.simulated:
        from kvray.model.resolve import check_pretrained_weights

        check_pretrained_weights(model)  # offline, or a bundled geometry: one line now, not 30 s of retries
    if tensor_parallel < 1:
        raise KvrayInputError(f"--tp must be a positive integer, got {tensor_parallel}")
    if g is not None and tensor_parallel > 1:
        from kvray.model.parallel import check_tensor_parallel

        check_tensor_parallel(g, tensor_parallel)  # vLLM's divisibility rules, before anything loads
    if g is not None and (prompt_dist or gen_dist):
        check_dist_max(model, g.max_position_embeddings, workload, prompt_dist, gen_dist)
    if g is not None and workload.max_seq_len > g.max_position_embeddings:
        raise KvrayInputError(
            f"prompt + generated tokens ({workload.max_seq_len}) exceed {model}'s "
            f"max_position_embeddings ({g.max_position_embeddings})"
        )
    cell = Cell(
        model=model,
        workload=workload,
        backend=backend,
        dtype=dtype,
        weights=weights,
        device=device,
        warmup=warmup,
        repeats=repeats,
        options=make_options(**dict(options or {})),
        tensor_parallel=tensor_parallel,
        clients=clients,
    )
    return validate_backend_options(cell)


def check_dist_max(
    model: str, positions: int, workload: Any, prompt_dist: Mapping[str, Any] | None, gen_dist: Mapping[str, Any] | None
) -> None:
    """A length distribution's ``max`` is the longest request it may draw: refused, like ``--prompt-toks``,
    when that prompt plus the longest output would exceed the model's positions — whatever the seed drew this
    time (a median of 16 rarely draws near its max, so the drawn workload alone would let 99999999 through)."""

    def longest(dist: Mapping[str, Any] | None, drawn: int) -> tuple[int, str | None]:
        if dist and dist.get("max") is not None:
            return int(dist["max"]), "max"
        return drawn, None

    prompt, p_src = longest(prompt_dist, max(r.prompt_toks for r in workload.requests))
    gen, g_src = longest(gen_dist, max(r.gen_toks for r in workload.requests))
    if p_src is None and g_src is None or prompt + gen <= positions:
        return
    what = " + ".join(
        f"--{side}-dist max {n}" if src else f"{n} {side} tokens"
        for side, n, src in (("prompt", prompt, p_src), ("gen", gen, g_src))
    )
    raise KvrayInputError(
        f"{what} exceed {model}'s max_position_embeddings ({positions}); lower the distribution's max so that "
        f"prompt + generated tokens <= {positions}"
    )


def serving_workload(
    concurrency: int,
    prompt: Any,
    gen: Any,
    arrival_gap_s: float,
    load: Mapping[str, Any],
    slo: Mapping[str, float] | None,
) -> Any:
    """``kvray bench --load KIND --rate R --requests N …``: the flags as a LoadSpec, its workload built.

    For a closed loop ``-c`` is the number of users; for a burst, the burst's size."""
    from kvray.plan.loads import build_workload

    kind = str(load.get("kind") or "burst")
    rate = load.get("rate")
    search = "saturation" if rate == "auto" else None
    spec = LoadSpec(
        kind=kind,
        rate_rps=None if rate in (None, "auto") else float(rate),
        users=concurrency if kind == "closed" else None,
        requests=load.get("requests"),
        duration_s=load.get("duration_s"),
        seed=int(load.get("seed") or 0),
        search=search,
        warmup_s=load.get("warmup_s"),
        cooldown_s=load.get("cooldown_s"),
    )
    if kind != "burst" and arrival_gap_s:
        raise KvrayInputError("--arrival-gap-s spaces a burst's requests; a load sets its own arrivals")
    workload = build_workload(spec, prompt, gen, concurrency=concurrency, slo=slo, arrival_gap_s=arrival_gap_s)
    trim = (spec.warmup_s or 0.0) + (spec.cooldown_s or 0.0)
    if trim and kind in OPEN_LOOPS and search is None:  # the arrivals are known now: the window must hold some
        arrivals = [r.arrival_s for r in workload.requests]
        if trim >= max(arrivals) - min(arrivals):
            raise KvrayInputError(
                f"--warmup-s + --cooldown-s ({trim:g} s) leave no window: this load's arrivals "
                f"span {max(arrivals) - min(arrivals):.3g} s"
            )
    return workload


def validate_backend_options(cell: Cell) -> Cell:
    """THE call site for per-backend checks of a cell run in this process (``kvray bench``): its options'
    form, plus what this machine must have for it (a server URL, a vLLM python, an API key's variable, a
    device). Each backend class answers for itself (``check_cell``); returns the cell as it will run (the
    hf backend pins ``device="auto"`` to the device it resolves to)."""
    return check_cell(cell)


def check_output(cell: Cell, output_dir: str | Path, replace: bool = False) -> None:
    """A bench is a new measurement each time: a folder that already holds this cell's row is refused before
    anything loads, unless ``replace`` (the new row then takes the earlier one's place). A folder another
    kvray run holds (its lock) is refused too."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise KvrayInputError(f"--output {out} is a file, not a folder")
    if (out / LOCK_NAME).is_file():
        raise KvrayInputError(f"{out} is held by a running kvray run (its {LOCK_NAME}); choose another --output")
    try:
        earlier = next((r for r in read_results(out, traces=False) if r.get("cell_id") == cell.cell_id), None)
    except OSError as exc:
        raise KvrayInputError(f"cannot read {out}: {exc.strerror or exc}") from None
    if earlier is not None and not replace:
        raise KvrayInputError(
            f"{out} already has a row for this cell ({cell.cell_id}, measured {earlier.get('started_at') or '?'}); "
            "pass --replace to measure it again and replace that row, or --output another folder"
        )


@dataclass(frozen=True)
class BenchRecord:
    """A measured cell and where it was written."""

    result: CellResult
    output_dir: Path
    cell_json: Path  # cell_<id>.json: the whole result, traces included
    added: bool  # True: a new row; False: it replaced the cell's earlier row (--replace)


def measure_and_record(
    cell: Cell, output_dir: str | Path, check_oom: bool = True, replace: bool = False
) -> BenchRecord:
    """Run ``cell`` on a fresh backend in this process (no Ray, unless the cell's clients > 1: then the caller has
    joined Ray, kvray/cli/bench_cmd.py), append its row to the dataset in
    ``output_dir`` and write ``cell_<id>.json`` beside it. The folder must not hold the cell's row already
    unless ``replace`` (checked before the model loads: ``check_output``)."""
    from kvray.runner.run import run_cell
    from kvray.runner.saturation import is_search, run_search

    check_output(cell, output_dir, replace)
    out_dir = Path(output_dir)
    engine = get_backend(cell.backend)

    def record(result: CellResult, tables: bool = False) -> bool:
        """Append the row durably; the parquet/csv tables are rebuilt once, with the last row (a search's probes
        would otherwise rebuild them after every probe)."""
        replaced = replace and drop_row(out_dir, result.cell_id)
        return DatasetWriter(out_dir, tables=tables).append(result) and not replaced

    try:  # a rate search (--rate auto) records each probe as it ends, then its own summary row
        result = run_search(engine, cell, record, check_oom) if is_search(cell) else run_cell(engine, cell, check_oom)
    finally:
        engine.close()
    added = record(result, tables=True)
    cell_json = out_dir / f"cell_{result.cell_id}.json"
    write_json_atomic(cell_json, result.to_dict())
    return BenchRecord(result, out_dir, cell_json, added)
