"""vLLM's CPU build running tensor parallelism: two ranks (processes) of the tiny Llama on this machine.

The ranks are bound to disjoint CPUs through VLLM_CPU_OMP_THREADS_BIND entries separated by "|" (the vllm
backend splits the worker's CPUs: "0|1" on two cores). kvray/tiny-llama has 4 attention heads and 2 KV heads ×
64, so each of the 2 ranks caches 1 KV head: 2 (K, V) × 4 layers × 1 head × 64 × 4 B (fp32) = 2,048 B per
token per rank, half the 4,096 B of TP 1 — and a 256 MiB pool per rank holds 131,072 tokens, twice TP 1's.
"""

from __future__ import annotations

import pytest
from servers_fixtures import shared_vllm, shared_vllm_model_dir, vllm_test_options

from kvray.model.kvmath import kv_bytes_per_token, kv_bytes_per_token_per_gpu
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload, make_options

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_vllm_model_dir(tmp_path_factory)


vllm_tp2 = shared_vllm(tensor_parallel=2)  # the session's TP=2 server (tests/servers_fixtures.py)


def test_tp2_on_cpu_holds_half_the_kv_per_rank(model_dir, vllm_tp2):
    g = resolve_geometry(str(model_dir))
    assert (g.num_layers, g.num_attention_heads, g.num_kv_heads, g.head_dim) == (4, 4, 2, 64)
    assert kv_bytes_per_token(g, "fp32", "paged") == 2 * 4 * 2 * 64 * 4 == 4_096
    assert kv_bytes_per_token_per_gpu(g, "fp32", "paged", tp=2) == 2 * 4 * 1 * 64 * 4 == 2_048
    cell = Cell(
        model=str(model_dir),
        workload=Workload.uniform(2, 16, 4),
        backend="vllm",
        dtype="fp32",
        device="cpu",
        warmup=0,
        repeats=1,
        tensor_parallel=2,
        options=make_options(**vllm_test_options()),
    )
    result = run_cell(vllm_tp2, cell)
    assert result.status == "ok", result.reason
    assert "--tensor-parallel-size 2" in result.extra["vllm"]["command"]
    assert result.extra["parallelism"].startswith("tensor parallel 2")
    capacity = result.extra["kv_capacity"]
    reported = capacity["reported"]
    assert reported["kv_cache_memory_bytes"] == 256 * 2**20  # the per-rank pool kvray asked for
    assert reported["kv_cache_size_tokens"] == 256 * 2**20 // 2_048 == 131_072  # per rank: 1 KV head
    assert capacity["agrees"] is True and capacity["tensor_parallel"] == 2
    # Predicted KV per rank: each running request's one 128-token CPU block (16 + 4 − 1 = 19 positions) at
    # 2,048 B per token — 262,144 B per request, half what the whole model's KV would be.
    assert result.memory["kv_predicted_bytes"] in (128 * 2_048, 2 * 128 * 2_048)
    used = result.memory.get("kv_used_peak_bytes")  # vLLM's usage gauge × the rank's pool, where sampled
    assert used is None or used == result.memory["kv_predicted_bytes"]
    assert sum(len(t.token_times_s) for t in result.traces) == 2 * 4
