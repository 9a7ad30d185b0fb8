"""FLOPs and bytes of one forward pass: what the roofline in kvray.sim.simulate divides by peak rates.

Under tensor parallelism every function here is called with one rank's geometry (kvray.model.parallel
``shard_geometry``), so FLOPs and bytes are per GPU; ``PassCost.tokens`` is what the all-reduces carry.

Two facts decide the numbers (docs/simulator.md, "The model"):

- **Weights read.** A pass reads every weight it multiplies, once, whatever the batch: the layers' shared
  weights and the LM head in full, but only the rows it looks up in a lookup-only table (an untied input
  embedding, learned position embeddings) and, in an MoE layer, only the routed experts its tokens visit.
  T tokens each choosing k of E experts touch E·(1 − (1 − k/E)^T) distinct experts on average when routing
  is uniform: k at T = 1, nearly all E at large T. Uniform routing is the most spread a router can be, so
  this is the upper side of what a skewed router touches.
- **Causal attention.** The query at position i scores min(i, W) keys (W the sliding window of that layer,
  unbounded on full-attention layers), so a P-token prefill computes P(P+1)/2 query-key pairs per layer
  and sequence, half the P² square, and a sliding layer only a W-wide band.
- **Decode attention is its own kernel.** A decode token (one query after its cached context) reads the
  sequence's whole KV cache in an attention kernel of its own, between the layer's matmuls, so its time is not
  hidden under a compute-bound prefill chunk of the same step. ``PassCost.decode_attention_flops`` and
  ``decode_attention_bytes`` carry that part (it is inside ``flops`` and ``bytes`` too); kvray.sim.simulate
  adds its time to the rest of the step.
- **Attention over a flattened batch** (``attention="masked"``). vLLM's kernels and flash-attention's varlen path
  score each query against its own sequence's keys (``"varlen"``, the default). Transformers' continuous batching
  with ``sdpa`` or ``eager`` attention instead concatenates the step's sequences and runs one dense attention over
  all of them with a block-diagonal mask: every one of the step's Q query tokens scores every one of its K key
  positions (Σ past + new over the scheduled sequences), the mask only zeroing the other sequences' scores — Q × K
  pairs per layer, so a step of B decodes at context L costs B²L where its own keys would cost BL.
- **MLA decodes in the latent space.** DeepSeek-V2/V3 cache one latent of ``kv_lora_rank + qk_rope_head_dim``
  per token and layer; a decode step reads that latent and scores it with the query absorbed into the latent
  (W_UK folded into the query, W_UV into the output, as vLLM's and SGLang's MLA decode kernels do): per head
  and query-key pair 2·(kv_lora_rank + qk_rope_head_dim) FLOPs for the score and 2·kv_lora_rank for the
  weighted sum. The absorption matmuls cost what ``kv_b_proj`` costs per token, already in the matmul FLOPs.
  A prefill runs MLA expanded: heads × (qk_nope + qk_rope + v_head_dim) per pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import DEFAULT_BLOCK_SIZE, dtype_bytes, kv_bytes_sequence


@dataclass(frozen=True)
class PassCost:
    flops: float
    bytes: float
    tokens: int = 0  # tokens the pass runs through the layers (padding included): what a TP all-reduce carries
    # The decode tokens' attention (their QKᵀ and AV over the cached context, and the KV bytes it reads),
    # already inside ``flops`` and ``bytes``: a kernel of its own, timed apart from the rest of the pass.
    decode_attention_flops: float = 0.0
    decode_attention_bytes: float = 0.0
    # The prefill chunks' causal attention and the KV they read and write (past + new positions), also inside
    # ``flops`` and ``bytes``: the step model's prefill-attention part (kvray.sim.costs).
    prefill_attention_flops: float = 0.0
    prefill_attention_bytes: float = 0.0


# --- weights ---------------------------------------------------------------------------------------------


def lookup_tables(g: ModelGeometry) -> list[tuple[int, int]]:
    """(rows, row width) of each table a pass only indexes, never multiplies.

    An untied input embedding (a tied one is also the LM head, which multiplies all of it) and the
    learned position embeddings of OPT (offset by 2) and GPT-2.
    """
    tables = [] if g.tie_word_embeddings else [(g.vocab_size, g.hidden_size)]
    if g.model_type == "opt":
        tables.append((g.max_position_embeddings + 2, g.hidden_size))
    elif g.model_type == "gpt2":
        tables.append((g.max_position_embeddings, g.hidden_size))
    return tables


def matmul_params(g: ModelGeometry) -> tuple[int, int]:
    """(parameters multiplied per token in the layers, parameters of the LM head).

    Active parameters (MoE: only the experts a token visits) minus lookup-only tables. The LM head runs on
    one token per sequence in prefill (generate keeps only the last logits) and on every token in decode.
    """
    head = g.vocab_size * g.hidden_size
    lookup = sum(rows * width for rows, width in lookup_tables(g))
    return max(g.active_params - lookup - head, 0), head


def expected_experts_touched(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts that ``tokens`` tokens route to, each choosing ``top_k`` of ``n_experts``.

    An expert is missed by one token with probability 1 − k/E, by all T independent tokens with
    (1 − k/E)^T, so E·(1 − (1 − k/E)^T) are touched: exactly k for one token, → E as T grows.
    """
    if tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def weights_read_params(g: ModelGeometry, tokens: int) -> float:
    """Parameters one pass over ``tokens`` tokens (all rows of the batch together) reads from memory.

    All parameters, less the lookup rows no token asks for (at most one row per token) and, per MoE
    layer, less the routed experts no token visits (``expected_experts_touched``).
    """
    params = float(g.params)
    for rows, width in lookup_tables(g):
        params -= (rows - min(tokens, rows)) * width
    if g.is_moe:
        assert g.n_routed_experts is not None and g.num_experts_per_tok is not None
        per_expert = 3 * g.hidden_size * (g.moe_intermediate_size or 0)  # gate, up and down projections
        moe_layers = sum(g.is_moe_layer(i) for i in range(g.num_layers))
        idle = g.n_routed_experts - expected_experts_touched(g.n_routed_experts, g.num_experts_per_tok, tokens)
        params -= moe_layers * idle * per_expert
    return params


