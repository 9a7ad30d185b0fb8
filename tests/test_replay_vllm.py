"""A Mooncake-format trace replayed on vLLM's CPU build with prefix caching: the measured hit rate (vLLM's
``prefix_cache_hits`` / ``_queries`` counters) against kvray's prediction from the trace alone (issue #28).

The trace (generated here, seeded): 48 requests 0.5 s apart — one at a time on the tiny model — each the first 3–8
blocks of one of 16 "documents" (Zipf popularity) and one block of its own, its last block half full; Mooncake's
512-token blocks replayed as 128 tokens (``block_toks``), one vLLM CPU block each. Two pools: 256 blocks (the trace's
92 full prompt blocks, its generated and partial blocks all fit: nothing is evicted) — measured within 1 point of
the unbounded prediction; and the shared 48-block pool (47 usable: about half the working set) — within 3 points
of the LRU prediction (kvray/traces/footprint.py ``engine_lru_hits``: vLLM's free-block queue, tails first, blocks
without a hash reused first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from servers_fixtures import shared_vllm, shared_vllm_model_dir, vllm_cell

from kvray.figures.replay import find_value
from kvray.plan.replay import check_trace_key, replay_workload
from kvray.runner.run import run_cell
from kvray.traces.footprint import block_keys, engine_lru_hits, prompt_runs

BLOCK = 128  # vLLM's CPU block size (tests/test_vllm_backend.py asserts it)
POOL_SMALL = 24 * 2**20  # 48 blocks of 128 tokens × 4,096 B (tiny Llama fp32) — test_kv_reuse.py's server
POOL_LARGE = 128 * 2**20  # 256 blocks

small = shared_vllm(kv_cache_memory_bytes=POOL_SMALL, max_model_len=2048)
large = shared_vllm(kv_cache_memory_bytes=POOL_LARGE, max_model_len=2048)


def write_trace(path: Path, n: int = 48, docs: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    popularity = 1 / np.arange(1, docs + 1)
    popularity /= popularity.sum()
    lines = []
    for i in range(n):
        d, length = int(rng.choice(docs, p=popularity)), int(rng.integers(3, 9))
        ids = [d * 100 + j for j in range(length)] + [10_000 + i]
        lines.append(
            json.dumps(
                {"timestamp": i * 500, "input_length": (length + 1) * 512 - 256, "output_length": 16, "hash_ids": ids}
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_vllm_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    path = write_trace(tmp_path_factory.mktemp("trace") / "mooncake.jsonl")
    return replay_workload(check_trace_key({"path": str(path), "block_toks": BLOCK}))


def replay(backend, model_dir, workload, pool_bytes):
    cell = vllm_cell(
        model_dir,
        workload,
        warmup=0,
        repeats=1,
        kv_cache_memory_bytes=pool_bytes,
        max_model_len=2048,
        metrics_interval_s=0.05,
    )
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    return result


@pytest.mark.vllm
def test_vllm_hit_rate_equals_the_prediction_with_a_large_pool(large, model_dir, workload):
    result = replay(large, model_dir, workload, POOL_LARGE)
    m = result.memory
    runs = prompt_runs(workload.requests)
    assert len({k for r in workload.requests for k in block_keys(runs[r.id], BLOCK)}) == 92  # the working set
    assert abs(m["prefix_cache_hit_rate"] - m["prefix_cache_hit_rate_predicted"]) <= 0.01, m
    assert m["prefix_cache_hit_rate_predicted"] > 0.5  # a trace with reuse, not a trivial agreement at 0
    print(
        f"[replay on vLLM] measured {m['prefix_cache_hit_rate']:.4f}, predicted {m['prefix_cache_hit_rate_predicted']:.4f}, "
        f"client lag p99 {result.metrics['client_lag_s_p99']:.3f} s"
    )


@pytest.mark.vllm
def test_vllm_hit_rate_under_lru_at_half_the_working_set(small, model_dir, workload):
    result = replay(small, model_dir, workload, POOL_SMALL)
    blocks = int(find_value(result.extra, "num_gpu_blocks"))
    assert blocks == 48
    queries = sum(r.prompt_toks for r in workload.requests)
    predicted = sum(engine_lru_hits(workload.requests, BLOCK, blocks - 1).values()) / queries  # one null block
    unbounded = result.memory["prefix_cache_hit_rate_predicted"]
    assert predicted < unbounded - 0.05  # the pool is small enough to cost hits
    measured = result.memory["prefix_cache_hit_rate"]
    print(
        f"[replay on vLLM, 47-block pool] measured {measured:.4f}, LRU predicted {predicted:.4f}, unbounded {unbounded:.4f}"
    )
    assert abs(measured - predicted) <= 0.03, (result.memory, predicted)
