"""The seed's three experiments as Jobs, so ``kvray exp1/2/3`` run through the same Ray path as ``kvray run``.

exp1  concurrency sweep: N equal requests of ``prompt_toks`` for each N in ``concurrency``
exp2  sequence-length sweep: ``concurrency`` requests of each prompt length in ``seqlens``
exp3  mixed lengths: ``n_short`` short requests alone, then the same short requests beside ``n_long``
      long ones in one batch — the short requests' TTFT/E2E show what the long ones cost them

A prompt length the model cannot hold (prompt + generated tokens beyond its positions) is dropped from an
exp2 sweep with a note, and is an error for exp1/exp3, whose shape needs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.plan.job import Grid, Job

EXPERIMENTS = ("exp1", "exp2", "exp3", "exp4", "exp5", "exp6")


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
    import re

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


def _max_positions(model: str) -> int:
    from kvray.model.resolve import resolve_geometry

    return int(resolve_geometry(model).max_position_embeddings)


def _positive(flag: str, values: list[int]) -> None:
    if not values:
        raise KvrayInputError(f"{flag} needs at least one value")
    bad = [v for v in values if v <= 0]
    if bad:
        raise KvrayInputError(f"{flag} values must be positive, got {bad[0]}")


def _job(experiment: str, common: Common, grids: list[Grid]) -> Job:
    return _unchecked_job(experiment, common, grids).validate()


def _unchecked_job(experiment: str, common: Common, grids: list[Grid]) -> Job:
    same_name = {
        key: getattr(common, key) for key in ("weights", "kv_dtype", "device", "hardware", "warmup", "repeats")
    }
    job = Job(
        name=common.name or job_name(experiment, common.model),
        models=[common.model], backends=list(common.backends), dtypes=[common.dtype], grids=grids,
        experiment=experiment, options=dict(common.options), tensor_parallel=list(common.tensor_parallel), **same_name,
        description=f"kvray {experiment}", source=f"kvray {experiment}",
    )  # fmt: skip
    return job


def exp1_job(common: Common, prompt_toks: int = 512, gen_toks: int = 64, concurrency: list[int] | None = None) -> Job:
    concurrency = sorted(set(concurrency or [1, 2, 4, 8]))
    _positive("--concurrency", concurrency)
    _positive("--prompt-toks", [prompt_toks])
    _positive("--gen-toks", [gen_toks])
    return _job(
        "exp1", common, [Grid(gen_toks=(gen_toks,), prompt_toks=(prompt_toks,), concurrency=tuple(concurrency))]
    )


def exp2_job(
    common: Common, seqlens: list[int] | None = None, gen_toks: int = 64, concurrency: int = 1
) -> tuple[Job, list[str]]:
    """The job and notes (prompt lengths dropped because the model cannot hold them)."""
    seqlens = sorted(set(seqlens or [128, 512, 1024, 2048, 4096]))
    _positive("--seqlens", seqlens)
    _positive("--gen-toks", [gen_toks])
    _positive("--concurrency", [concurrency])
    limit = _max_positions(common.model)
    fits = [s for s in seqlens if s + gen_toks - 1 <= limit]
    notes = []
    dropped = [s for s in seqlens if s not in fits]
    if dropped:
        notes.append(
            f"dropped --seqlens {' '.join(map(str, dropped))}: prompt + {gen_toks} generated tokens exceed "
            f"{common.model}'s {limit} positions"
        )
    if not fits:
        raise KvrayInputError(
            f"no --seqlens value fits {common.model}'s {limit} positions with {gen_toks} "
            f"generated tokens (largest possible prompt: {limit - gen_toks + 1})"
        )
    grid = Grid(gen_toks=(gen_toks,), prompt_toks=tuple(fits), concurrency=(concurrency,))
    return _job("exp2", common, [grid]), notes


def exp3_job(
    common: Common, short: int = 128, long: int = 4096, gen_toks: int = 64, n_short: int = 3, n_long: int = 1
) -> tuple[Job, list[str]]:
    """Short requests alone (uniform) and the same short requests batched with long ones (mixed).

    A ``long`` the model cannot hold becomes the longest prompt it can (with a note): the seed's
    ``--long 4096`` on a 2048-position OPT still measures "long beside short". Beyond twice the model's
    positions it is a mistake (``--long 999999``), an error naming the largest possible prompt."""
    _positive("--short", [short])
    _positive("--long", [long])
    _positive("--gen-toks", [gen_toks])
    _positive("--n-short", [n_short])
    _positive("--n-long", [n_long])
    limit = _max_positions(common.model)
    notes = []
    longest = limit - gen_toks + 1
    if long > 2 * limit:  # not the seed's 4096 on a 2048-position model: a length no clamp should hide
        raise KvrayInputError(
            f"--long {long} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions "
            f"(largest possible prompt: {longest})"
        )
    if long + gen_toks - 1 > limit:
        notes.append(
            f"--long {long} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions: "
            f"using --long {longest}, the longest prompt it holds"
        )
        long = longest
    if short + gen_toks - 1 > limit:
        raise KvrayInputError(
            f"--short {short} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions"
        )
    if long <= short:
        raise KvrayInputError(f"--long ({long}) must be longer than --short ({short})")
    grids = [
        Grid(gen_toks=(gen_toks,), prompt_toks=(short,), concurrency=(n_short,)),
        Grid(gen_toks=(gen_toks,), mixed=(tuple([short] * n_short + [long] * n_long),)),
    ]
    return _job("exp3", common, grids), notes


def exp4_job(common: Common, prompt_toks: int = 512, gen_toks: int = 64,
             concurrency: list[int] | None = None) -> Job:  # fmt: skip
    """exp4, static vs paged KV and in-process vs server: exp1's workload on each of ``common.backends``
    (default hf, hf-paged, vllm), drawn by fig8_backend_compare (kvray/figures/server.py)."""
    concurrency = sorted(set(concurrency or [1, 4, 16, 64]))
    _positive("--concurrency", concurrency)
    _positive("--prompt-toks", [prompt_toks])
    _positive("--gen-toks", [gen_toks])
    if prompt_toks + gen_toks - 1 > (limit := _max_positions(common.model)):
        raise KvrayInputError(f"--prompt-toks {prompt_toks} + {gen_toks} generated tokens exceed {common.model}'s "
                              f"{limit} positions")  # fmt: skip
    grid = Grid(gen_toks=(gen_toks,), prompt_toks=(prompt_toks,), concurrency=tuple(concurrency))
    return _job("exp4", common, [grid])


EXP5_GPUS = ("H100-SXM", "A100-80GB-SXM", "L4")  # sim's default hardware for exp5: a prediction per GPU type
EXP5_SLO = {"ttft_ms": 500.0, "tpot_ms": 50.0}


def exp5_job(
    common: Common,
    prompt: int | dict[str, Any] = 512,
    gen: int | dict[str, Any] = 128,
    users: list[int] | None = None,
    requests_per_user: int = 8,
    open_load: str | None = "poisson",
    rates: list[float] | str = "auto",
    requests: int = 200,
    slo: dict[str, float] | None = None,
    seed: int = 0,
    burstiness: float = 1.0,
) -> Job:
    """Exp5, serving load: a closed loop per user count (``requests_per_user`` each: the first and the last of
    every user fall in the ramp-up and the drain, kvray/measure/serving.py) and an open loop (``open_load``) at
    each of ``rates`` — or ``"auto"``: a saturation search (kvray/bench/saturation.py) — every cell judged
    against ``slo``. ``users=[]`` or ``open_load=None`` leaves that half out. Drawn by fig11/fig12
    (kvray/figures/serving.py); the report's Serving section tabulates max goodput per configuration."""
    from kvray.spec import OPEN_LOOPS

    users = sorted(set(users if users is not None else [1, 4, 16, 64]))
    if users:
        _positive("--users", users)
    _positive("--requests-per-user", [requests_per_user])
    _positive("--requests", [requests])
    if requests_per_user < 3:
        raise KvrayInputError(f"--requests-per-user must be >= 3 (each user's first and last request are not "
                              f"steady state), got {requests_per_user}")  # fmt: skip
    if open_load is not None and open_load not in OPEN_LOOPS:
        raise KvrayInputError(f"--open-load: expected one of {', '.join(OPEN_LOOPS)}, got {open_load!r}")
    if not users and open_load is None:
        raise KvrayInputError("exp5 needs a closed loop (--users) or an open loop (--open-load), or both")
    rate_list = [] if isinstance(rates, str) else sorted(set(rates))
    if rates != "auto":
        if not rate_list:
            raise KvrayInputError("--rates needs at least one value (requests/s) or auto")
        if bad := [r for r in rate_list if not (r > 0 and math.isfinite(r))]:
            raise KvrayInputError(f"--rates values must be positive requests/s, got {bad[0]}")
    lengths: dict[str, Any] = {}
    for side, value in (("prompt", prompt), ("gen", gen)):
        if isinstance(value, int):
            _positive(f"--{side}-toks", [value])
            lengths[f"{side}_toks"] = [value]
        else:
            lengths[f"{side}_dist"] = dict(value)
    longest = [int(v[0]) if isinstance(v, list) else int(v.get("max", v.get("value", 0))) for v in lengths.values()]
    if sum(longest) - 1 > (limit := _max_positions(common.model)):
        raise KvrayInputError(f"prompt {longest[0]} + {longest[1]} generated tokens exceed {common.model}'s "
                              f"{limit} positions")  # fmt: skip
    slo = dict(EXP5_SLO if slo is None else slo)
    blocks: list[dict[str, Any]] = [
        {**lengths, "load": {"kind": "closed", "users": u, "requests": u * requests_per_user, "seed": seed}, "slo": slo}
        for u in users
    ]
    if open_load is not None:
        load: dict[str, Any] = {"kind": open_load, "requests": requests, "seed": seed}
        load.update({"rate": "auto"} if rates == "auto" else {"rates": rate_list})
        if open_load == "gamma":
            load["burstiness"] = burstiness
        blocks.append({**lengths, "load": load, "slo": slo})
    if common.hardware == "any" and set(common.backends) == {"sim"}:
        common = dataclasses.replace(common, hardware=list(EXP5_GPUS))
    from kvray.plan.job import job_from_dict

    data = _unchecked_job("exp5", common, []).to_dict()
    data["grid"] = blocks  # as a job file writes them: the loads and SLOs are parsed and checked there
    return job_from_dict(data, source="kvray exp5")


