"""KV reuse and pressure (issue 15): shared prefixes, multi-turn conversations, preemption — on real engines.

The expected figures are hand arithmetic on vLLM's prefix-cache rule (whole 128-token blocks of the CPU build, a hit
stops at prompt − 1, and only the tokens sent can hit — never the synthetic answer kvray writes into a history),
not the prediction code's output. One vLLM server (CPU build, a 24 MiB = 48-block pool, so the preemption cell
needs no restart; the session's server of these settings, tests/servers_fixtures.py ``shared_vllm``) serves every
vLLM test here but the fp8 one, which starts its own.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from servers_fixtures import build_tiny_model_dir, shared_vllm, shared_vllm_model_dir, vllm_cell

from kvray.backends.vllm import VLLMBackend
from kvray.data.writer import DatasetWriter
from kvray.errors import KvrayInputError
from kvray.plan.reuse import multi_turn_workload, shared_prefix_workload, turn_of
from kvray.runner.run import run_cell
from kvray.sim.reuse import predict_reuse
from kvray.spec import Cell, Workload, make_options

BLOCK = 128  # vLLM's CPU block size (tests/test_vllm_backend.py asserts it)
PER_TOKEN = 2 * 4 * 2 * 64 * 4  # tiny Llama, fp32: 2 × layers × KV heads × head_dim × 4 B = 4,096 B
POOL = 24 * 2**20  # 48 blocks of 128 tokens × 4,096 B


# --- the workloads and the prediction, by hand --------------------------------------------------------------------


def test_shared_prefix_workload_and_its_predicted_hits():
    wl = shared_prefix_workload(16, 1, 256, 32, 8)
    assert wl.kind == "shared_prefix" and len(wl.requests) == 16
    assert {(r.prompt_toks, r.shared_prefix_toks, r.prefix_group) for r in wl.requests} == {(288, 256, 0)}
    pred = predict_reuse(wl.requests, BLOCK)
    # the first request computes the 256-token prefix (two whole blocks); each of the 15 others finds both
    assert [pred.hit_toks[i] for i in range(16)] == [0] + [256] * 15
    assert pred.hits == 15 * 256 and pred.queries == 16 * 288
    assert pred.hit_rate == pytest.approx(3840 / 4608)  # 0.8333
    # two groups: each group's first request misses
    two = predict_reuse(shared_prefix_workload(16, 2, 256, 32, 8).requests, BLOCK)
    assert two.hits == 14 * 256
    # a 200-token prefix is one whole block and a part: only the block is saved
    assert predict_reuse(shared_prefix_workload(4, 1, 200, 32, 8).requests, BLOCK).hits == 3 * 128


def test_multi_turn_workload_sends_the_history_and_the_prediction_hits_the_previous_prompt():
    wl = multi_turn_workload(4, 6, 100, 30, think_s=0.5)
    assert wl.kind == "multi_turn" and len(wl.requests) == 24 and wl.load_kind == "closed"
    by_id = {r.id: r for r in wl.requests}
    for r in wl.requests:
        k, c = turn_of(wl, r.id), r.prefix_group
        assert r.prompt_toks == 100 * (k + 1) + 30 * k and r.shared_prefix_toks == 130 * k
        assert r.after == (None if k == 0 else r.id - 4) and r.think_s == (0.5 if k else 0.0)
        if k:
            assert by_id[r.after].prefix_group == c and turn_of(wl, r.after) == k - 1
    # turn k's prompt repeats turn k−1's prompt (130k − 30 tokens), then the synthetic answer, then a new message:
    # the whole blocks of turn k−1's prompt hit — 0, 0, 128, 256, 384, 512 — never the answer's tokens
    pred = predict_reuse(wl.requests, BLOCK)
    assert [pred.hit_toks[k * 4] for k in range(6)] == [0, 0, 128, 256, 384, 512]
    assert all(pred.hit_toks[k * 4 + c] == pred.hit_toks[k * 4] for k in range(6) for c in range(4))


def test_reuse_predicts_saved_kv_and_prefill_from_the_roofline():
    from kvray.model.resolve import resolve_geometry

    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    pred = predict_reuse(shared_prefix_workload(8, 1, 2048, 128, 16).requests, 16, g, "bf16", gpu="H100")
    per_token = 2 * 32 * 8 * 128 * 2  # 2 × layers × KV heads × head_dim × bf16 = 128 KiB
    assert pred.kv_not_recomputed_bytes == 7 * 2048 * per_token
    out = pred.to_dict()
    # 7 of 8 prefills skip 2048 of 2176 tokens: well over 80 % of the prefill FLOPs saved, and time with it
    assert 0.8 < out["prefill_flops_saved_frac_predicted"] < 7 / 8
    assert out["ttft_saved_s_predicted"] > 0


def test_the_pool_fill_concurrency_from_kvmath_counts_shared_blocks_once():
    from kvray.backends.kv_reuse import fill_concurrency

    # 32 + 200 tokens: 231 positions, 2 blocks of 128; a 48-block pool has 47 usable: 23 fit, the 24th overfills
    assert fill_concurrency(Workload.uniform(32, 32, 200).requests, 48, BLOCK) == 24
    assert fill_concurrency(Workload.uniform(23, 32, 200).requests, 48, BLOCK) is None
    # 16 × (256 shared + 32 own) + 8: 3 blocks each alone (48 > 47: the 16th overfills), but the 15 that find the
    # two prefix blocks resident add one block each: 3 + 15 = 18 blocks, which fit
    wl = shared_prefix_workload(16, 1, 256, 32, 8)
    assert fill_concurrency(wl.requests, 48, BLOCK) == 16
    assert fill_concurrency(wl.requests, 48, BLOCK, predict_reuse(wl.requests, BLOCK).hit_toks) is None


def test_the_pool_fill_moment_is_bracketed_by_the_scrapes_around_it():
    """A 48-block pool (47 usable, one the null block) is full at 46 of 47 in use: kv_usage 46/47 = 0.9787.
    Samples (asked, answered): (0.0, 0.1) at 50 %, (1.0, 1.1) at 97 % (45.6 of 47: not full), then one asked at
    2.0 and answered 9.5 s later showing 98 % — the pool filled after 1.0 s (the last not-full sample was read no
    earlier than it was asked) and by 11.5 s. A preemption counter's growth counts as full though usage never
    reads it; a run that never fills has no bracket."""
    from kvray.backends.kv_reuse import pool_full_at

    def sample(sent_s, t_s, kv_usage, preemptions=0):
        return {"sent_s": sent_s, "t_s": t_s, "kv_usage": kv_usage, "preemptions": preemptions}

    late = [sample(0.0, 0.1, 0.50), sample(1.0, 1.1, 0.97), sample(2.0, 11.5, 0.98), sample(12.0, 12.1, 0.0)]
    assert pool_full_at(late, 48) == (1.0, 11.5)
    preempted = [sample(0.0, 0.1, 0.2), sample(0.5, 0.6, 0.9, preemptions=2), sample(1.0, 1.1, 0.99)]
    assert pool_full_at(preempted, 48) == (0.0, 0.6)
    assert pool_full_at([sample(0.0, 0.1, 0.2), sample(0.5, 0.6, 0.97)], 48) is None
    assert pool_full_at([], 48) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: shared_prefix_workload(4, 8, 64, 8, 4),  # more groups than requests
        lambda: shared_prefix_workload(4, 1, 0, 8, 4),
        lambda: multi_turn_workload(2, 0, 8, 4),
        lambda: multi_turn_workload(2, 2, 8, 4, think_s=-1.0),
    ],
)
def test_bad_reuse_workloads_are_input_errors(call):
    with pytest.raises(KvrayInputError):
        call()


# --- prompts: token-exact sharing on every backend --------------------------------------------------------------


def _shared_len(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_simulator_serves_shared_prefixes_and_chats_with_the_hits_arithmetic_predicts():
    """The sim backend's continuous engine (kvray/sim/serving.py, a discrete-event model with vLLM V1's caching
    rules) against the block arithmetic by hand: 16 requests sharing 256 of 288 tokens hit 2 blocks each but the
    first (15 × 256 of 16 × 288 tokens); 4 chats × 3 turns of 100 + 30 tokens hit only the previous turn's whole
    *prompt* blocks — turn 2 none (turn 1's 100-token prompt fills no block; its block 0 holds 28 generated tokens
    the history replaces with the synthetic answer), turn 3 one (128 of 360: turn 2's 230-token prompt fills one) —
    also after the turn ended (cached blocks stay until evicted)."""
    from kvray.backends.sim import SimBackend

    def sim(workload: Workload) -> Any:
        options = make_options(block_size=BLOCK, kv_cache_memory_bytes=POOL)
        cell = Cell(
            model="kvray/tiny-llama",
            workload=workload,
            backend="sim",
            dtype="fp32",
            hardware="H100-SXM",
            warmup=0,
            repeats=1,
            options=options,
        )
        result = run_cell(SimBackend(), cell)
        assert result.status == "ok", result.reason
        return result

    shared = sim(shared_prefix_workload(16, 1, 256, 32, 4))
    assert shared.memory["prefix_cache_hit_rate"] == pytest.approx(15 * 256 / (16 * 288), abs=1e-6)
    assert shared.memory["kv_not_recomputed_bytes"] == 15 * 256 * PER_TOKEN
    assert shared.memory["prefix_cache_hit_rate_predicted"] == shared.memory["prefix_cache_hit_rate"]
    chats = sim(multi_turn_workload(4, 3, 100, 30))
    hits = 4 * (0 + 128)
    queries = 4 * (100 + 230 + 360)
    assert chats.memory["prefix_cache_hit_rate"] == pytest.approx(hits / queries, abs=1e-6)  # the row rounds to 6
    assert chats.memory["kv_not_recomputed_bytes"] == hits * PER_TOKEN


def test_server_prompts_share_exactly_the_prefix_and_the_history(tmp_path):
    """The openai/vllm prompt text, tokenised by the served model's tokenizer: exact lengths, exactly the shared
    tokens in common (the BOS token is the first of them), unique suffixes, and per-group cache salts."""
    from kvray.backends.http.prompts import PromptBuilder, load_tokenizer, request_salt, workload_prompts

    model_dir = build_tiny_model_dir(tmp_path / "models")
    tok = load_tokenizer(str(model_dir))
    builder = PromptBuilder(tok)
    wl = shared_prefix_workload(6, 2, 40, 12, 4)
    cell = Cell(model=str(model_dir), workload=wl, backend="openai")
    ids = {i: tok(t)["input_ids"] for i, t in workload_prompts(builder, cell, wl.requests, 0).items()}
    assert all(len(v) == 52 for v in ids.values())
    for a in range(6):
        for b in range(a + 1, 6):
            assert _shared_len(ids[a], ids[b]) == (40 if a % 2 == b % 2 else 1), (a, b)  # other group: BOS only
    salts = {r.id: request_salt(cell, 0, r) for r in wl.requests}
    assert (
        salts[0] == salts[2] == salts[4] != salts[1] == salts[3] and request_salt(cell, 1, wl.requests[0]) != salts[0]
    )
    other_repeat = {i: tok(t)["input_ids"] for i, t in workload_prompts(builder, cell, wl.requests, 1).items()}
    assert _shared_len(ids[0], other_repeat[0]) == 1  # repeats never share

    mt = multi_turn_workload(2, 3, 10, 5)
    cell = Cell(model=str(model_dir), workload=mt, backend="openai")
    ids = {i: tok(t)["input_ids"] for i, t in workload_prompts(builder, cell, mt.requests, 0).items()}
    for r in mt.requests:
        assert len(ids[r.id]) == r.prompt_toks
        if r.after is not None:  # the whole previous prompt, then the 5-token synthetic answer, then 10 new
            prev = ids[r.after]
            assert ids[r.id][: len(prev)] == prev and r.prompt_toks == len(prev) + 5 + 10
            assert _shared_len(ids[r.id], ids[r.id - 1 if r.id % 2 else r.id + 1]) == 1  # other conversation


def test_hf_and_hf_paged_prompts_share_the_prefix_and_run_token_exact():
    from kvray.backends.hf_paged import HFPagedBackend

    backend = HFPagedBackend()
    try:
        wl = shared_prefix_workload(4, 2, 48, 16, 6)
        cell = Cell(
            model="kvray/tiny-llama",
            workload=wl,
            backend="hf-paged",
            dtype="fp32",
            device="cpu",
            warmup=0,
            options=make_options(block_size=16),
        )
        result = run_cell(backend, cell)
        assert result.status == "ok", result.reason
        assert sorted((t.prompt_toks, t.output_toks) for t in result.traces) == [(64, 6)] * 4
        ids = {i: p.tolist() for i, p in backend._prompts(cell, wl.requests, 0).items()}
        assert _shared_len(ids[0], ids[2]) >= 48 and ids[0][:48] == ids[2][:48] and ids[0][48:] != ids[2][48:]
        assert ids[0][:48] != ids[1][:48]
        mt = multi_turn_workload(2, 3, 12, 6)
        cell = Cell(
            model="kvray/tiny-llama",
            workload=mt,
            backend="hf-paged",
            dtype="fp32",
            device="cpu",
            warmup=0,
            options=make_options(block_size=16),
        )
        result = run_cell(backend, cell)
        assert result.status == "ok", result.reason
        traces = {t.request_id: t for t in result.traces}
        for r in mt.requests:  # closed loop through the arrival gate: each turn is sent after the previous ended
            assert traces[r.id].prompt_toks == r.prompt_toks
            if r.after is not None:
                assert traces[r.id].sent_s >= traces[r.after].end_s - 1e-6
        ids = {i: p.tolist() for i, p in backend._prompts(cell, mt.requests, 0).items()}
        assert all(ids[r.id][: len(ids[r.after])] == ids[r.after] for r in mt.requests if r.after is not None)
    finally:
        backend.close()


# --- vLLM: measured against the prediction -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_vllm_model_dir(tmp_path_factory)


def reuse_cell(model_dir, workload, warmup=1, repeats=1):
    return vllm_cell(
        model_dir, workload, warmup, repeats, kv_cache_memory_bytes=POOL, max_model_len=2048, metrics_interval_s=0.05
    )


vllm = shared_vllm(kv_cache_memory_bytes=POOL, max_model_len=2048)  # reuse_cell's server settings


WORKLOADS = {
    "shared_prefix": (lambda: shared_prefix_workload(16, 1, 256, 32, 8), 1),
    "multi_turn": (lambda: multi_turn_workload(4, 6, 100, 30), 0),  # the shared-prefix cell's warmup compiled
    "pressure": (lambda: Workload.uniform(8, 32, 1000), 0),
}


@pytest.fixture(scope="module")
def measured(vllm, model_dir, tmp_path_factory):
    """Each exp6 cell run once on the module's server, its row written to one results folder (for the report)."""
    folder = tmp_path_factory.mktemp("exp6")
    writer = DatasetWriter(folder)
    done: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in done:
            build, warmup = WORKLOADS[name]
            cell = replace(reuse_cell(model_dir, build(), warmup=warmup), experiment="exp6")
            done[name] = run_cell(vllm, cell)
            writer.append(done[name])
        return done[name]

    get.folder = folder  # type: ignore[attr-defined]
    return get


@pytest.mark.vllm
def test_vllm_shared_prefix_hits_what_kvray_predicts(measured):
    """16 requests, one 256-token prefix (two whole blocks), unique 32-token suffixes, sent at once."""
    result = measured("shared_prefix")
    assert result.status == "ok", result.reason
    m = result.memory
    assert m["prefix_cache_hit_rate_predicted"] == pytest.approx(15 * 256 / (16 * 288), abs=1e-6)
    assert abs(m["prefix_cache_hit_rate"] - m["prefix_cache_hit_rate_predicted"]) <= 0.05, m
    assert m["kv_not_recomputed_bytes_predicted"] == 15 * 256 * PER_TOKEN
    assert abs(m["kv_not_recomputed_bytes"] - m["kv_not_recomputed_bytes_predicted"]) <= 16 * BLOCK * PER_TOKEN, m
    assert result.metrics["prefix_cache_queries"] == 16 * 288  # vLLM counts every prompt token once
    per_request = result.extra["prefix_cache"]["per_request"]  # each answer's own cached_tokens
    assert sorted(p["cached_toks"] for p in per_request) == sorted(p["cached_toks_predicted"] for p in per_request)
    row = result.to_row()
    for col in (
        "prefix_cache_hit_rate",
        "prefix_cache_hit_rate_predicted",
        "kv_not_recomputed_bytes",
        "kv_not_recomputed_bytes_predicted",
        "preemptions",
    ):
        assert row[col] is not None, col
    assert row["preemptions"] == 0


@pytest.mark.vllm
def test_vllm_multi_turn_hits_the_previous_turn_turn_by_turn(measured):
    """4 conversations × 6 turns (100-token messages, 30-token answers), each turn sent when the last one ended:
    every turn's own cached_tokens is the whole blocks of the previous turn's prompt — 0, 0, 128, 256, 384, 512."""
    result = measured("multi_turn")
    wl = result.cell.workload
    assert result.status == "ok", result.reason
    per_request = result.extra["prefix_cache"]["per_request"]
    by_turn: dict[int, set[int]] = {}
    for p in per_request:
        assert p["cached_toks"] == p["cached_toks_predicted"], p
        by_turn.setdefault(turn_of(wl, p["request_id"]), set()).add(p["cached_toks"])
    assert by_turn == {0: {0}, 1: {0}, 2: {128}, 3: {256}, 4: {384}, 5: {512}}
    expected_hits = 4 * (128 + 256 + 384 + 512)
    assert result.metrics["prefix_cache_hits"] == expected_hits
    traces = {t.request_id: t for t in result.traces}
    assert all(traces[r.id].sent_s >= traces[r.after].end_s - 1e-6 for r in wl.requests if r.after is not None)


@pytest.mark.vllm
def test_vllm_kv_pressure_preempts_and_the_fill_point_is_on_the_timeline(measured):
    """8 requests of 32 + 1,000 tokens: 1,031 positions is 9 blocks each, and the pool's 47 usable blocks hold 5 of
    them (kvmath: the 6th overfills). All 8 are admitted with their 1-block prompts and grow together: at position
    641 they want 6 blocks each, 48 in all, and vLLM preempts (counted when a preempted request resumes). Each runs
    1,000 steps, so however late a starved API process hands some of them to the engine, 6 still overlap. Shorter
    cells failed on 2 busy cores: 32 requests of 328 tokens (3 blocks each) were once admitted so spread out that
    the pool never overflowed — 0 preemptions on CI."""
    result = measured("pressure")
    assert result.status == "ok", result.reason
    assert all(t.output_toks == 1000 for t in result.traces)
    assert result.extra["server_cache"]["num_gpu_blocks"] == 48
    assert result.memory["kv_fill_concurrency_predicted"] == 6
    assert result.metrics["preemptions"] > 0
    full_at, after = result.memory["pool_full_at_s"], result.memory["pool_full_after_s"]
    # the scrapes bracket the moment the pool filled: (after, at]; a late answer may put `at` past the run's end
    assert full_at is not None and 0 <= after < full_at and after < max(t.end_s for t in result.traces)
    timeline = result.extra["kv_timeline"]
    assert any(p["t_s"] == full_at for p in timeline)
    assert any(p["sent_s"] == after for p in timeline) or after == 0


@pytest.mark.vllm
def test_exp6_report_section_and_figures_from_the_vllm_cells(measured):
    from kvray.report import make_report

    for name in WORKLOADS:
        assert measured(name).status == "ok"
    paths = make_report(measured.folder)
    md = paths.markdown.read_text()
    exp6 = md[md.index("## Exp6 — KV reuse and pressure") :]
    assert "83.3%" in exp6  # the shared-prefix cell's hit rate, measured and predicted (3,840 / 4,608)
    from kvray.analysis.dataset import Dataset
    from kvray.figures.reuse import reuse_figures

    figures = {f.name: f for f in reuse_figures(Dataset.load(measured.folder), measured.folder / "figures")}
    for name in ("exp6_hit_rate", "exp6_ttft_vs_shared_prefix", "exp6_multi_turn", "exp6_kv_pressure", "exp6_kv_dtype"):
        assert f"![{name}](figures/{name}.png)" in exp6, name
        assert not figures[name].empty and all(p.is_file() and p.stat().st_size > 0 for p in figures[name].paths)
    assert figures["exp6_hit_rate"].series == ["multi_turn", "shared_prefix", "uniform"]
    assert figures["exp6_kv_pressure"].series == ["vllm"]


def _cpu_has_fp8_kv_support() -> bool:
    """vLLM's CPU build keeps an fp8 KV cache only on x86 with AVX-512 or AMX (its own start-up check): read the
    CPU's flags, independently of vLLM."""
    from pathlib import Path

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return " avx512f" in flags or " amx_tile" in flags


@pytest.mark.vllm
def test_vllm_fp8_kv_capacity_or_a_plain_refusal(model_dir, measured):
    """kv_dtype fp8: a server of its own with --kv-cache-dtype fp8 (the shared one keeps its settings).
    With AVX-512/AMX the same 24 MiB pool holds 4× the fp32 tokens (1 B vs 4 B per element): 6,144 × 4 = 24,576;
    without, the row says why in vLLM's own words and the exp6 report repeats it."""
    from kvray.report import make_report

    cell = replace(reuse_cell(model_dir, Workload.uniform(2, 32, 8), warmup=0), kv_dtype="fp8", experiment="exp6")
    backend = VLLMBackend()
    try:
        result = run_cell(backend, cell)
    finally:
        backend.close()
    DatasetWriter(measured.folder).append(result)
    if _cpu_has_fp8_kv_support():
        assert result.status == "ok", result.reason
        capacity = result.extra["kv_capacity"]
        assert capacity["kv_dtype"] == "fp8" and capacity["reported"]["kv_cache_size_tokens"] == 4 * POOL // PER_TOKEN
        assert capacity["agrees"] is True
    else:
        assert result.status == "error"
        assert "vllm could not start: FP8 KV cache on CPU requires x86 with AVX-512 or AMX." in result.reason
        md = make_report(measured.folder).markdown.read_text()
        assert "FP8 KV cache on CPU requires x86 with AVX-512 or AMX." in md[md.index("## Exp6") :]
