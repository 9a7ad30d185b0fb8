"""Trace readers, cuts and the KV footprint rules (kvray/traces/), on traces generated here in each format; every
expected value is worked by hand from the rule stated in kvray/traces/footprint.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvray.errors import KvrayInputError
from kvray.plan.replay import check_trace_key, replay_requests, replay_workload
from kvray.plan.trace_summary import describe_trace
from kvray.sim.reuse import predict_hits, shared_token_ids
from kvray.spec import RequestSpec
from kvray.traces import footprint as fp
from kvray.traces.formats import detect_format, read_trace
from kvray.traces.window import TraceOptions, cut, steady_window

REPO = Path(__file__).resolve().parents[1]


def write_mooncake(path: Path, rows: list[tuple[int, int, int, list[int]]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": h}) + "\n"
            for t, i, o, h in rows
        )
    )
    return path


# r0 [1,2,3]; r1 [1,2,4] shares two blocks; r2 [5]; r3 [1,2,3] repeats r0 (blocks of 512 tokens)
MOONCAKE = [(0, 1500, 10, [1, 2, 3]), (1000, 1400, 20, [1, 2, 4]), (2000, 100, 5, [5]), (3000, 1500, 7, [1, 2, 3])]


def test_mooncake_reader_times_lengths_blocks(tmp_path: Path) -> None:
    path = write_mooncake(tmp_path / "m.jsonl", MOONCAKE)
    assert detect_format(path) == "mooncake"
    trace = read_trace(path)
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.0, 2.0, 3.0]  # timestamps are milliseconds
    assert [r.prompt_toks for r in trace.requests] == [1500, 1400, 100, 1500]
    assert trace.requests[1].block_ids == (1, 2, 4) and trace.block_toks == 512


def test_trace_rule_hit_rates_worked_by_hand(tmp_path: Path) -> None:
    """10 prompt blocks. Unbounded: r1 hits 1,2; r3 hits 1,2,3 → 5/10. LRU (a request's first block ends the most
    recent): pool 3 → r1 2 hits, then [4,2,1]; r2 evicts 4 → [2,1,5]; r3 hits 1,2 → 4/10. Pool 2: r1 2 hits, then
    [2,1]; r2 → [1,5]; r3 hits 1 → 3/10. Pool 1: r1 hits 1 → 1/10. Half of 0.5 is first reached at pool 2."""
    opts = check_trace_key({"path": str(write_mooncake(tmp_path / "m.jsonl", MOONCAKE))})
    summary = describe_trace(opts, pool_blocks=[1, 2, 3, 100])
    assert summary["requests"] == 4 and summary["duration_s"] == 3.0 and summary["mean_rps"] == 1.0
    assert summary["prompt_blocks"] == 10 and summary["unique_blocks"] == 5
    assert summary["prefix_hit_rate"] == 0.5
    assert [p["hit_rate"] for p in summary["pool_hit_rates"]] == [0.1, 0.3, 0.4, 0.5]
    assert summary["half_hit_pool_blocks"] == 2


def test_trace_rule_at_a_smaller_block_size(tmp_path: Path) -> None:
    """Blocks of 256 tokens: each 512-token trace block is two; r0 1500 tokens → 6 blocks (5 whole, 1 partial of
    220 tokens), r1 1400 → 6 (the 5th and the partial 6th from id 4), r2 100 → 1, r3 = r0 → 6. Hits: r1 4 (ids 1
    and 2), r3 all 6 (its partial block is r0's) → 10 of 19."""
    opts = check_trace_key({"path": str(write_mooncake(tmp_path / "m.jsonl", MOONCAKE))})
    summary = describe_trace(opts, block_toks=256)
    assert summary["prompt_blocks"] == 19
    assert summary["prefix_hit_rate"] == round(10 / 19, 6)


def test_engine_rule_is_vllms_on_trace_blocks() -> None:
    """Trace blocks of 4 tokens, engine blocks of 2: r1 [1,3] (8 tokens) finds block 1's two engine blocks → 4 hit
    tokens; r2 [1,2] repeats r0 whole but a hit stops at prompt − 1: 3 full blocks → 6 tokens. The token-level rule
    (shared_token_ids + predict_hits' own path on materialised ids) agrees."""
    reqs = [
        RequestSpec(0, 8, 1, block_ids=(1, 2), block_toks=4),
        RequestSpec(1, 8, 1, block_ids=(1, 3), block_toks=4),
        RequestSpec(2, 8, 1, block_ids=(1, 2), block_toks=4),
    ]
    assert fp.engine_hits(reqs, 2) == {0: 0, 1: 4, 2: 6}
    assert predict_hits(reqs, 2) == {0: 0, 1: 4, 2: 6}


@pytest.mark.parametrize("engine_block", [2, 5, 8, 16])
def test_engine_rule_by_segments_is_the_block_by_block_rule(engine_block: int) -> None:
    """``engine_hits`` walks whole runs of blocks (``block_segments``); ``engine_lru_hits`` looks up every block key.
    With a pool nothing overflows they are one rule, so they agree request by request — on trace blocks of 12
    tokens (engine blocks that divide them and ones that straddle two), chats whose history is the previous turn,
    and shared system prompts; and the segments name exactly the full blocks ``block_keys`` names."""
    import random

    rng = random.Random(engine_block)
    reqs: list[RequestSpec] = []
    for i in range(120):
        kind = rng.random()
        if kind < 0.5:  # a trace request: a document's first blocks, or blocks of 4 ids in any order; then its own
            doc, n = rng.randrange(3), rng.randrange(1, 6)
            ids = tuple(doc * 100 + j for j in range(n)) if kind < 0.25 else tuple(rng.randrange(4) for _ in range(n))
            prompt = 12 * (len(ids) - 1) + rng.randrange(1, 13)
            reqs.append(RequestSpec(i, prompt, rng.randrange(1, 20), block_ids=ids, block_toks=12))
        else:  # a conversation turn (history grows) or a shared system prompt
            group = rng.randrange(3)
            shared = rng.randrange(0, 40)
            reqs.append(
                RequestSpec(i, shared + rng.randrange(1, 30), rng.randrange(1, 20), 0.0, 0.0, None, 0.0, group, shared)
            )
    by_segments = fp.engine_hits(reqs, engine_block)
    assert by_segments == fp.engine_lru_hits(reqs, engine_block, pool_blocks=10**9)
    assert sum(by_segments.values()) > 0  # the workload does hit
    runs = fp.prompt_runs(reqs)
    for r in reqs:
        assert sum(n for _, n in fp.block_segments(runs[r.id], engine_block)) == len(
            fp.block_keys(runs[r.id], engine_block)
        )


def test_equal_block_ids_are_equal_tokens() -> None:
    reqs = [RequestSpec(0, 7, 1, block_ids=(1, 2), block_toks=4), RequestSpec(1, 8, 1, block_ids=(1, 3), block_toks=4)]
    ids = shared_token_ids(reqs, lambda seed, n: [(seed, i) for i in range(n)], lambda label: label, overhead=1)
    assert len(ids[0]) == 6 and len(ids[1]) == 7  # the engine's BOS counts in the first block
    assert ids[0][:3] == ids[1][:3] == [("b1", 0), ("b1", 1), ("b1", 2)]
    assert ids[0][3:] == [("b2", 0), ("b2", 1), ("b2", 2)] and ids[1][3:] == [("b3", i) for i in range(4)]


def test_azure_2023_and_2024_timestamps(tmp_path: Path) -> None:
    a23 = tmp_path / "a23.csv"
    a23.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n2023-11-16 18:17:05.0000000,10,0\n"
    )
    a24 = tmp_path / "a24.csv"
    a24.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:01.5+00:00,100,20\n"
        "2024-05-10 00:00:00.009930+00:00,200,30\n"
    )
    t23, t24 = read_trace(a23), read_trace(a24)
    assert t23.format == t24.format == "azure"
    assert [round(r.arrival_s, 6) for r in t23.requests] == [0.0, 0.052]
    assert t23.failed == 1  # 0 generated tokens: dropped and said
    assert [(round(r.arrival_s, 6), r.prompt_toks) for r in t24.requests] == [(0.0, 200), (1.49007, 100)]


