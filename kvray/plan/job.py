"""Job files (``jobs/*.yaml``): what a sweep measures, checked completely before anything starts.

A job names models, backends, dtypes, a weights mode, one or more grids of workloads and where to run.
Every mistake — an unknown key, a wrong type, a length beyond the model's positions, an unknown backend —
is one KvrayInputError naming the file, the key and what is allowed, so ``kvray run`` exits 2 before Ray
or any model starts. The planner (kvray/plan/planner.py) turns a Job into cells.

    name: quickstart                  # results go to results/<name> (default: the file's stem)
    models: [kvray/tiny-llama]
    backends: [hf]                    # hf | synthetic | sim (| whatever kvray.backends registers)
    dtypes: [fp32]
    weights: random                   # random | pretrained
    hardware: any                     # any | each | [A100, H100]: each cell once per listed type
    tensor_parallel: [1]              # GPUs of one node each model is split over: [1, 2, 4, 8] sweeps TP
    clients: 1                        # server backends: send each cell's load from K Ray actors (default 1)
    warmup: 1
    repeats: 2
    grid:                             # one mapping or a list of them
      - experiment: exp1              # Cell.experiment, groups rows for figures
        prompt_toks: [64, 256]        # uniform workloads: prompt × gen × concurrency × arrival gap
        gen_toks: [16]
        concurrency: [1, 2, 4]
        arrival_gap_s: [0.0]          # seconds between request arrivals
      - mixed: [[128, 128, 128, 1024]]  # mixed workloads: one request per listed prompt length
        gen_toks: [16]
      - experiment: exp5              # a serving load (kvray/plan/loads.py) instead of one burst per cell
        prompt_dist: {kind: lognormal, median: 256, sigma: 0.8, max: 2048}   # or prompt_toks: [256]
        gen_toks: [64]
        load: {kind: poisson, rates: [2, 4, auto], requests: 200, seed: 0}   # closed: users: [1, 4, 16]
        slo: {ttft_ms: 500, tpot_ms: 50}

One piece on purpose (over 500 lines): every key's check reports through one ``Checker`` with the file and
key path, and the whole schema above is checked in one pass, so the complete set of rules reads top to bottom.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvray.backends import backend_class, backend_names
from kvray.errors import KvrayInputError
from kvray.model.kvmath import cached_positions, normalize_dtype
from kvray.model.resolve import resolve_geometry
from kvray.plan.job_checks import (
    Checker,
    check_clients_count,
    check_hardware,
    check_options,
    check_tensor_parallel_degrees,
)
from kvray.plan.loads import length_params, parse_slo, request_count
from kvray.plan.replay import grid_workloads, trace_grid, trace_grid_dict
from kvray.spec import LOAD_KINDS, WEIGHTS, LoadSpec

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Grid:
    """One block of workloads; uniform cells from the product of the lists, plus any mixed workloads."""

    gen_toks: tuple[int, ...]
    prompt_toks: tuple[int, ...] = ()
    concurrency: tuple[int, ...] = (1,)
    mixed: tuple[tuple[int, ...], ...] = ()
    arrival_gap_s: tuple[float, ...] = (0.0,)
    experiment: str | None = None  # None → the job's experiment
    # serving loads (kvray/plan/loads.py): one LoadSpec per rate / user count; () = bursts, as before
    loads: tuple[LoadSpec, ...] = ()
    slo: tuple[tuple[str, float], ...] = ()
    prompt_dist: tuple[tuple[str, Any], ...] = ()  # a length distribution instead of prompt_toks
    gen_dist: tuple[tuple[str, Any], ...] = ()  # … instead of gen_toks
    load_source: tuple[tuple[str, Any], ...] = ()  # the ``load`` mapping as written (round-trips to_dict)
    # KV-reuse workloads (kvray/plan/reuse.py): ("workload", "shared_prefix" | "multi_turn") and their lists
    reuse: tuple[tuple[str, Any], ...] = ()

    @property
    def longest_prompt_toks(self) -> int:
        reuse = dict(self.reuse)
        if reuse.get("workload") == "shared_prefix":
            return max(reuse["prefix_toks"]) + max(reuse["suffix_toks"])
        if reuse.get("workload") == "multi_turn":  # the last turn: every earlier message and answer, then its own
            return max(reuse["turns"]) * max(reuse["user_toks"]) + (max(reuse["turns"]) - 1) * max(self.gen_toks)
        dist = int(dict(self.prompt_dist).get("max", 0))
        return max([*self.prompt_toks, dist, *(p for lengths in self.mixed for p in lengths)], default=0)

    @property
    def longest_gen_toks(self) -> int:
        return max([*self.gen_toks, int(dict(self.gen_dist).get("max", 0))])


@dataclass
class Job:
    """A parsed, validated job. Build one in code (then call ``validate``) or with ``load_job``."""

    name: str
    models: list[str]
    grids: list[Grid]
    backends: list[str] = field(default_factory=lambda: ["hf"])
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    weights: str = "random"
    kv_dtype: str | None = None
    device: str = "auto"
    hardware: str | list[str] = "any"  # "any" | "each" | accelerator types (sim: GPU names)
    tensor_parallel: list[int] = field(default_factory=lambda: [1])  # TP degrees: each cell once per degree
    clients: int = 1  # server backends: Ray actors each cell's load is sent from (kvray/backends/http/clients.py)
    warmup: int = 1
    repeats: int = 3
    experiment: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # backend knobs, the same for every cell
    workers: int | None = None  # at most this many workers per kind (default: one per GPU, one on CPU)
    max_attempts: int = 2  # a cell whose worker dies is run at most this many times, then recorded "error"
    cell_timeout_s: float = 3600.0  # a cell running longer is recorded "error" and its worker replaced
    description: str = ""
    source: str = "<job>"  # the file it came from
    text: str = ""  # the file's contents, kept for the manifest

    def validate(self) -> Job:
        """Check every field (as ``load_job`` does for files); returns self so calls chain."""
        return job_from_dict(self.to_dict(), source=self.source, text=self.text)

    def to_dict(self) -> dict[str, Any]:
        """The job as a job-file mapping (round-trips through ``job_from_dict``)."""
        d = asdict(self)
        for key in ("source", "text"):
            d.pop(key)
        d["grid"] = [_grid_to_dict(g) for g in self.grids]
        d.pop("grids")
        if d["tensor_parallel"] == [1]:
            d.pop("tensor_parallel")  # a job without TP hashes as it did before the key existed
        if d["clients"] == 1:
            d.pop("clients")  # … and one without client actors as before that key
        return d


def _grid_to_dict(g: Grid) -> dict[str, Any]:
    if dict(g.reuse).get("workload") in ("trace", "sessions"):
        return trace_grid_dict(g)
    d: dict[str, Any] = {"gen_toks": list(g.gen_toks)} if g.gen_toks else {"gen_dist": dict(g.gen_dist)}
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in g.reuse})
    if g.reuse and dict(g.reuse)["workload"] == "shared_prefix":
        d["concurrency"] = list(g.concurrency)
    if g.prompt_dist:
        d["prompt_dist"] = dict(g.prompt_dist)
        d["concurrency"] = list(g.concurrency)
    if g.load_source:
        d["load"] = dict(g.load_source)
    if g.slo:
        d["slo"] = dict(g.slo)
    if g.prompt_toks:
        d["prompt_toks"] = list(g.prompt_toks)
        d["concurrency"] = list(g.concurrency)
    if g.mixed:
        d["mixed"] = [list(m) for m in g.mixed]
    d["arrival_gap_s"] = list(g.arrival_gap_s)
    if g.experiment is not None:
        d["experiment"] = g.experiment
    return d


JOB_KEYS = (
    "name", "description", "models", "backends", "dtypes", "weights", "kv_dtype", "device", "hardware",
    "warmup", "repeats", "experiment", "options", "workers", "max_attempts", "cell_timeout_s", "grid",
    "tensor_parallel", "clients",
)  # fmt: skip
GRID_KEYS = (
    "experiment", "prompt_toks", "gen_toks", "concurrency", "mixed", "arrival_gap_s", "load", "slo", "prompt_dist",
    "gen_dist", "workload", "prefix_toks", "suffix_toks", "groups", "conversations", "turns", "user_toks", "think_s",
    "trace", "sessions",
)  # fmt: skip
# workload kind → (its required list keys, its optional ones with defaults) — kvray/plan/reuse.py builds them
REUSE_KEYS: dict[str, tuple[tuple[str, ...], dict[str, list[Any]]]] = {
    "shared_prefix": (("prefix_toks", "suffix_toks"), {"groups": [1]}),
    "multi_turn": (("conversations", "turns", "user_toks"), {"think_s": [0.0]}),
}
SERVING_KEYS = ("load", "slo", "prompt_dist", "gen_dist")
LOAD_KEYS = ("kind", "rate", "rates", "users", "requests", "duration_s", "burstiness", "seed", "warmup_s", "cooldown_s")
# keys a block takes one of: a mixed block sets its own requests (no load, SLO or drawn lengths beside it)
CONFLICTS = (("prompt_toks", "prompt_dist"), ("gen_toks", "gen_dist"), *(("mixed", k) for k in SERVING_KEYS))


def load_job(path: str | Path) -> Job:
    """Read and validate a job file; every problem is one KvrayInputError naming the file and key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KvrayInputError(f"{p}: no such job file")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KvrayInputError(f"{p}: not valid YAML{where} ({problem})") from None
    if data is None:
        raise KvrayInputError(f"{p}: the job file is empty (needs at least models and grid)")
    data = dict(data) if isinstance(data, dict) else data
    if isinstance(data, dict):
        data.setdefault("name", p.stem)
    return job_from_dict(data, source=str(p), text=text)