def weights_read_bytes(g: ModelGeometry, tokens: int, dtype: str) -> float:
    return weights_read_params(g, tokens) * dtype_bytes(dtype)


# --- attention -------------------------------------------------------------------------------------------


def _attention_width(g: ModelGeometry, decode: bool = False) -> int:
    """heads × (query-key dim + value dim): FLOPs per query-key pair per layer is twice this.

    MLA: expanded heads (qk_nope + qk_rope + v_head_dim) in a prefill; in a decode (``decode``) the absorbed
    latent (kv_lora_rank + qk_rope_head_dim keys, kv_lora_rank values) that the decode kernels score.
    """
    if g.kv_lora_rank is not None:
        assert g.qk_nope_head_dim is not None and g.qk_rope_head_dim is not None and g.v_head_dim is not None
        if decode:
            return g.num_attention_heads * (2 * g.kv_lora_rank + g.qk_rope_head_dim)
        return g.num_attention_heads * (g.qk_nope_head_dim + g.qk_rope_head_dim + g.v_head_dim)
    return g.num_attention_heads * 2 * g.head_dim


def causal_pairs(past: int, queries: int, window: int | None = None) -> int:
    """Query-key pairs of ``queries`` queries at positions past+1 … past+queries under a causal mask.

    The query at position i scores min(i, window) keys, itself included (all i on a full-attention layer).
    """

    def upto(n: int) -> int:  # Σ_{i=1..n} min(i, window)
        if window is None or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window

    return upto(past + queries) - upto(past)


