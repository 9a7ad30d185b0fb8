"""KV reuse: the prompt rule for shared prefixes, and what a prefix cache should save under it.

**The rule** (``shared_token_ids``) — one for every backend (server text prompts, in-process token ids): a
request with ``prefix_group`` g and ``shared_prefix_toks`` S starts with the first S tokens of its group's
*history* — the previous request of g (in id order): its prompt followed by a synthetic answer of its
``gen_toks`` tokens — extended, where that is shorter than S, with tokens drawn from the group's own seed. The
rest is drawn from the request's own seed, so it is unique. Hence ``shared_prefix`` workloads (one S per group)
repeat the group's first S tokens and then differ; ``multi_turn`` workloads (turn k: S = turn k−1's prompt + its
gen_toks) send the whole conversation so far, token for token, then a new user message.

The answer inside the history is **synthetic** — drawn from a seed, not the tokens the engine generated: with
random weights they are noise, and re-sending them token-exactly would need every engine to return token ids
and each turn's prompt to be built during the run. So a prefix cache can serve turn k−1's *prompt* but not its
answer (the engine cached its own answer, which differs from the one sent). The prediction follows what is sent.

**The prediction** (``predict_reuse``) replays the workload through an idealised block prefix cache of the
engine's ``block_size`` (vLLM's automatic prefix caching: a full block is reusable when the whole prompt up to it
matches, hashed with the request's salt; a hit stops at ``prompt − 1`` tokens, since the last prompt token must be
computed for logits; only full blocks are cached, prompt and generated ones alike). Requests are looked up in id
order (bursts are admitted in that order, a chained turn after the turn it follows), and nothing is evicted — a
pool too small for that is KV *pressure*, measured separately. Hit rate = hit tokens / prompt tokens, as vLLM's
``prefix_cache_hits`` / ``prefix_cache_queries`` count them; KV not recomputed = hit tokens × bytes per token (per GPU of a TP group when
``g`` is a rank's shard).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import kv_bytes_per_token
from kvray.sim.passes import sequence_step_cost, step_cost
from kvray.traces.footprint import PrefixRequest

S = TypeVar("S")
T = TypeVar("T")


ReuseRequest = PrefixRequest  # what the rule needs of a request beyond its lengths (kvray.spec.RequestSpec is one)


def has_shared_prefixes(requests: Sequence[ReuseRequest]) -> bool:
    return any(
        (r.prefix_group is not None and r.shared_prefix_toks > 0) or bool(getattr(r, "block_ids", ())) for r in requests
    )


def shared_token_ids(
    requests: Sequence[ReuseRequest], draw: Callable[[S, int], list[T]], seed: Callable[[str], S], overhead: int = 0
) -> dict[int, list[T]]:
    """Each request's prompt content (``prompt_toks − overhead`` ids; ``overhead`` is what the engine puts in
    front, e.g. BOS — the same for every prompt, so it counts towards S). ``draw(seed, n)`` gives n ids from a
    seed; ``seed(label)`` names it: ``"<id>"`` a request's own tokens (what an unshared prompt uses), ``"g<g>@<k>"``
    a group's tokens from offset k, ``"a<id>"`` a request's synthetic answer."""
    history: dict[int, list[T]] = {}
    out: dict[int, list[T]] = {}
    for r in sorted(requests, key=lambda r: r.id):
        n = max(r.prompt_toks - overhead, 0)
        blocks: tuple[int, ...] = getattr(r, "block_ids", ())
        if blocks:  # a trace's blocks (kvray/traces/): block b is label "b<b>"'s tokens, the first after the overhead
            size = int(getattr(r, "block_toks", 0))
            ids = [t for k, b in enumerate(blocks) for t in draw(seed(f"b{b}"), size - (k == 0) * overhead)]
            out[r.id] = ids[:n] + draw(seed(str(r.id)), max(n - len(ids), 0))
        elif r.prefix_group is None or r.shared_prefix_toks <= 0:
            out[r.id] = draw(seed(str(r.id)), n)
        if r.prefix_group is None or r.shared_prefix_toks <= 0 or blocks:
            if r.prefix_group is not None:  # a conversation's first turn: the history starts here
                history[r.prefix_group] = out[r.id] + draw(seed(f"a{r.id}"), r.gen_toks)
            continue
        shared = min(max(r.shared_prefix_toks - overhead, 0), n)
        h = history.get(r.prefix_group, [])
        if len(h) < shared:
            h = h + draw(seed(f"g{r.prefix_group}@{len(h)}"), shared - len(h))
        ids = h[:shared] + draw(seed(str(r.id)), n - shared)
        out[r.id] = ids
        history[r.prefix_group] = ids + draw(seed(f"a{r.id}"), r.gen_toks)
    return out


def salt_label(r: ReuseRequest) -> str:
    """The seed label of a request's prefix-cache salt (vLLM's ``cache_salt``): its group's — so a group's requests
    can hit each other's blocks — or its own, so nothing else hits; a trace's requests share one (kvray/traces/)."""
    if getattr(r, "block_ids", ()):
        return "trace"
    return f"g{r.prefix_group}" if r.prefix_group is not None else str(r.id)


@dataclass
class ReusePrediction:
    """What a block prefix cache should save on one repeat of a workload (see the module docstring)."""

    block_size: int
    hit_toks: dict[int, int]  # request id → prompt tokens served from cache
    prompt_toks: dict[int, int]  # request id → prompt tokens (vLLM's queries)
    kv_bytes_per_token: float | None = None
    prefill_flops: float | None = None  # Σ over requests, no cache
    prefill_flops_cached: float | None = None  # Σ over requests, cached tokens skipped
    ttft_saved_s: dict[int, float] = field(default_factory=dict)  # request id → roofline TTFT saved (with a GPU)

    @property
    def hits(self) -> int:
        return sum(self.hit_toks.values())

    @property
    def queries(self) -> int:
        return sum(self.prompt_toks.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def saved_blocks(self) -> int:
        return self.hits // self.block_size

    @property
    def kv_not_recomputed_bytes(self) -> int | None:
        """Hit tokens × KV bytes per token: the KV the engine did not compute again (docs/kv_reuse.md) — not
        memory saved (a hit's blocks are shared, but the peak KV can be the same with or without the cache)."""
        return None if self.kv_bytes_per_token is None else round(self.hits * self.kv_bytes_per_token)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "prefix_cache_hits_predicted": self.hits,
            "prefix_cache_queries_predicted": self.queries,
            "prefix_cache_hit_rate_predicted": round(self.hit_rate, 6),
            "kv_not_recomputed_blocks_predicted": self.saved_blocks,
            "kv_not_recomputed_bytes_predicted": self.kv_not_recomputed_bytes,
        }
        if self.prefill_flops:
            saved = 1 - (self.prefill_flops_cached or 0.0) / self.prefill_flops
            out["prefill_flops_saved_frac_predicted"] = round(saved, 6)
        if self.ttft_saved_s:
            out["ttft_saved_s_predicted"] = round(sum(self.ttft_saved_s.values()) / len(self.ttft_saved_s), 9)
        return out