def job_from_dict(data: Any, source: str = "<job>", text: str = "", *, flags: Mapping[str, str] | None = None) -> Job:
    """Validate a job mapping (as read from YAML) into a Job. ``flags``: the job was built from a command's flags
    (key path → flag, kvray/bench/cell.py), and its errors name those flags instead of the keys."""
    c = Checker(source, flags)
    d = c.mapping("", data, JOB_KEYS)
    for required in ("models", "grid"):
        if required not in d:
            raise c.fail(required, "required key is missing")
    if "name" not in d and not NAME_PATTERN.match(Path(source).stem):
        raise c.fail("name", "required key is missing")
    name = c.string("name", d.get("name", Path(source).stem))
    if not NAME_PATTERN.match(name):
        raise c.fail("name", f"{name!r} must be letters, digits, '.', '_' or '-' (it names the results folder)")
    models = [c.string(f"models[{i}]", m) for i, m in enumerate(c.listed("models", d["models"]))]
    backends = [
        c.choice(f"backends[{i}]", b, backend_names())
        for i, b in enumerate(c.listed("backends", d.get("backends", ["hf"])))
    ]
    dtypes = []
    for i, dt in enumerate(c.listed("dtypes", d.get("dtypes", ["bf16"]))):
        try:
            dtypes.append(normalize_dtype(c.string(f"dtypes[{i}]", dt), allow_fp8=False))
        except KvrayInputError as exc:
            raise c.fail(f"dtypes[{i}]", str(exc)) from None
    kv_dtype = d.get("kv_dtype")
    if kv_dtype is not None:
        try:
            kv_dtype = normalize_dtype(c.string("kv_dtype", kv_dtype))
        except KvrayInputError as exc:
            raise c.fail("kv_dtype", str(exc)) from None
    weights = c.choice("weights", d.get("weights", "random"), WEIGHTS, what="weights")
    device = c.string("device", d.get("device", "auto")).lower()
    if not DEVICE_PATTERN.match(device):
        raise c.fail("device", f"unknown device {device!r} (allowed: auto, cpu, cuda, cuda:N)")
    hardware = check_hardware(c, d.get("hardware", "any"), backends)
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise c.fail("options", f"expected a mapping of backend knobs (e.g. ttft_s: 0.05), got {options!r}")
    for k, v in options.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
            raise c.fail(f"options.{k}", f"expected a string, number or boolean, got {v!r}")
    check_options(c, backends, options)
    workers = d.get("workers")
    job = Job(
        name=name,
        description=c.string("description", d.get("description", ""), allow_empty=True),
        models=models,
        backends=backends,
        dtypes=dtypes,
        weights=weights,
        kv_dtype=kv_dtype,
        device=device,
        hardware=hardware,
        tensor_parallel=check_tensor_parallel_degrees(c, d.get("tensor_parallel", [1]), models),
        clients=check_clients_count(c, d.get("clients", 1), backends),
        warmup=c.int_("warmup", d.get("warmup", 1), 0),
        repeats=c.int_("repeats", d.get("repeats", 3), 1),
        experiment=c.string("experiment", d.get("experiment", ""), allow_empty=True),
        options=dict(options),
        workers=None if workers is None else c.int_("workers", workers, 1),
        max_attempts=c.int_("max_attempts", d.get("max_attempts", 2), 1),
        cell_timeout_s=c.number("cell_timeout_s", d.get("cell_timeout_s", 3600.0), 0.0, strict=True),
        grids=_grids(c, d["grid"]),
        source=source,
        text=text,
    )
    _check_lengths(c, job)
    if weights == "pretrained" and any(loads_weights(b) for b in backends):
        from kvray.model.resolve import check_pretrained_weights

        for i, model in enumerate(models):
            try:
                check_pretrained_weights(model, network=False)  # the workers may have the network
            except KvrayInputError as exc:
                raise c.fail(f"models[{i}]", str(exc)) from None
    return job


