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

from kvray.backends import check_cell, get_backend
from kvray.data.layout import LOCK_NAME
from kvray.data.reader import read_results
from kvray.data.writer import DatasetWriter, drop_row, write_json_atomic
from kvray.errors import KvrayInputError
from kvray.model.resolve import check_pretrained_weights
from kvray.plan.job import job_from_dict, loads_weights
from kvray.plan.planner import plan_cells

if TYPE_CHECKING:
    from kvray.measure.trace import CellResult
    from kvray.spec import Cell


# The job keys ``kvray bench``'s flags set (kvray/cli/bench_cmd.py): an error names the flag, not the key.
BENCH_FLAGS = {
    "models": "--model",
    "backends": "--backend",
    "dtypes": "--dtype",
    "weights": "--weights",
    "device": "--device",
    "tensor_parallel": "--tp",
    "clients": "--clients",
    "warmup": "--warmup",
    "repeats": "--repeats",
    "options": "--option",
    "grid": "",  # a check of the whole workload says which flags it is about
    "grid.prompt_toks": "--prompt-toks",
    "grid.gen_toks": "--gen-toks",
    "grid.concurrency": "-c/--concurrency",
    "grid.mixed": "--mixed",
    "grid.arrival_gap_s": "--arrival-gap-s",
    "grid.prompt_dist": "--prompt-dist",
    "grid.gen_dist": "--gen-dist",
    "grid.slo": "--slo",
    "grid.trace": "--trace",
    "grid.load": "--load",
    "grid.load.rate": "--rate",
    "grid.load.users": "--users",
    "grid.load.requests": "--requests",
    "grid.load.duration_s": "--duration-s",
    "grid.load.seed": "--seed",
    "grid.load.warmup_s": "--warmup-s",
    "grid.load.cooldown_s": "--cooldown-s",
}


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
    length, on ``backend``; returned as it will run. The flags become a one-cell job (``bench_job``) checked by
    the job files' own validator (kvray/plan/job.py: one set of rules, errors naming the flags), then what this
    machine must have for it (``check_cell``: a server URL that answers, a vLLM python, a device).
    ``clients`` > 1 (server backends) sends the load from that many Ray actors (kvray/backends/http/clients.py)."""
    job = bench_job(
        model,
        {
            "prompt_toks": prompt_toks,
            "gen_toks": gen_toks,
            "concurrency": concurrency,
            "mixed": mixed,
            "arrival_gap_s": arrival_gap_s,
            "load": load,
            "slo": slo,
            "prompt_dist": prompt_dist,
            "gen_dist": gen_dist,
            "trace": trace,
        },
        backend=backend,
        dtype=dtype,
        weights=weights,
        device=device,
        warmup=warmup,
        repeats=repeats,
        options=options,
        tensor_parallel=tensor_parallel,
        clients=clients,
    )
    (cell,) = plan_cells(job_from_dict(job, source="", flags=BENCH_FLAGS))
    if cell.weights == "pretrained" and loads_weights(backend):
        check_pretrained_weights(model)  # the job checked the files; this machine loads them: the hub now, too
    return check_cell(cell)


def bench_job(
    model: str,
    workload: Mapping[str, Any],
    *,
    backend: str,
    dtype: str,
    tensor_parallel: int,
    options: Mapping[str, Any] | None,
    **settings: Any,
) -> dict[str, Any]:
    """``kvray bench``'s flags as the job file that measures the same one cell. ``workload`` holds the flags that
    shape the requests; a trace or ``mixed`` sets the requests itself, and any length-shaping flag given beside it
    goes in too, so that the job's own checks refuse the pair."""
    shaping = ("trace", "mixed", "prompt_dist", "gen_dist", "load", "slo")
    given = {key: workload[key] for key in shaping if workload.get(key)}
    block: dict[str, Any] = {}
    if "trace" not in given:
        block["arrival_gap_s"] = [workload["arrival_gap_s"]]
        if "gen_dist" not in given:
            block["gen_toks"] = [workload["gen_toks"]]
        if "mixed" not in given:
            block["concurrency"] = [workload["concurrency"]]
            if "prompt_dist" not in given:
                block["prompt_toks"] = [workload["prompt_toks"]]
    for key, value in given.items():  # as a job file writes them
        if key == "mixed":
            block[key] = [list(value)]
        elif key == "load":
            block[key] = load_block(value, workload["concurrency"])
        else:
            block[key] = dict(value)
    return {
        "name": "bench",
        "models": [model],
        "backends": [backend],
        "dtypes": [dtype],
        "tensor_parallel": [tensor_parallel],
        "options": dict(options or {}),
        **settings,
        "grid": block,
    }


def load_block(load: Mapping[str, Any], concurrency: int) -> dict[str, Any]:
    """``--load KIND --rate R …`` (kvray/plan/loads.py ``parse_load_flags``) as a job grid's ``load``: a closed
    loop's users are ``-c``; for a burst ``-c`` is its size (the grid's concurrency)."""
    block = {key: value for key, value in load.items() if value is not None}
    block.setdefault("kind", "burst")
    if block["kind"] == "closed":
        block["users"] = concurrency
    return block


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
