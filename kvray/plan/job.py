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
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.spec import WEIGHTS

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HARDWARE_MODES = ("any", "each")


@dataclass(frozen=True)
class Grid:
    """One block of workloads; uniform cells from the product of the lists, plus any mixed workloads."""

    gen_toks: tuple[int, ...]
    prompt_toks: tuple[int, ...] = ()
    concurrency: tuple[int, ...] = (1,)
    mixed: tuple[tuple[int, ...], ...] = ()
    arrival_gap_s: tuple[float, ...] = (0.0,)
    experiment: str | None = None  # None → the job's experiment

    @property
    def longest_prompt_toks(self) -> int:
        return max([*self.prompt_toks, *(p for lengths in self.mixed for p in lengths)], default=0)


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
        return d


def _grid_to_dict(g: Grid) -> dict[str, Any]:
    d: dict[str, Any] = {"gen_toks": list(g.gen_toks)}
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
)  # fmt: skip
GRID_KEYS = ("experiment", "prompt_toks", "gen_toks", "concurrency", "mixed", "arrival_gap_s")


class _Checker:
    """Builds one-line errors that name the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str) -> KvrayInputError:
        where = f"{self.source}: {key}: " if key else f"{self.source}: "
        return KvrayInputError(where + message)

    def string(self, key: str, value: Any, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(key, f"expected a {'' if allow_empty else 'non-empty '}string, got {value!r}")
        return value.strip()

    def choice(self, key: str, value: Any, allowed: tuple[str, ...] | list[str]) -> str:
        if value not in allowed:
            raise self.fail(key, f"got {value!r} (allowed: {', '.join(allowed)})")
        return str(value)

    def int_(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, value: Any, minimum: float, strict: bool = False) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or value < minimum or (strict and value == minimum):
            raise self.fail(key, f"expected a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return float(value)

    def listed(self, key: str, value: Any) -> list[Any]:
        """A list, or a scalar standing for a list of one; never empty."""
        items = value if isinstance(value, list) else [value]
        if not items or value is None:
            raise self.fail(key, "expected a non-empty list")
        return items

    def ints(self, key: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
        items = self.listed(key, value)
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or v < minimum]
        if bad:
            raise self.fail(key, f"expected integers >= {minimum}, got {bad[0]!r}")
        return tuple(items)

    def numbers(self, key: str, value: Any) -> tuple[float, ...]:
        items = self.listed(key, value)
        return tuple(self.number(f"{key}[{i}]", v, 0.0) for i, v in enumerate(items))

    def mapping(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of keys ({', '.join(allowed)}), got {value!r}")
        for k in value:
            if k not in allowed:
                prefix = f"{key}." if key else ""
                raise self.fail(f"{prefix}{k}", f"unknown key (allowed: {', '.join(allowed)})")
        return value


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


def job_from_dict(data: Any, source: str = "<job>", text: str = "") -> Job:
    """Validate a job mapping (as read from YAML) into a Job."""
    from kvray.backends import backend_names
    from kvray.model.kvmath import normalize_dtype

    c = _Checker(source)
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
    weights = c.choice("weights", d.get("weights", "random"), WEIGHTS)
    device = c.string("device", d.get("device", "auto")).lower()
    if not DEVICE_PATTERN.match(device):
        raise c.fail("device", f"got {device!r} (allowed: auto, cpu, cuda, cuda:N)")
    hardware = _hardware(c, d.get("hardware", "any"), backends)
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise c.fail("options", f"expected a mapping of backend knobs (e.g. ttft_s: 0.05), got {options!r}")
    for k, v in options.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, str | int | float | bool)):
            raise c.fail(f"options.{k}", f"expected a string, number or boolean, got {v!r}")
    _check_options(c, backends, options)
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
    if weights == "pretrained":
        from kvray.model.resolve import check_pretrained_weights

        for i, model in enumerate(models):
            try:
                check_pretrained_weights(model, network=False)  # the workers may have the network
            except KvrayInputError as exc:
                raise c.fail(f"models[{i}]", str(exc)) from None
    return job


def _check_options(c: _Checker, backends: list[str], options: dict[str, Any]) -> None:
    """Each backend checks the form of the options it reads (openai needs base_url, ollama host, …)."""
    from kvray.backends import validate_backend

    for backend in backends:
        try:
            validate_backend(backend, {k: v for k, v in options.items() if v is not None})
        except KvrayInputError as exc:
            raise c.fail("options", str(exc)) from None


def _hardware(c: _Checker, value: Any, backends: list[str]) -> str | list[str]:
    from kvray.backends import backend_class

    if isinstance(value, str) and value in HARDWARE_MODES:
        return value
    items = [c.string(f"hardware[{i}]", h) for i, h in enumerate(c.listed("hardware", value))]
    for backend in backends:  # e.g. the simulator's hardware is a GPU from its table, not a Ray accelerator type
        for i, h in enumerate(items):
            try:
                backend_class(backend).validate_hardware(h)
            except KvrayInputError as exc:
                raise c.fail(f"hardware[{i}]", str(exc)) from None
    if len(set(items)) != len(items):
        raise c.fail("hardware", f"lists a type twice: {items}")
    return items


def _grids(c: _Checker, value: Any) -> list[Grid]:
    blocks = value if isinstance(value, list) else [value]
    if not blocks:
        raise c.fail("grid", "expected a mapping or a non-empty list of mappings")
    grids = []
    for i, block in enumerate(blocks):
        key = f"grid[{i}]" if isinstance(value, list) else "grid"
        g = c.mapping(key, block, GRID_KEYS)
        if "gen_toks" not in g:
            raise c.fail(f"{key}.gen_toks", "required key is missing")
        if "prompt_toks" not in g and "mixed" not in g:
            raise c.fail(key, "needs prompt_toks (uniform workloads) or mixed (lists of prompt lengths)")
        if "concurrency" in g and "prompt_toks" not in g:
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
        grids.append(
            Grid(
                gen_toks=c.ints(f"{key}.gen_toks", g["gen_toks"]),
                prompt_toks=c.ints(f"{key}.prompt_toks", g["prompt_toks"]) if "prompt_toks" in g else (),
                concurrency=c.ints(f"{key}.concurrency", g.get("concurrency", [1])),
                mixed=mixed,
                arrival_gap_s=c.numbers(f"{key}.arrival_gap_s", g.get("arrival_gap_s", [0.0])),
                experiment=None if experiment is None else c.string(f"{key}.experiment", experiment, True),
            )
        )
    return grids


def _check_lengths(c: _Checker, job: Job) -> None:
    """Every model must hold the longest prompt plus its generated tokens (positions P + G − 1)."""
    from kvray.model.kvmath import cached_positions
    from kvray.model.resolve import resolve_geometry

    for i, model in enumerate(job.models):
        try:
            limit = resolve_geometry(model).max_position_embeddings
        except KvrayInputError as exc:
            raise c.fail(f"models[{i}]", str(exc)) from None
        for j, g in enumerate(job.grids):
            prompt, gen = g.longest_prompt_toks, max(g.gen_toks)
            needed = cached_positions(prompt, gen)
            if needed > limit:
                key = f"grid[{j}]" if len(job.grids) > 1 else "grid"
                raise c.fail(
                    key,
                    f"prompt_toks {prompt} + gen_toks {gen} needs {needed} positions but {model} allows "
                    f"{limit} (max_position_embeddings); allowed: prompt + gen − 1 <= {limit}",
                )