def _grids(c: Checker, value: Any) -> list[Grid]:
    blocks = value if isinstance(value, list) else [value]
    if not blocks:
        raise c.fail("grid", "expected a mapping or a non-empty list of mappings")
    grids = []
    for i, block in enumerate(blocks):
        key = f"grid[{i}]" if isinstance(value, list) else "grid"
        g = c.mapping(key, block, GRID_KEYS)
        if "trace" in g or "sessions" in g:  # a replayed trace or sessions (kvray/plan/replay.py) set the requests
            grids.append(Grid(**trace_grid(g, key, c.fail, Path(c.source).parent)))
            continue
        reuse = _reuse(c, key, g)
        if reuse:
            g = {**g, "prompt_toks": g.get("prompt_toks", [1])}  # the reuse builder sets the prompts
        if "gen_toks" not in g and "gen_dist" not in g:
            raise c.fail(f"{key}.gen_toks", "required key is missing")
        if "prompt_toks" not in g and "mixed" not in g and "prompt_dist" not in g:
            raise c.fail(key, "needs prompt_toks (uniform workloads), prompt_dist or mixed (lists of prompt lengths)")
        for a, b in CONFLICTS:
            if a in g and b in g:
                names = (a, b) if not c.flags else (c.name(f"{key}.{a}"), c.name(f"{key}.{b}"))
                raise c.fail(f"{key}.{b}", f"give {names[0]} or {names[1]}, not both")
        if "concurrency" in g and "prompt_toks" not in g and "prompt_dist" not in g:
            raise c.fail(f"{key}.concurrency", "needs prompt_toks beside it (mixed workloads set their own size)")
        mixed: tuple[tuple[int, ...], ...] = ()
        if "mixed" in g:
            entries = g["mixed"] if isinstance(g["mixed"], list) else [g["mixed"]]
            if entries and not isinstance(entries[0], list):
                entries = [entries]  # a single list of lengths
            if not entries:
                raise c.fail(f"{key}.mixed", "expected a list of prompt-length lists, e.g. [[128, 128, 4096]]")
            mixed = tuple(c.ints(f"{key}.mixed[{j}]", m) for j, m in enumerate(entries))
        experiment = g.get("experiment")
        concurrency = c.ints(f"{key}.concurrency", g.get("concurrency", [1]))
        gaps = c.numbers(f"{key}.arrival_gap_s", g.get("arrival_gap_s", [0.0]))
        loads = _loads(c, f"{key}.load", g["load"], concurrency) if "load" in g else ()
        if any(gaps) and any(spec.kind != "burst" for spec in loads):
            raise c.fail(f"{key}.arrival_gap_s", "spaces a burst's requests; a load sets its own arrivals")
        grids.append(
            Grid(
                reuse=reuse,
                loads=loads,
                load_source=tuple(sorted(g["load"].items())) if isinstance(g.get("load"), dict) else (),
                slo=tuple(sorted(_slo(c, f"{key}.slo", g["slo"]).items())) if "slo" in g else (),
                prompt_dist=_dist(c, f"{key}.prompt_dist", g["prompt_dist"], "prompt") if "prompt_dist" in g else (),
                gen_dist=_dist(c, f"{key}.gen_dist", g["gen_dist"], "gen") if "gen_dist" in g else (),
                gen_toks=c.ints(f"{key}.gen_toks", g["gen_toks"]) if "gen_toks" in g else (),
                prompt_toks=c.ints(f"{key}.prompt_toks", g["prompt_toks"]) if "prompt_toks" in g and not reuse else (),
                concurrency=concurrency,
                mixed=mixed,
                arrival_gap_s=gaps,
                experiment=None if experiment is None else c.string(f"{key}.experiment", experiment, True),
            )
        )
    return grids