def predict_hits(requests: Sequence[ReuseRequest], block_size: int) -> dict[int, int]:
    """Prompt tokens each request should find in an ideal block prefix cache (vLLM's rule; module docstring)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if any(getattr(r, "block_ids", ()) for r in requests):  # a trace: the same rule on chained block keys (fast)
        from kvray.traces.footprint import engine_hits

        return engine_hits(requests, block_size)  # type: ignore[arg-type]
    seqs = shared_token_ids(requests, lambda seed, n: [(seed, i) for i in range(n)], lambda label: label)
    cache: set[tuple[str, tuple[Any, ...]]] = set()
    hits: dict[int, int] = {}
    for r in sorted(requests, key=lambda r: r.id):
        salt, prompt = salt_label(r), seqs[r.id]
        full = (len(prompt) - 1) // block_size  # a hit stops at prompt − 1 tokens
        k = 0
        while k < full and (salt, tuple(prompt[: (k + 1) * block_size])) in cache:
            k += 1
        hits[r.id] = k * block_size
        # the engine caches every full block it computed: the prompt's and then its own (real) answer's
        computed = prompt + [("out", r.id, i) for i in range(max(r.gen_toks - 1, 0))]
        for j in range(1, len(computed) // block_size + 1):
            cache.add((salt, tuple(computed[: j * block_size])))
    return hits


def predict_reuse(
    requests: Sequence[ReuseRequest],
    block_size: int,
    g: ModelGeometry | None = None,
    kv_dtype: str = "bf16",
    dtype: str | None = None,
    gpu: str | None = None,
) -> ReusePrediction:
    """Hits, hit rate and the KV not recomputed (``g`` given: paged bytes per token of ``g`` — a TP rank's shard gives
    it per GPU), the prefill FLOPs a cache skips and, on a
    named GPU, the roofline TTFT each request saves (one prefill of the uncached tokens after the cached ones,
    against the whole prompt — kvray/sim/passes.py)."""
    hits = predict_hits(requests, block_size)
    pred = ReusePrediction(block_size, hits, {r.id: r.prompt_toks for r in requests})
    if g is None:
        return pred
    pred.kv_bytes_per_token = kv_bytes_per_token(g, kv_dtype, "paged")
    pred.prefill_flops = sum(
        sequence_step_cost(g, 0, r.prompt_toks, kv_dtype, "paged", block_size).flops for r in requests
    )
    pred.prefill_flops_cached = sum(
        sequence_step_cost(g, hits[r.id], r.prompt_toks - hits[r.id], kv_dtype, "paged", block_size).flops
        for r in requests
    )
    if gpu is not None:
        from kvray.hardware.gpus import get_gpu
        from kvray.sim.simulate import efficiency_for, pass_time_s

        spec = get_gpu(gpu)
        eff = efficiency_for(spec, "paged")
        wdtype = dtype or kv_dtype
        for r in requests:
            full = step_cost(g, [(0, r.prompt_toks)], wdtype, kv_dtype, "paged", block_size)
            cached = step_cost(g, [(hits[r.id], r.prompt_toks - hits[r.id])], wdtype, kv_dtype, "paged", block_size)
            pred.ttft_saved_s[r.id] = pass_time_s(full, g, spec, wdtype, eff) - pass_time_s(
                cached, g, spec, wdtype, eff
            )
    return pred
