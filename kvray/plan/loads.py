"""Serving loads: when requests arrive (burst, closed loop, Poisson, gamma, constant) and how long they are.

A load is turned into concrete requests here, once, seeded — so a cell's arrivals and lengths are part of
the cell (its id, its row) and a rerun sends exactly the same schedule. Open loops become arrival offsets;
a closed loop becomes chains (each user's next request names the one before it in ``after``), resolved at
run time by kvray/backends/arrivals.py.

Lengths are fixed, or drawn per request from a distribution, clipped to [min, max]:

    {kind: uniform, min: 64, max: 512}
    {kind: normal, mean: 256, std: 64, min: 16, max: 1024}
    {kind: lognormal, median: 256, sigma: 0.8, min: 16, max: 4096}
    {kind: sharegpt}                   # a bundled chat workload (DATASETS): prompt and output lengths

Bundled workloads carry the statistic a paper published (a mean or a median, named with its source); the
lognormal's spread is not in those papers, so ``sigma`` is an assumption, written in the row as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvray.errors import KvrayInputError
from kvray.spec import LOAD_KINDS as LOAD_KINDS_ALL
from kvray.spec import OPEN_LOOPS, LengthSpec, LoadSpec, RequestSpec, Workload


@dataclass(frozen=True)
class PublishedLengths:
    """A chat workload's published token-length statistics (one statistic each for prompt and output)."""

    prompt: float
    output: float
    statistic: str  # "mean" | "median": what the source published
    source: str
    sigma_assumed: float = 1.0  # lognormal σ: not published by the source, an assumption


DATASETS: dict[str, PublishedLengths] = {
    "sharegpt": PublishedLengths(161.31, 337.99, "mean", "Kwon et al., vLLM (SOSP 2023), §6.1: ShareGPT"),
    "alpaca": PublishedLengths(19.31, 58.45, "mean", "Kwon et al., vLLM (SOSP 2023), §6.1: Alpaca"),
    "lmsys-chat": PublishedLengths(69.5, 214.5, "mean", "Zheng et al., LMSYS-Chat-1M (ICLR 2024), Table 1"),
    "azure-conversation": PublishedLengths(
        1020, 129, "median", "Patel et al., Splitwise (ISCA 2024), §III: Azure conversation trace"
    ),
    "azure-code": PublishedLengths(1500, 13, "median", "Patel et al., Splitwise (ISCA 2024), §III: Azure coding trace"),
}
LENGTH_KINDS = ("fixed", "uniform", "normal", "lognormal", *DATASETS)
DEFAULT_CLOSED_REQUESTS_PER_USER = 100  # a closed loop given only a duration: at most this many per user


def _median(published: PublishedLengths, value: float) -> float:
    """The lognormal's median from the published statistic (mean = median · e^{σ²/2})."""
    return value if published.statistic == "median" else value / math.exp(published.sigma_assumed**2 / 2)