def _reuse(c: Checker, key: str, g: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A block's ``workload: shared_prefix | multi_turn`` and its keys, checked (() for a plain block)."""
    all_keys = {k for required, optional in REUSE_KEYS.values() for k in (*required, *optional)}
    kind = g.get("workload", "uniform")
    if kind == "uniform":
        stray = sorted(all_keys & set(g))
        if stray:
            raise c.fail(f"{key}.{stray[0]}", "belongs to workload: shared_prefix or multi_turn")
        return ()
    kind = c.choice(f"{key}.workload", kind, ("uniform", *REUSE_KEYS))
    required, optional = REUSE_KEYS[kind]
    for k in ("prompt_toks", "mixed", "prompt_dist", "gen_dist", *(all_keys - {*required, *optional})):
        if k in g:
            raise c.fail(f"{key}.{k}", f"does not apply to workload: {kind} (it sets the prompts itself)")
    if kind == "multi_turn" and ("load" in g or "concurrency" in g):
        raise c.fail(
            f"{key}.{'load' if 'load' in g else 'concurrency'}",
            "multi_turn sets its own arrivals: each turn is sent when the previous one ends",
        )
    out: list[tuple[str, Any]] = [("workload", kind)]
    for k in required:
        if k not in g:
            raise c.fail(f"{key}.{k}", f"required for workload: {kind}")
        out.append((k, c.ints(f"{key}.{k}", g[k])))
    for k, default in optional.items():
        values = g.get(k, default)
        out.append((k, c.numbers(f"{key}.{k}", values) if k == "think_s" else c.ints(f"{key}.{k}", values)))
    return tuple(out)


def _loads(c: Checker, key: str, value: Any, concurrency: tuple[int, ...]) -> tuple[LoadSpec, ...]:
    """A grid's ``load`` mapping → one LoadSpec per rate (``rates`` list, or ``auto``: a search) and user count
    (``users``, a closed loop's; default: the grid's ``concurrency``)."""
    m = c.mapping(key, value, LOAD_KEYS)
    kind = c.choice(f"{key}.kind", m.get("kind", "burst"), LOAD_KINDS)
    if "rate" in m and "rates" in m:
        raise c.fail(f"{key}.rates", "give rate or rates, not both")
    raw = m.get("rates", m.get("rate"))
    rates: list[float | str | None] = [None]  # "auto": a saturation search (kvray/runner/saturation.py)
    if raw is not None:
        rates = [
            r if r == "auto" else c.number(f"{key}.rates[{i}]", r, 0.0, strict=True)
            for i, r in enumerate(c.listed(f"{key}.rates", raw))
        ]
    if kind in ("burst", "closed") and raw is not None:
        raise c.fail(f"{key}.rate", f"a rate applies to open loops (poisson, gamma, constant), not {kind}")
    users = c.ints(f"{key}.users", m["users"]) if "users" in m else concurrency
    if "users" in m and kind != "closed":
        raise c.fail(f"{key}.users", f"users belong to a closed loop, not {kind}")
    common: dict[str, Any] = {}
    if "requests" in m:
        common["requests"] = c.int_(f"{key}.requests", m["requests"], 1)
    for name in ("duration_s", "burstiness"):
        if name in m:
            common[name] = c.number(f"{key}.{name}", m[name], 0.0, strict=True)
    for name in ("warmup_s", "cooldown_s"):
        if name in m:
            common[name] = c.number(f"{key}.{name}", m[name], 0.0)
    if "seed" in m:
        common["seed"] = c.int_(f"{key}.seed", m["seed"], 0)
    specs = []
    try:
        for rate in rates:
            for n in users if kind == "closed" else (None,):
                search = "saturation" if rate == "auto" else None
                rate_rps = rate if isinstance(rate, float) else None
                spec = LoadSpec(kind=kind, rate_rps=rate_rps, users=n, search=search, **common)
                request_count(spec, max(concurrency))  # requests or duration given, as the load needs
                specs.append(spec)
    except KvrayInputError as exc:
        raise c.fail(key, str(exc)) from None
    return tuple(specs)


def _slo(c: Checker, key: str, value: Any) -> dict[str, float]:
    try:
        return parse_slo(value, c.name(key))
    except KvrayInputError as exc:
        raise c.fail("", str(exc)) from None


def _dist(c: Checker, key: str, value: Any, side: str) -> tuple[tuple[str, Any], ...]:
    try:
        params = length_params(value, c.name(key), side)
    except KvrayInputError as exc:
        raise c.fail("", str(exc)) from None
    if "max" not in params and params["kind"] != "fixed":
        raise c.fail(
            key, "a drawn length distribution needs max: the model's positions are checked against it (…,max=2048)"
        )
    return tuple(sorted(params.items()))


def loads_weights(backend: str) -> bool:
    """The backend loads the model here (not a server's, not simulated): its geometry and weights must exist."""
    engine = backend_class(backend)
    return engine.needs_model_geometry and not engine.simulated


def _longest(grid: Grid) -> tuple[int, int]:
    """The longest prompt and output a block sends; a replayed trace's (or sessions') as the planner builds them."""
    if dict(grid.reuse).get("workload") in ("trace", "sessions"):
        requests = [r for workload in grid_workloads(grid) for r in workload.requests]
        return max(r.prompt_toks for r in requests), max(r.gen_toks for r in requests)
    return grid.longest_prompt_toks, grid.longest_gen_toks


def _check_lengths(c: Checker, job: Job) -> None:
    """Every model must hold the longest prompt plus its generated tokens (positions P + G − 1). A model kvray
    cannot resolve passes only when every backend is a server's (it may serve a model kvray does not know)."""
    for i, model in enumerate(job.models):
        try:
            limit = resolve_geometry(model).max_position_embeddings
        except KvrayInputError as exc:
            if not any(backend_class(b).needs_model_geometry for b in job.backends):
                continue
            raise c.fail(f"models[{i}]", str(exc)) from None
        for j, g in enumerate(job.grids):
            prompt, gen = _longest(g)
            needed = cached_positions(prompt, gen)
            if needed > limit:
                key = f"grid[{j}]" if len(job.grids) > 1 else "grid"
                lengths = " + ".join(
                    f"{c.name(f'{key}.{side}_dist')} max {n}" if dist else f"{c.name(f'{key}.{side}_toks')} {n}"
                    for side, n, dist in (("prompt", prompt, g.prompt_dist), ("gen", gen, g.gen_dist))
                )
                raise c.fail(
                    key,
                    f"{lengths} need {needed} positions, more than {model}'s max_position_embeddings ({limit}); "
                    f"allowed: prompt + gen − 1 <= {limit}",
                )