def dry_run_rows(job: Job) -> list[dict[str, Any]]:
    """Each cell the job would run, with the memory the pre-flight OOM check predicts for it."""
    from kvray.hardware.gpus import match_gpu
    from kvray.model.oom import check_oom_risk
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


# --- exp6: KV reuse and pressure (its workload builders: kvray/plan/reuse.py) ---------------------------------


def exp6_grid(shared_prefix_toks: list[int], total_prompt_toks: int, concurrency: int, gen_toks: int,
              conversations: int, turns: int, user_toks: int, turn_gen_toks: int,
              pressure_concurrency: list[int], pressure_prompt_toks: int, pressure_gen_toks: int) -> list[dict[str, Any]]:  # fmt: skip
    """exp6's grid blocks, in the job file's own keys (``workload: shared_prefix`` / ``multi_turn``):

    - the same total prompt with a shared prefix of each of ``shared_prefix_toks`` (and 0: a uniform block), so
      TTFT and hit rate can be drawn against the shared fraction;
    - ``conversations`` × ``turns`` multi-turn chats;
    - a KV-pressure sweep: ``pressure_concurrency`` requests of ``pressure_prompt_toks`` + ``pressure_gen_toks``
      (long outputs grow the running set's KV until a small pool fills and the engine preempts).
    """
    for flag, value in (("--prompt-toks", total_prompt_toks), ("--concurrency", concurrency), ("--gen-toks", gen_toks),
                        ("--conversations", conversations), ("--turns", turns), ("--user-toks", user_toks),
                        ("--turn-gen-toks", turn_gen_toks), ("--pressure-prompt-toks", pressure_prompt_toks),
                        ("--pressure-gen-toks", pressure_gen_toks)):  # fmt: skip
        _positive(flag, [value])
    if pressure_concurrency:
        _positive("--pressure-concurrency", list(pressure_concurrency))
    bad = [p for p in shared_prefix_toks if not 0 < p < total_prompt_toks]
    if bad:
        raise KvrayInputError(
            f"--prefix-toks must be within 1..{total_prompt_toks - 1} (the total prompt), got {bad[0]}"
        )
    blocks: list[dict[str, Any]] = [
        {"prompt_toks": [total_prompt_toks], "gen_toks": [gen_toks], "concurrency": [concurrency]}
    ]
    blocks += [
        {
            "workload": "shared_prefix",
            "prefix_toks": [p],
            "suffix_toks": [total_prompt_toks - p],
            "groups": [1],
            "gen_toks": [gen_toks],
            "concurrency": [concurrency],
        }  # fmt: skip
        for p in sorted(set(shared_prefix_toks))
    ]
    blocks.append({"workload": "multi_turn", "conversations": [conversations], "turns": [turns],
                   "user_toks": [user_toks], "gen_toks": [turn_gen_toks]})  # fmt: skip
    if pressure_concurrency:
        blocks.append({"prompt_toks": [pressure_prompt_toks], "gen_toks": [pressure_gen_toks],
                       "concurrency": sorted(set(pressure_concurrency))})  # fmt: skip
    return blocks


def exp6_job(common: Any, grid: list[dict[str, Any]]) -> Any:
    """exp6 — KV reuse and pressure — as a Job, parsed from the job-file mapping so it means exactly what
    jobs/exp6_kv_reuse.yaml means (``common`` is a Common)."""
    from kvray.plan.job import job_from_dict

    mapping = {
        "name": common.name or job_name("exp6", common.model), "description": "kvray exp6", "experiment": "exp6",
        "models": [common.model], "backends": list(common.backends), "dtypes": [common.dtype],
        "weights": common.weights, "kv_dtype": common.kv_dtype, "device": common.device,
        "hardware": common.hardware, "warmup": common.warmup, "repeats": common.repeats,
        "options": dict(common.options), "grid": grid,
    }  # fmt: skip
    return job_from_dict({k: v for k, v in mapping.items() if v is not None}, source="kvray exp6")