def length_params(value: Any, key: str, side: str) -> dict[str, Any]:
    """A length given as an int or a mapping → checked parameters ({"kind": "fixed", "value": 64} …)."""
    if isinstance(value, bool):
        raise KvrayInputError(f"{key}: expected a token count or a distribution mapping, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise KvrayInputError(f"{key}: token counts must be positive, got {value}")
        return {"kind": "fixed", "value": value}
    if isinstance(value, str) and value in DATASETS:
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise KvrayInputError(f"{key}: expected a token count or a mapping with kind ({', '.join(LENGTH_KINDS)})")
    kind = value["kind"]
    if kind not in LENGTH_KINDS:
        raise KvrayInputError(f"{key}: unknown length kind {kind!r} (known: {', '.join(LENGTH_KINDS)})")
    allowed = {
        "fixed": ("value",),
        "uniform": ("min", "max"),
        "normal": ("mean", "std", "min", "max"),
        "lognormal": ("median", "sigma", "min", "max"),
    }.get(kind, ("min", "max", "sigma"))
    extra = set(value) - {"kind", *allowed}
    if kind in DATASETS:  # the median and source this function sets for a bundled dataset, read back (a job's grid)
        extra -= {"median", "source"}
    if extra:
        raise KvrayInputError(f"{key}: unknown key(s) {sorted(extra)} for kind {kind} (allowed: {', '.join(allowed)})")
    params: dict[str, Any] = {"kind": kind}
    for name in allowed:
        if name not in value:
            continue
        v = value[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise KvrayInputError(f"{key}.{name}: expected a positive number, got {v!r}")
        params[name] = v
    required = {"fixed": ("value",), "uniform": ("min", "max"), "normal": ("mean", "std"), "lognormal": ("median",)}
    missing = [n for n in required.get(kind, ()) if n not in params]
    if missing:
        raise KvrayInputError(f"{key}: kind {kind} needs {', '.join(missing)}")
    if kind in DATASETS:
        published = DATASETS[kind]
        params.setdefault("sigma", published.sigma_assumed)
        params["median"] = round(_median(published, published.prompt if side == "prompt" else published.output), 3)
        params["source"] = f"{published.source} ({published.statistic}; σ {params['sigma']} assumed)"
    params.setdefault("min", 1)
    if "max" in params and params["max"] < params["min"]:
        raise KvrayInputError(f"{key}: max {params['max']} is below min {params['min']}")
    return params


def sample_lengths(params: Mapping[str, Any], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` token counts drawn from ``params`` (from ``length_params``), clipped to [min, max], at least 1."""
    kind = params["kind"]
    if kind == "fixed":
        return [int(params["value"])] * n
    values: Any
    if kind == "uniform":
        values = rng.integers(int(params["min"]), int(params["max"]) + 1, size=n)
    elif kind == "normal":
        values = rng.normal(float(params["mean"]), float(params["std"]), size=n)
    else:  # lognormal, or a bundled dataset's lognormal
        values = rng.lognormal(math.log(float(params["median"])), float(params.get("sigma", 1.0)), size=n)
    low = max(int(params.get("min", 1)), 1)
    high = int(params["max"]) if "max" in params else None
    clipped = [max(round(float(v)), low) for v in values]
    return [min(v, high) for v in clipped] if high is not None else clipped


def request_count(load: LoadSpec, concurrency: int) -> int:
    """How many requests a load sends (at most): given, or rate × duration, or users × a per-user cap."""
    if load.kind == "burst":
        return load.requests or concurrency
    if load.requests is not None:
        return load.requests
    if load.duration_s is None:
        raise KvrayInputError(f"a {load.kind} load needs requests or duration_s")
    if load.search is not None:
        raise KvrayInputError("a rate search (rate auto) needs requests: how many each probe sends")
    if load.kind == "closed":
        return int(load.users or 1) * DEFAULT_CLOSED_REQUESTS_PER_USER
    return max(1, math.ceil(float(load.rate_rps or 0) * load.duration_s))


def arrival_offsets(load: LoadSpec, n: int) -> list[float]:
    """Open-loop arrival offsets (seconds, the first at 0), seeded by ``load.seed``."""
    if load.kind in ("burst", "closed") or load.search is not None:  # a search sets each probe's rate itself
        return [0.0] * n
    rate = float(load.rate_rps or 0)
    rng = np.random.default_rng(load.seed)
    if load.kind == "constant":
        gaps = np.full(n, 1.0 / rate)
    elif load.kind == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    else:  # gamma: shape 1/burstiness, mean gap 1/rate (burstiness 1 is Poisson; > 1 burstier)
        shape = 1.0 / load.burstiness
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    offsets = np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    return [round(float(t), 6) for t in offsets]


def build_workload(
    load: LoadSpec,
    prompt: Any,
    gen: Any,
    concurrency: int = 1,
    slo: Mapping[str, float] | None = None,
    arrival_gap_s: float = 0.0,
) -> Workload:
    """The requests of one cell under ``load``: lengths fixed (ints) or drawn (mappings), arrivals scheduled.

    ``concurrency`` is the burst's size (a burst's ``requests`` overrides it); a closed loop's users are
    ``load.users``. Lengths and arrivals use separate seeded streams, so changing the rate keeps the lengths.
    """
    prompt_params = length_params(prompt, "prompt_toks", "prompt")
    gen_params = length_params(gen, "gen_toks", "gen")
    n = request_count(load, concurrency)
    rng = np.random.default_rng([load.seed, 1])
    prompts = sample_lengths(prompt_params, n, rng)
    gens = sample_lengths(gen_params, n, rng)
    offsets = arrival_offsets(load, n)
    users = int(load.users or 1)
    requests = []
    for i in range(n):
        after = i - users if load.kind == "closed" and i >= users else None
        arrival = round(i * arrival_gap_s, 6) if load.kind == "burst" else offsets[i]
        requests.append(RequestSpec(i, prompts[i], gens[i], arrival, after=after))
    check_window(load, [r.arrival_s for r in requests])
    fixed = prompt_params["kind"] == gen_params["kind"] == "fixed"
    lengths = (
        None
        if fixed
        else LengthSpec(tuple(sorted(prompt_params.items())), tuple(sorted(gen_params.items())), load.seed)
    )
    plain = load == LoadSpec(requests=load.requests) and load.requests in (None, concurrency)
    return Workload(
        "uniform" if fixed else "distribution",
        tuple(requests),
        load=None if plain else load,
        lengths=lengths,
        slo=tuple(sorted((slo or {}).items())),
    )


def apply_load(workload: Workload, load: LoadSpec, slo: tuple[tuple[str, float], ...] = ()) -> Workload:
    """A built workload's requests (their lengths and prefixes kept) scheduled by ``load``: open-loop arrivals
    or closed-loop chains; a plain burst leaves the workload as it was (its cell id too)."""
    import dataclasses

    n = len(workload.requests)
    if load.kind == "burst":
        return dataclasses.replace(workload, slo=slo) if slo else workload
    offsets = arrival_offsets(load, n)
    users = int(load.users or 1)
    requests = tuple(
        dataclasses.replace(r, arrival_s=offsets[i], after=i - users if load.kind == "closed" and i >= users else None)
        for i, r in enumerate(workload.requests)
    )
    return dataclasses.replace(workload, requests=requests, load=load, slo=slo)


SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def parse_slo(value: Any, key: str = "slo") -> dict[str, float]:
    """``{ttft_ms: 500, tpot_ms: 50}`` or "ttft_ms=500,tpot_ms=50" → a checked mapping."""
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, number = part.partition("=")
            if not sep:
                raise KvrayInputError(f"{key}: expected name=milliseconds pairs like ttft_ms=500, got {part!r}")
            try:
                pairs[name.strip()] = float(number)
            except ValueError:
                raise KvrayInputError(
                    f"{key}.{name.strip()}: expected a number of milliseconds, got {number!r}"
                ) from None
        value = pairs
    if not isinstance(value, Mapping) or not value:
        raise KvrayInputError(f"{key}: expected thresholds like {{ttft_ms: 500, tpot_ms: 50}}")
    out: dict[str, float] = {}
    for name, threshold in value.items():
        if name not in SLO_KEYS:
            raise KvrayInputError(f"{key}: unknown SLO {name!r} (known: {', '.join(SLO_KEYS)})")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
            raise KvrayInputError(f"{key}.{name}: expected a positive number of milliseconds, got {threshold!r}")
        if not math.isfinite(threshold):
            raise KvrayInputError(f"{key}.{name}: expected a finite number of milliseconds, got {threshold!r}")
        out[str(name)] = float(threshold)
    return out


def parse_dist(text: str, flag: str) -> dict[str, Any]:
    """``--prompt-dist lognormal:median=256,sigma=0.8,max=2048`` (or a bundled name, ``sharegpt``) → a mapping."""
    kind, _, rest = text.partition(":")
    params: dict[str, Any] = {"kind": kind.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        name, sep, number = part.partition("=")
        try:
            params[name.strip()] = float(number) if sep else None
        except ValueError:
            params[name.strip()] = None
        if params[name.strip()] is None:
            raise KvrayInputError(f"{flag}: expected name=number pairs after the kind, got {part!r}")
    length_params(params, flag, "prompt")  # checked now: one line before anything loads
    return params


def check_window(load: LoadSpec, arrivals: list[float]) -> None:
    """An open loop's ``warmup_s`` + ``cooldown_s`` must leave some of its arrivals measured (known once drawn;
    a rate search sets its probes' windows itself)."""
    trim = (load.warmup_s or 0.0) + (load.cooldown_s or 0.0)
    if not trim or load.kind not in OPEN_LOOPS or load.search is not None or not arrivals:
        return
    span = max(arrivals) - min(arrivals)
    if trim >= span:
        raise KvrayInputError(
            f"warmup_s + cooldown_s ({trim:g} s) leave no window: this load's arrivals span {span:.3g} s"
        )


def parse_load_flags(
    kind: str | None,
    rate: str | None,
    requests: int | None,
    duration_s: float | None,
    seed: int,
    *,
    warmup_s: float | None = None,
    cooldown_s: float | None = None,
) -> dict[str, Any] | None:
    """``kvray bench``'s load flags → the mapping ``bench_cell`` takes (None: no load flag given, a burst)."""
    if kind is None:
        if rate is not None or requests is not None or duration_s is not None:
            raise KvrayInputError("--rate, --requests and --duration-s need --load (closed, poisson, gamma, constant)")
        if warmup_s is not None or cooldown_s is not None:
            raise KvrayInputError(
                "--warmup-s and --cooldown-s trim a load's window: they need --load (closed, poisson, gamma, constant)"
            )
        return None
    if kind not in LOAD_KINDS_ALL:
        raise KvrayInputError(f"--load: unknown load kind {kind!r} (known: {', '.join(LOAD_KINDS_ALL)})")
    value: float | str | None = None
    if rate is not None:
        if rate == "auto":
            value = "auto"
        else:
            try:
                value = float(rate)
            except ValueError:
                raise KvrayInputError(f"--rate: expected requests/s or auto, got {rate!r}") from None
            if not (math.isfinite(value) and value > 0):
                raise KvrayInputError(f"--rate: expected a positive number of requests/s, got {rate}")
    if kind in ("burst", "closed") and value is not None:
        raise KvrayInputError(f"--rate applies to open loops (poisson, gamma, constant), not {kind}")
    if requests is not None and requests <= 0:
        raise KvrayInputError(f"--requests must be positive, got {requests}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise KvrayInputError(f"--duration-s must be a positive number of seconds, got {duration_s}")
    for flag, trim in (("--warmup-s", warmup_s), ("--cooldown-s", cooldown_s)):
        if trim is not None and not (math.isfinite(trim) and trim >= 0):
            raise KvrayInputError(f"{flag} must be a number of seconds >= 0, got {trim}")
        if trim is not None and kind == "burst":
            raise KvrayInputError(f"{flag} trims a closed or open loop's window; a burst pools every request")
    return {
        "kind": kind,
        "rate": value,
        "requests": requests,
        "duration_s": duration_s,
        "seed": seed,
        "warmup_s": warmup_s,
        "cooldown_s": cooldown_s,
    }
