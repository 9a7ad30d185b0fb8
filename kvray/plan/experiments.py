"""What every experiment's job is built from (``Common``) and what the planner does with any job an exp command
builds: its name, its dry run (each cell with its predicted memory), its job file for a remote cluster.

The experiments themselves — each one's job builder, flags, figures, report section and findings — are one
module each in kvray/experiments/ (a later stage: the planner never imports them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import match_gpu
from kvray.model.oom import check_oom_risk
from kvray.model.parallel import check_tensor_parallel
from kvray.model.resolve import resolve_geometry
from kvray.plan.job import Grid, Job


@dataclass
class Common:
    """What every experiment's job is built from, beside its workload (kvray/cli/options.py: ExperimentFlags)."""

    model: str = "facebook/opt-1.3b"
    backends: list[str] = field(default_factory=lambda: ["hf"])
    dtype: str = "bf16"
    kv_dtype: str | None = None
    weights: str = "random"
    device: str = "auto"
    hardware: str | list[str] = "any"  # any | each | GPU types
    warmup: int = 1
    repeats: int = 3
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    tensor_parallel: list[int] = field(default_factory=lambda: [1])  # --tp: each cell once per degree


def job_name(experiment: str, model: str) -> str:
    """exp1-facebook--opt-1.3b: a folder name that says what was run."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/").replace("/", "--")).strip("-.") or "model"
    return f"{experiment}-{slug}"


def hardware_arg(values: list[str] | tuple[str, ...] | str | None) -> str | list[str]:
    """``--hardware`` values: nothing or ``any`` → "any"; ``each`` → "each"; else the list of types."""
    items = [values] if isinstance(values, str) else list(values or [])
    items = [v.strip() for item in items for v in item.split(",") if v.strip()]
    if not items or items == ["any"]:
        return "any"
    if items == ["each"]:
        return "each"
    if "any" in items or "each" in items:
        raise KvrayInputError(f"--hardware takes 'any', 'each' or GPU types, not a mix: {' '.join(items)}")
    return items


def max_positions(model: str) -> int:
    """The positions ``model`` holds (prompt + generated tokens of one request)."""
    return int(resolve_geometry(model).max_position_embeddings)


def positive(flag: str, values: list[int]) -> None:
    """At least one value, every one > 0; else one line naming ``flag``."""
    if not values:
        raise KvrayInputError(f"{flag} needs at least one value")
    bad = [v for v in values if v <= 0]
    if bad:
        raise KvrayInputError(f"{flag} values must be positive, got {bad[0]}")


def uniform_grid(common: Common, prompt_toks: int, gen_toks: int, concurrency: list[int]) -> Grid:
    """One grid of ``concurrency`` levels × one prompt and one output length (exp1, exp4, the TP sweeps), each
    positive and prompt + output − 1 within the model's positions — else one line naming the flag."""
    concurrency = sorted(set(concurrency))
    for flag, values in (("--concurrency", concurrency), ("--prompt-toks", [prompt_toks]), ("--gen-toks", [gen_toks])):
        positive(flag, values)
    if prompt_toks + gen_toks - 1 > (limit := max_positions(common.model)):
        raise KvrayInputError(
            f"--prompt-toks {prompt_toks} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions"
        )
    return Grid(gen_toks=(gen_toks,), prompt_toks=(prompt_toks,), concurrency=tuple(concurrency))


def uniform_job(experiment: str, common: Common, prompt_toks: int, gen_toks: int, concurrency: list[int]) -> Job:
    """The validated Job of one ``uniform_grid`` (exp1, exp4)."""
    return experiment_job(experiment, common, [uniform_grid(common, prompt_toks, gen_toks, concurrency)]).validate()


def experiment_job(experiment: str, common: Common, grids: list[Grid]) -> Job:
    """A Job of ``grids`` with ``common``'s settings, named and described after ``experiment``; not validated."""
    same_name = {
        key: getattr(common, key) for key in ("weights", "kv_dtype", "device", "hardware", "warmup", "repeats")
    }
    return Job(
        name=common.name or job_name(experiment, common.model),
        models=[common.model],
        backends=list(common.backends),
        dtypes=[common.dtype],
        grids=grids,
        experiment=experiment,
        options=dict(common.options),
        tensor_parallel=list(common.tensor_parallel),
        **same_name,
        description=f"kvray {experiment}",
        source=f"kvray {experiment}",
    )


