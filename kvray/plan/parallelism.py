"""exp7 — tensor-parallel scaling — as a Job: the same workload at TP 1, 2, 4, 8 on each GPU type.

What it answers: how TTFT and TPOT fall with the TP degree, how throughput per GPU falls with it, how many KV
tokens each GPU holds (KV heads split, replicated past the KV-head count, MLA's latent whole), and where TP stops
paying (kvray/figures/parallelism.py). On the sim backend it runs in seconds and needs no GPU; on vllm it
measures, each TP=N cell on a worker holding N GPUs of one node (kvray/sweep/placement.py). Degrees the model's
heads do not allow (vLLM refuses them) are dropped with a note.
"""

from __future__ import annotations

from typing import Any

from kvray.errors import KvrayInputError

EXP7_TP = (1, 2, 4, 8)
EXP7_GPUS = ("H100-SXM", "A100-80GB-SXM")  # sim's default hardware for exp7: NVLink 4 vs NVLink 3


def exp7_job(common: Any, prompt_toks: int = 1024, gen_toks: int = 128,
             concurrency: list[int] | None = None) -> tuple[Any, list[str]]:  # fmt: skip
    """(the Job, notes): ``common.tensor_parallel`` degrees (TP 1/2/4/8 when left at [1]) × ``concurrency``
    (1 8 32) on each GPU type; the sim backend alone defaults to H100-SXM and A100-80GB-SXM, paged layout
    (vLLM's continuous batching)."""
    import dataclasses

    from kvray.model.parallel import check_tensor_parallel
    from kvray.model.resolve import resolve_geometry
    from kvray.plan.experiments import job_name

    concurrency = sorted(set(concurrency or [1, 8, 32]))
    for flag, values in (("--concurrency", concurrency), ("--prompt-toks", [prompt_toks]), ("--gen-toks", [gen_toks])):
        if any(v <= 0 for v in values):
            raise KvrayInputError(f"{flag} values must be positive, got {' '.join(map(str, values))}")
    degrees = list(common.tensor_parallel) if list(common.tensor_parallel) != [1] else list(EXP7_TP)
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
    options = dict(common.options)
    hardware = common.hardware
    if set(common.backends) == {"sim"}:
        options.setdefault("layout", "paged")
        if hardware == "any":
            hardware = list(EXP7_GPUS)
    common = dataclasses.replace(common, hardware=hardware, options=options)
    mapping = {
        "name": common.name or job_name("exp7", common.model), "description": "kvray exp7", "experiment": "exp7",
        "models": [common.model], "backends": list(common.backends), "dtypes": [common.dtype],
        "weights": common.weights, "kv_dtype": common.kv_dtype, "device": common.device,
        "hardware": common.hardware, "tensor_parallel": allowed, "warmup": common.warmup,
        "repeats": common.repeats, "options": options,
        "grid": {"prompt_toks": [prompt_toks], "gen_toks": [gen_toks], "concurrency": concurrency},
    }  # fmt: skip
    from kvray.plan.job import job_from_dict

    return job_from_dict({k: v for k, v in mapping.items() if v is not None}, source="kvray exp7"), notes