def attention_flops(g: ModelGeometry, past: int, queries: int) -> float:
    """QKᵀ and AV over all layers for ``queries`` new queries after ``past`` cached positions (causal).

    One query is a decode token: MLA scores it in the absorbed latent space (``_attention_width``)."""
    width = _attention_width(g, decode=queries == 1)
    total = 0
    for layer_type in g.layer_types:
        window = g.sliding_window if layer_type == "sliding_attention" and g.sliding_window else None
        total += 2 * width * causal_pairs(past, queries, window)
    return float(total)


ATTENTIONS = ("varlen", "masked")  # each query over its own sequence's keys | one masked attention over the batch


def masked_attention(cost: PassCost, g: ModelGeometry, queries: float, keys: float, decodes: float) -> PassCost:
    """``cost`` (its attention costed per sequence) with the attention of an engine that runs one dense, masked
    attention over the whole step (module docstring): ``queries`` × ``keys`` pairs on every layer, at the
    expanded width (what SDPA computes, MLA included), the masked pairs too. The decode queries' share of it is
    the step's decode attention, the rest its prefill attention; bytes are unchanged (the cache read and written)."""
    pairs = float(queries) * float(keys)
    total = 2.0 * _attention_width(g) * pairs * len(g.layer_types)
    decode = total * float(decodes) / float(queries) if queries else 0.0
    flops = cost.flops - cost.decode_attention_flops - cost.prefill_attention_flops + total
    return replace(cost, flops=flops, decode_attention_flops=decode, prefill_attention_flops=total - decode)


def with_attention(cost: PassCost, g: ModelGeometry, chunks: Sequence[tuple[int, int]], attention: str) -> PassCost:
    """``cost`` of the step ``chunks`` ((past, queries) per sequence) under the engine's ``attention``."""
    if attention == "varlen":
        return cost
    queries = sum(q for _, q in chunks)
    keys = sum(p + q for p, q in chunks)
    return masked_attention(cost, g, queries, keys, sum(1 for _, q in chunks if q == 1))


# --- passes ----------------------------------------------------------------------------------------------