def job_from_grid_blocks(experiment: str, common: Common, blocks: Any, **settings: Any) -> Job:
    """A Job parsed from grid blocks in the job file's own keys (loads, SLOs, reuse workloads), so it means exactly
    what the same blocks in jobs/*.yaml mean; ``settings`` override ``common``'s (exp7's TP degrees)."""
    from kvray.plan.job import job_from_dict

    data = experiment_job(experiment, common, []).to_dict()
    data.update(settings, grid=blocks)
    return job_from_dict({k: v for k, v in data.items() if v is not None}, source=f"kvray {experiment}")


def dry_run_rows(job: Job) -> list[dict[str, Any]]:
    """Each cell the job would run, with the memory the pre-flight OOM check predicts for it."""
    from kvray.plan.planner import plan_cells

    rows = []
    for cell in plan_cells(job):
        wl = cell.workload
        spec = match_gpu(cell.hardware) if cell.hardware not in ("any", "each") else None
        load = wl.load
        # a closed loop holds at most its users' requests at once; an open loop's peak is the engine's to set
        running = int(load.users) if load is not None and load.kind == "closed" and load.users else wl.concurrency
        risk = check_oom_risk(
            cell.model,
            running,
            wl.max_seq_len,
            dtype=cell.dtype,
            gpu=spec.name if spec else None,
            kv_dtype=cell.kv_dtype,
            tp=cell.tensor_parallel,  # per GPU of the TP group
        ).to_dict()
        rows.append(
            {
                "cell_id": cell.cell_id,
                "experiment": cell.experiment,
                "backend": cell.backend,
                "hardware": cell.hardware,
                "tensor_parallel": cell.tensor_parallel,
                "device": risk["device"],
                "workload": wl.kind,
                "load": wl.load_kind
                if load is None or load.kind in ("burst", "closed")
                else f"{load.kind} {'auto' if load.search else f'{load.rate_rps:g}/s'}",
                "concurrency": running,
                "prompt_toks": ",".join(str(r.prompt_toks) for r in wl.requests)
                if wl.kind == "mixed"
                else wl.prompt_toks,
                "gen_toks": wl.gen_toks,
                "weights_gb": risk["weights_gb"],
                "kv_gb": risk["kv_gb"],
                "activation_gb": risk["activation_gb"],
                "total_estimated_gb": risk["total_estimated_gb"],
                "available_gb": risk["available_gb"],
                "risk_level": risk["risk_level"],
            }
        )
    return rows


def write_job_file(job: Job, directory: str | Path) -> Path:
    """The job as ``<name>.yaml`` in ``directory``: what ``kvray launch`` ships to a remote cluster."""
    import yaml

    path = Path(directory) / f"{job.name}.yaml"
    path.write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
    return path


def tp_sweep_job(
    experiment: str,
    common: Common,
    prompt_toks: int,
    gen_toks: int,
    concurrency: list[int],
    *,
    default_tp: Sequence[int],
    sim_gpus: Sequence[str],
) -> tuple[Job, list[str]]:
    """(the Job, notes) of exp7 and exp9: ``concurrency`` × the TP degrees of ``common`` (``default_tp`` when left
    at [1]) that the model allows — a note for each degree dropped. With the sim backend alone the layout is
    paged (vLLM's continuous batching) and ``sim_gpus`` stand in for ``--hardware any``."""
    grid = uniform_grid(common, prompt_toks, gen_toks, concurrency)
    degrees = list(common.tensor_parallel) if list(common.tensor_parallel) != [1] else list(default_tp)
    g = resolve_geometry(common.model)
    notes, allowed = [], []
    for n in degrees:
        try:
            check_tensor_parallel(g, n)
            allowed.append(n)
        except KvrayInputError as exc:
            notes.append(f"TP {n} dropped: {exc}")
    if not allowed:
        raise KvrayInputError(f"no tensor parallel degree of {degrees} suits {common.model}")
    options, hardware = dict(common.options), common.hardware
    if set(common.backends) == {"sim"}:
        options.setdefault("layout", "paged")
        if hardware == "any":
            hardware = list(sim_gpus)
    common = dataclasses.replace(common, hardware=hardware, options=options, tensor_parallel=allowed)
    return experiment_job(experiment, common, [grid]).validate(), notes