def write_burstgpt(path: Path, rows: list[tuple[float, int, int, str, float]]) -> Path:
    lines = ["Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    lines += [f"{t},{s},{e},ChatGPT,{p},{o},{p + o},Conversation log" for t, p, o, s, e in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_burstgpt_sessions_chain_with_recorded_think_time(tmp_path: Path) -> None:
    """Session a: turn 0 at 0 s (100 in, 50 out, 2 s elapsed), turn 1 at 5 s → think 5 − (0 + 2) = 3 s, prompt
    100 + 50 + 30 = 180 of which 150 is history; session b's turn at 1 s stands alone; a failure (0 out) dropped."""
    path = write_burstgpt(
        tmp_path / "b.csv", [(0, 100, 50, "a", 2.0), (1, 40, 10, "b", 1.0), (5, 30, 20, "a", 1.0), (6, 10, 0, "b", 0.5)]
    )
    assert detect_format(path) == "burstgpt"
    trace = read_trace(path)
    assert trace.failed == 1 and len(trace.requests) == 3
    requests, notes = replay_requests(cut(trace, TraceOptions()))
    turn = requests[2]
    assert (turn.after, turn.think_s, turn.prompt_toks, turn.shared_prefix_toks) == (0, 3.0, 180, 150)
    assert requests[1].after is None and requests[1].arrival_s == 1.0
    assert "2 sessions" in notes[0]


def test_sample_keeps_whole_sessions(tmp_path: Path) -> None:
    rows = [(float(t), 10, 5, f"s{t % 4}", 0.1) for t in range(40)]  # 4 sessions of 10 turns
    trace = read_trace(write_burstgpt(tmp_path / "b.csv", rows))
    sizes = set()
    for seed in range(8):
        kept = cut(trace, TraceOptions(sample=0.5, seed=seed, steady=False)) if seed else None
        if kept is not None:
            counts = {s: sum(r.session == s for r in kept.requests) for s in {r.session for r in kept.requests}}
            assert set(counts.values()) == {10}  # a session is kept whole or not at all
            sizes.add(len(counts))
    assert sizes - {4}  # some seed dropped a session


def test_steady_window_skips_a_slow_ramp() -> None:
    """100 requests 10 s apart, then 200 at 0.1 s: ten-request stretches take 1 s typically (the median), the ramp's
    100 s; the first fast stretch starts at request 100 (t = 1000 s)."""
    arrivals = [10.0 * i for i in range(100)] + [1000 + 0.1 * i for i in range(200)]
    assert steady_window(arrivals) == (1000.0, arrivals[-1])
    assert steady_window([0.5 * i for i in range(300)]) is None  # a steady trace is left whole


def test_cut_speedup_limit_sample_and_block_scaling(tmp_path: Path) -> None:
    trace = read_trace(write_mooncake(tmp_path / "m.jsonl", MOONCAKE))
    c = cut(trace, TraceOptions(speedup=2, limit=3, block_toks=32))
    assert [r.arrival_s for r in c.requests] == [0.0, 0.5, 1.0]
    # 512 → 32 tokens: lengths × 1/16; 1500 → 94 (three blocks of 32: within 65..96), 100 → 6, outputs ≥ 1
    assert [r.prompt_toks for r in c.requests] == [94, 88, 6] and [r.gen_toks for r in c.requests] == [1, 1, 1]
    assert c.block_toks == 32
    with pytest.raises(KvrayInputError, match="speedup"):
        TraceOptions(speedup=0)


def test_kvray_traces_jsonl_replays_repeat_zero(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    traces = [
        {"request_id": i, "repeat": rep, "arrival_s": 0.3 * i + rep, "prompt_toks": 10 + i, "output_toks": 5}
        for rep in (-1, 0, 1)
        for i in range(3)
    ]
    path.write_text(json.dumps({"cell_id": "abc", "traces": traces}) + "\n")
    trace = read_trace(path)
    assert trace.format == "kvray" and [r.prompt_toks for r in trace.requests] == [10, 11, 12]
    assert [round(r.arrival_s, 6) for r in trace.requests] == [0.0, 0.3, 0.6]


def test_replay_workload_and_bad_keys(tmp_path: Path) -> None:
    path = str(write_mooncake(tmp_path / "m.jsonl", MOONCAKE))
    wl = replay_workload(check_trace_key({"path": path, "speedup": 1.5}))
    assert wl.load is not None and wl.load.kind == "replay" and wl.load.rate_rps == pytest.approx(1.5)
    assert [r.arrival_s for r in wl.requests] == pytest.approx([0, 2 / 3, 4 / 3, 2])
    for bad, match in (
        ({"path": path, "speedup": -1}, "speedup"),
        ({"path": path, "bogus": 1}, "bogus"),
        ({"path": str(tmp_path / "none")}, "does not exist"),
        ({"path": path, "format": "x"}, "format"),
    ):
        with pytest.raises(KvrayInputError, match=match):
            check_trace_key(bad)


@pytest.mark.parametrize("name", ["mooncake_conversation_first300.jsonl", "azure_code_2023_first500.csv"])
def test_shipped_excerpts_read(name: str) -> None:
    trace = read_trace(REPO / "traces" / name)
    assert len(trace.requests) in (300, 500)


def test_sessions_start_staggered_and_chain_after_the_answer() -> None:
    from kvray.plan.sessions import sessions_workload

    wl = sessions_workload(4, 3, user_toks=10, gen_toks=5, think_s=2.0)
    first = [r for r in wl.requests if r.after is None]
    assert [r.arrival_s for r in first] == [0.0, 0.5, 1.0, 1.5]  # think 2 s ÷ 4 sessions
    turn2 = wl.requests[8]  # turn-major ids: turn 2 of session 0
    assert (turn2.after, turn2.think_s, turn2.prompt_toks, turn2.shared_prefix_toks) == (4, 2.0, 40, 30)


def test_sessions_search_doubles_then_bisects() -> None:
    """p95 = 10 ms per session, SLO 155 ms: 1 2 4 8 meet it, 16 (160 ms) misses; bisection 12, 14, 15 meet → 15."""
    from kvray.plan.sessions import most_sessions_under_slo

    out = most_sessions_under_slo(lambda n: 0.01 * n, 0.155)
    assert out.best == 15 and sorted(out.probes) == [1, 2, 4, 8, 12, 14, 15, 16] and not out.capped
    capped = most_sessions_under_slo(lambda n: 0.0, 0.1, max_sessions=6)
    assert capped.best == 6 and capped.capped
    assert most_sessions_under_slo(lambda n: 1.0, 0.1).best == 0


def test_mooncake_file_at_another_block_size(tmp_path: Path) -> None:
    """A file written at 128 tokens per hash id (as AIPerf's --isl-block-size writes them): 3 ids make 257–384."""
    path = write_mooncake(tmp_path / "m128.jsonl", [(0, 300, 4, [1, 2, 3]), (10, 256, 4, [1, 2])])
    trace = read_trace(path, "mooncake", block_toks=128)
    assert trace.block_toks == 128 and [r.prompt_toks for r in trace.requests] == [300, 256]
    with pytest.raises(KvrayInputError, match="hash_ids of 512 tokens"):
        read_trace(write_mooncake(tmp_path / "bad.jsonl", [(0, 2000, 4, [1, 2])]))


def test_conversations_files_become_sessions(tmp_path: Path) -> None:
    """Two ShareGPT chats (whitespace words: no tokenizer): chat 0 has turns of 3 and 2 words answered by 4 and 1
    words, chat 1 one turn of 1 word. Sessions start 10 s apart, think 2 s: turn 1 of chat 0 is sent 2 s after turn
    0's answer, its prompt the history (3 + 4) and its own 2 words = 9, of which 7 shared. The OpenAI messages form
    reads the same."""
    chats = [[("human", "a b c"), ("gpt", "d e f g"), ("human", "h i"), ("gpt", "j")], [("human", "k")]]
    share = tmp_path / "sharegpt.json"
    share.write_text(json.dumps([{"conversations": [{"from": f, "value": v} for f, v in c]} for c in chats]))
    openai = tmp_path / "messages.jsonl"
    roles = {"human": "user", "gpt": "assistant"}
    openai.write_text(
        "".join(json.dumps({"messages": [{"role": roles[f], "content": v} for f, v in c]}) + "\n" for c in chats)
    )
    for path in (share, openai):
        assert detect_format(path) == "conversations"
        opts = check_trace_key({"path": str(path), "think_s": 2, "stagger_s": 10})
        wl = replay_workload(opts)
        r0, r1, r2 = wl.requests
        assert (r0.prompt_toks, r0.gen_toks, r0.arrival_s) == (3, 4, 0.0)
        assert (r1.after, r1.think_s, r1.prompt_toks, r1.shared_prefix_toks, r1.gen_toks) == (0, 2.0, 9, 7, 1)
        assert (r2.after, r2.arrival_s, r2.prompt_toks) == (None, 10.0, 1)