def prefill_cost(
    g: ModelGeometry,
    prompt_lengths: Sequence[int],
    dtype: str,
    kv_dtype: str,
    layout: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PassCost:
    """One prefill pass over a batch: hf pads every row to the longest prompt, paged runs each as it is.

    Padding tokens go through every layer (and the router) like real ones, so an hf batch of B rows
    costs B × max(P) tokens of work and of expert reads.
    """
    body, head = matmul_params(g)
    rows = [max(prompt_lengths)] * len(prompt_lengths) if layout == "hf" else list(prompt_lengths)
    attention = sum(attention_flops(g, 0, p) for p in rows)
    flops = sum(2.0 * body * p + 2.0 * head for p in rows) + attention
    kv_written = sum(kv_bytes_sequence(g, p, kv_dtype, layout, block_size) for p in rows)
    weights = weights_read_bytes(g, sum(rows), dtype)
    return PassCost(flops, weights + kv_written, sum(rows), 0.0, 0.0, attention, kv_written)


def decode_step_cost(
    g: ModelGeometry,
    contexts: Sequence[int],
    dtype: str,
    kv_dtype: str,
    layout: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PassCost:
    """One decode step: every row adds one token at context ``contexts[i]`` (positions after the write).

    Bytes are the weights this step's B tokens read (``weights_read_bytes``) plus the whole KV cache read at
    that context; FLOPs are 2 × active params per row plus attention over the context.
    """
    body, head = matmul_params(g)
    matmul, attention, kv_read = 0.0, 0.0, 0.0
    for c, n in Counter(contexts).items():  # hf rows share one padded context: cost it once
        matmul += n * 2.0 * (body + head)
        attention += n * attention_flops(g, c - 1, 1)
        kv_read += n * kv_bytes_sequence(g, c, kv_dtype, layout, block_size)
    weights = weights_read_bytes(g, len(contexts), dtype)
    return PassCost(matmul + attention, weights + kv_read, len(contexts), attention, kv_read)


def sequence_step_cost(
    g: ModelGeometry,
    past: int,
    queries: int,
    kv_dtype: str,
    layout: str = "paged",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PassCost:
    """One sequence's share of a step, weights excluded: ``queries`` new tokens after ``past`` cached ones.

    A prefill (chunk) and a decode token are the same thing here: FLOPs 2 × body params per token, the LM head
    once (the sequence's last position) and causal attention; bytes the sequence's KV at past + queries
    positions (the cache read, the new positions written). ``past`` 0 is ``prefill_cost``'s paged row and
    (c − 1, 1) is ``decode_step_cost``'s row at context c.
    A decode token's attention and KV read are also its ``decode_attention_*`` (timed as their own kernel).
    """
    body, head = matmul_params(g)
    attention = attention_flops(g, past, queries)
    kv = float(kv_bytes_sequence(g, past + queries, kv_dtype, layout, block_size))
    flops = 2.0 * body * queries + 2.0 * head + attention
    if queries == 1:
        return PassCost(flops, kv, queries, attention, kv)
    return PassCost(flops, kv, queries, prefill_attention_flops=attention, prefill_attention_bytes=kv)


def step_cost(
    g: ModelGeometry,
    chunks: Sequence[tuple[int, int]],
    dtype: str,
    kv_dtype: str,
    layout: str = "paged",
    block_size: int = DEFAULT_BLOCK_SIZE,
    per_sequence: Callable[[int, int], PassCost] | None = None,
) -> PassCost:
    """One step of a continuous-batching engine: prefill chunks and decode tokens of many sequences together.

    ``chunks`` holds (past, queries) per scheduled sequence: a prefill chunk is (tokens already computed, chunk
    length), a decode token is (context − 1, 1). The step reads the weights its Σ queries tokens touch once
    (``weights_read_bytes``), so mixing prefill into a memory-bound decode step is nearly free until the compute
    roof is reached — but not the decode tokens' attention, which reads their KV in a kernel of its own
    (``decode_attention_*``, timed apart by kvray.sim.simulate). ``per_sequence`` may be a memoised
    ``sequence_step_cost`` (the serving model calls this thousands of times with recurring lengths).
    """

    def own(past: int, queries: int) -> PassCost:
        return sequence_step_cost(g, past, queries, kv_dtype, layout, block_size)

    cost = per_sequence or own
    flops, kv, attention, attention_kv, pre, pre_kv = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    tokens = 0
    for past, queries in chunks:
        c = cost(past, queries)
        flops += c.flops
        kv += c.bytes
        attention += c.decode_attention_flops
        attention_kv += c.decode_attention_bytes
        pre += c.prefill_attention_flops
        pre_kv += c.prefill_attention_bytes
        tokens += queries
    return PassCost(flops, weights_read_bytes(g, tokens, dtype) + kv, tokens, attention, attention_kv, pre, pre_kv)


def batch_passes(
    g: ModelGeometry,
    prompts: Sequence[int],
    gens: Sequence[int],
    dtype: str,
    kv_dtype: str,
    layout: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    attention: str = "varlen",
) -> list[PassCost]:
    """The forward passes of one static batch: the prefill, then max(gens) − 1 decode steps.

    The prefill yields every row's first token; decode step k yields token k + 1. An hf batch keeps every
    row (padded to the longest prompt) until the longest generation ends; a paged request leaves the batch
    once it has its own tokens. ``attention`` "masked": a paged engine's one attention over the flattened batch.
    """
    prefill = prefill_cost(g, prompts, dtype, kv_dtype, layout, block_size)
    passes = [with_attention(prefill, g, [(0, p) for p in prompts], attention)]
    p_max = max(prompts)
    for k in range(1, max(gens)):
        if layout == "hf":
            contexts = [p_max + k] * len(prompts)
        else:
            contexts = [p + k for p, n in zip(prompts, gens, strict=True) if k < n]
        step = decode_step_cost(g, contexts, dtype, kv_dtype, layout, block_size)
        passes.append(with_attention(step, g, [(c - 1, 1) for c in contexts], attention))
    return passes


class StepCosts:
    """``step_cost`` of a serving engine's steps for NumPy arrays of (past, queries): equal to it, faster.

    A step of a busy engine is mostly one-token chunks (decode tokens); their shares — ``sequence_step_cost(g,
    past, 1)``: FLOPs ``2·body + 2·head + attention``, bytes the KV at past + 1 positions — are read from tables over
    ``past``, built once with the same per-layer arithmetic as ``attention_flops`` and ``kv_bytes_sequence`` (so the
    same numbers) and grown as a run's contexts do. Longer chunks are memoised ``sequence_step_cost`` calls. The sums
    are of whole numbers of FLOPs and bytes, exact in floating point below 2⁵³, so their order does not matter."""

    def __init__(
        self,
        g: ModelGeometry,
        dtype: str,
        kv_dtype: str,
        layout: str = "paged",
        block_size: int = 16,
        attention: str = "varlen",
    ):
        self.g, self.dtype, self.kv_dtype, self.layout, self.block_size = g, dtype, kv_dtype, layout, block_size
        self.attention_kind = attention
        body, head = matmul_params(g)
        self.one_token_flops = 2.0 * body * 1 + 2.0 * head  # a one-token chunk's matmuls (its LM head included)
        self.attention: Any = None  # attention FLOPs of one query after ``past`` cached positions, by past
        self.kv: Any = None  # KV bytes of a sequence of past + 1 positions, by past
        self.memo: dict[tuple[int, int], PassCost] = {}

    def _grow(self, pasts: int) -> None:
        import numpy as np

        from kvray.model.kvmath import kv_bytes_per_token_per_layer, layer_positions_array

        g, n = self.g, max(pasts, 2 * (0 if self.attention is None else len(self.attention)), 4096)
        past = np.arange(n, dtype=np.int64)
        width = _attention_width(g, decode=True)
        attention = np.zeros(n, dtype=np.int64)
        for layer_type in g.layer_types:  # attention_flops(g, past, 1)
            window = g.sliding_window if layer_type == "sliding_attention" and g.sliding_window else None
            attention += 2 * width * (past + 1 if window is None else np.minimum(past + 1, window))
        per_layer = kv_bytes_per_token_per_layer(g, self.kv_dtype, self.layout)
        kv = np.zeros(n, dtype=np.float64)
        for layer in range(g.num_layers):  # kv_bytes_sequence(g, past + 1, ...), layer by layer in the same order
            kv += layer_positions_array(g, layer, past + 1, self.layout, self.block_size) * per_layer
        self.attention, self.kv = attention.astype(np.float64), np.floor(kv)

    def step(self, pasts: Any, queries: Any) -> PassCost:
        """The step cost of sequences with ``pasts[i]`` cached positions running ``queries[i]`` new tokens."""
        one = queries == 1
        ones = pasts[one]
        if len(ones) and (self.attention is None or int(ones.max()) >= len(self.attention)):
            self._grow(int(ones.max()) + 1)
        attention = float(self.attention[ones].sum()) if len(ones) else 0.0
        attention_kv = float(self.kv[ones].sum()) if len(ones) else 0.0
        flops, kv = len(ones) * self.one_token_flops + attention, attention_kv
        pre = pre_kv = 0.0
        for past, n in zip(pasts[~one].tolist(), queries[~one].tolist(), strict=True):
            c = self.memo.get((past, n))
            if c is None:
                c = self.memo[past, n] = sequence_step_cost(
                    self.g, past, n, self.kv_dtype, self.layout, self.block_size
                )
            flops += c.flops
            kv += c.bytes
            pre += c.prefill_attention_flops
            pre_kv += c.prefill_attention_bytes
        tokens = int(queries.sum())
        weights = weights_read_bytes(self.g, tokens, self.dtype)
        cost = PassCost(flops, weights + kv, tokens, attention, attention_kv, pre, pre_kv)
        if self.attention_kind == "masked":
            keys = int(pasts.sum()) + tokens
            return masked_attention(cost, self.g, tokens, keys, len(ones))
        return cost
