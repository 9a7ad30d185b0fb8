"""The continuous-batching model (kvray/sim/serving.py) and its saturation search, against physics and queueing.

Expected values come from published figures worked by hand (Meta-Llama-3-8B's exact parameter count and
geometry, the GPUs' datasheet bandwidth and FLOP/s) and from queueing theory (a serial engine's capacity is
1 / service time; Little's law in a closed loop), never from the code under test.
"""

import math
from dataclasses import dataclass

import pytest

from kvray.backends import get_backend
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import get_gpu
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.sim.saturation import find_saturation
from kvray.sim.serving import EngineConfig, PoolTooSmall, serve
from kvray.sim.simulate import Efficiency
from kvray.spec import Cell, LoadSpec, RequestSpec, Workload, make_options

MODEL = "meta-llama/Meta-Llama-3-8B"
LLAMA = resolve_geometry(MODEL)
EFF = Efficiency(0.7, 0.9)
# Meta-Llama-3-8B, written out: 8,030,261,248 parameters, untied 128,256 × 4,096 embedding and LM head, 32 layers
# of 32 query heads × 128, KV 32 layers × 8 heads × 128 × 2 (K, V) × 2 bytes per token.
PARAMS, VOCAB, HIDDEN, LAYERS = 8_030_261_248, 128_256, 4_096, 32
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2
BANDWIDTH = {"H100-SXM": 3350e9, "A100-80GB-SXM": 2039e9, "L4": 300e9}  # datasheet bytes/s
BF16 = {"H100-SXM": 989e12, "A100-80GB-SXM": 312e12, "L4": 121e12}  # dense FLOP/s
BLOCK = 16


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


@dataclass(frozen=True)
class Req:
    id: int
    prompt_toks: int
    gen_toks: int
    arrival_s: float = 0.0
    after: int | None = None
    think_s: float = 0.0


def blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK)


def attention_flops(past: int, queries: int) -> float:
    """QKᵀ and AV: 2 FLOPs × 32 heads × (128 + 128) per query-key pair per layer; causal pairs by hand."""
    pairs = sum(past + i for i in range(1, queries + 1))
    return LAYERS * 2 * 32 * 256 * pairs


def hand_single(gpu: str, p: int, g: int) -> tuple[float, list[float]]:
    """(prefill step, decode steps) of one request alone: prefill reads the weights less the embedding rows it does
    not look up, writes its block-rounded KV; decode step k reads the weights (one embedding row) and the KV of
    p + k positions in whole blocks. Each step takes the slower of compute at η 0.7 and memory at η 0.9."""
    bw, flops = BANDWIDTH[gpu] * 0.9, BF16[gpu] * 0.7
    body, head = PARAMS - 2 * VOCAB * HIDDEN, VOCAB * HIDDEN

    def step(past: int, queries: int) -> float:
        f = 2 * body * queries + 2 * head + attention_flops(past, queries)
        b = (PARAMS - (VOCAB - queries) * HIDDEN) * 2 + blocks(past + queries) * BLOCK * KV_PER_TOKEN
        return max(f / flops, b / bw)

    return step(0, p), [step(p + k - 1, 1) for k in range(1, g)]


def test_single_request_ttft_and_tpot_equal_the_hand_roofline():
    prefill, decode = hand_single("H100-SXM", 512, 16)
    run = serve(LLAMA, get_gpu("H100-SXM"), [Req(0, 512, 16)], eff=EFF)
    (t,) = run.timings
    assert t.start_s == 0.0 and t.arrival_s == 0.0
    assert t.token_times_s[0] == pytest.approx(prefill, rel=1e-9)
    tpot = (t.end_s - t.token_times_s[0]) / 15
    assert tpot == pytest.approx(sum(decode) / 15, rel=1e-9)
    # 512 × 2 × 7.0e9 FLOPs at 692 TFLOP/s (compute-bound); 15.0 GB of weights at 3.0 TB/s per decode step
    assert 0.0103 < prefill < 0.0106 and 0.0049 < tpot < 0.0051
    assert len(run.steps) == 17 and run.steps[-1].running == 0  # 16 steps, then the engine falls idle


def test_serial_engine_saturates_at_one_over_service_time():
    """max_num_seqs 1 is a D/D/1 queue: capacity μ = 1 / (prefill + 15 decode steps). The saturation rate (the
    highest achieved) is μ; the knee (highest sustainable offered) lies in [μ (1 − precision), μ / follow] by the
    search's definition: within 4 % of μ here."""
    prefill, decode = hand_single("H100-SXM", 512, 16)
    mu = 1 / (prefill + sum(decode))
    curve = find_saturation(
        LLAMA,
        get_gpu("H100-SXM"),
        [(512, 16)],
        cfg=EngineConfig(max_num_seqs=1),
        eff=EFF,
        arrivals="constant",
        curve=(0.5,),
    )
    assert curve.knee_rps == pytest.approx(mu, rel=0.04)
    assert curve.saturation_rps == pytest.approx(mu, rel=0.01)
    assert curve.service_s == pytest.approx(1 / mu, rel=1e-9)
    half = next(p for p in curve.points if p.offered_rps == pytest.approx(curve.knee_rps_nominal / 2))
    assert half.queue_s_p99 == 0.0 and half.running_peak == 1  # below capacity nobody waits
    over = [p for p in curve.points if p.offered_rps > mu / 0.97 * 1.01]
    assert over and not any(p.sustainable for p in over)


def test_pool_of_n_requests_runs_at_most_n_and_a_small_pool_preempts():
    block_bytes = BLOCK * KV_PER_TOKEN  # 2 MiB
    # 20 + 8 − 1 = 27 positions: 2 blocks from admission to the end, so a 3-request pool runs exactly 3 at a time.
    fits = serve(
        LLAMA,
        get_gpu("H100-SXM"),
        [Req(i, 20, 8) for i in range(10)],
        eff=EFF,
        cfg=EngineConfig(kv_pool_bytes=3 * 2 * block_bytes),
    )
    assert fits.pool.blocks == 6 and fits.running_peak == 3 and fits.preemptions == 0
    assert max(s.kv_blocks_used for s in fits.steps) == 6
    assert all(len(t.token_times_s) == 8 for t in fits.timings)
    # 16-token prompts (1 block) growing to 55 positions (4 blocks) in an 8-block pool: 8 are admitted, they
    # cannot all grow, so the engine preempts, recomputes, and still finishes every request in full.
    tight = serve(
        LLAMA,
        get_gpu("H100-SXM"),
        [Req(i, 16, 40) for i in range(8)],
        eff=EFF,
        cfg=EngineConfig(kv_pool_bytes=8 * block_bytes),
    )
    assert tight.running_peak == 8 and tight.preemptions > 0
    assert max(s.kv_blocks_used for s in tight.steps) <= 8
    assert all(len(t.token_times_s) == 40 for t in tight.timings)
    assert sum(t.preemptions for t in tight.timings) == tight.preemptions
    # A request larger than the whole pool is refused before anything runs (vLLM refuses to start).
    with pytest.raises(PoolTooSmall, match="needs 4 KV blocks"):
        serve(LLAMA, get_gpu("H100-SXM"), [Req(0, 16, 40)], cfg=EngineConfig(kv_pool_bytes=3 * block_bytes))


def test_the_running_set_at_once_schedules_as_request_by_request(monkeypatch):
    """The engine passes over its running requests with array operations when no preemption can come
    (kvray/sim/engine.py) and request by request otherwise. Forced request by request every step, the same loads —
    an open loop that never runs short of blocks and one that preempts — give the same run, step for step."""
    from dataclasses import asdict

    from kvray.sim.engine import Engine

    block_bytes = BLOCK * KV_PER_TOKEN
    loads = [
        # an 8,193-token prompt alone (its last position a one-token prefill chunk), then prompts up to 20,000
        # tokens: running prefills that use up the step's token budget
        (
            [Req(0, 8193, 4)]
            + [Req(i, 20_000 if i % 9 == 0 else 100 + 37 * i, 5 + i % 7, 0.5 + 0.01 * i) for i in range(1, 40)],
            EngineConfig(),
        ),
        ([Req(i, 16, 40, arrival_s=0.002 * i) for i in range(12)], EngineConfig(kv_pool_bytes=8 * block_bytes)),
    ]

    def runs():
        out = []
        for reqs, cfg in loads:
            run = serve(LLAMA, get_gpu("H100-SXM"), reqs, eff=EFF, cfg=cfg)
            out.append(([asdict(t) for t in run.timings], [asdict(s) for s in run.steps], run.preemptions))
        return out

    at_once = runs()
    assert at_once[1][2] > 0  # the second load does preempt
    monkeypatch.setattr(Engine, "_running_at_once", lambda self: None)
    assert runs() == at_once


def test_closed_loop_keeps_exactly_u_requests_in_the_system():
    """U users, think time 0: each request is sent when its predecessor ends, so U are in the system at every
    step; Little's law: throughput × mean E2E = U."""
    users, per_user = 4, 25
    reqs = [
        Req(k * users + u, 128, 32, after=None if k == 0 else (k - 1) * users + u)
        for k in range(per_user)
        for u in range(users)
    ]
    run = serve(LLAMA, get_gpu("H100-SXM"), reqs, eff=EFF)
    assert len(run.timings) == users * per_user and not run.unsent
    ends = {reqs[t.index].id: t.end_s for t in run.timings}
    for t in run.timings:
        r = reqs[t.index]
        assert t.arrival_s == (0.0 if r.after is None else ends[r.after])  # sent the moment its predecessor ended
    busy = [s for s in run.steps if s.dt_s > 0]
    assert max(s.running + s.waiting for s in busy) == users
    assert sum(s.running == users for s in busy) / len(busy) > 0.95
    span = max(ends.values())
    throughput = len(run.timings) / span
    mean_e2e = sum(t.end_s - t.arrival_s for t in run.timings) / len(run.timings)
    assert throughput * mean_e2e == pytest.approx(users, rel=0.02)


def test_duration_stops_sending_and_think_time_delays():
    reqs = [Req(0, 64, 4), Req(1, 64, 4, after=0, think_s=0.5), Req(2, 64, 4, after=1, think_s=0.5)]
    run = serve(LLAMA, get_gpu("H100-SXM"), reqs, eff=EFF, duration_s=0.6)
    first, second = run.timings
    assert second.arrival_s == pytest.approx(first.end_s + 0.5)
    assert run.unsent == [2]  # due at second.end + 0.5 > 0.6 s
    with pytest.raises(KvrayInputError, match="unknown request 7"):
        serve(LLAMA, get_gpu("H100-SXM"), [Req(0, 8, 2, after=7)])


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    chunked = serve(
        LLAMA, get_gpu("H100-SXM"), [Req(0, 4096, 2)], eff=EFF, cfg=EngineConfig(max_num_batched_tokens=1024)
    )
    whole = serve(
        LLAMA,
        get_gpu("H100-SXM"),
        [Req(0, 4096, 2)],
        eff=EFF,
        cfg=EngineConfig(max_num_batched_tokens=1024, chunked_prefill=False),
    )
    assert [s.prefill_tokens for s in chunked.steps[:4]] == [1024] * 4
    assert [s.prefill_tokens for s in whole.steps[:1]] == [4096]
    # the same FLOPs either way, but every chunk reads the weights again: chunking costs 3 more weight reads
    assert chunked.timings[0].token_times_s[0] > whole.timings[0].token_times_s[0]


def test_saturation_orders_gpus_by_bandwidth_for_a_decode_bound_mix():
    """64-token prompts, 128 generated, 32 sequences at most: every step is memory-bound on all three GPUs, so the
    capacity is 32 / (128 steps × (weights read + KV of 32 sequences at their mean block-rounded context) /
    (bandwidth × 0.9)), by hand from the datasheets: 48.4, 29.4 and 4.3 requests/s."""
    ctx = sum(blocks(64 + k) * BLOCK for k in range(1, 128)) / 127
    step_bytes = (PARAMS - (VOCAB - 32) * HIDDEN) * 2 + 32 * ctx * KV_PER_TOKEN
    found = {}
    for gpu in ("H100-SXM", "A100-80GB-SXM", "L4"):
        curve = find_saturation(
            LLAMA,
            get_gpu(gpu),
            [(64, 128)],
            cfg=EngineConfig(max_num_seqs=32),
            eff=EFF,
            arrivals="constant",
            span_s=20,
            min_requests=200,
            precision=0.03,
            curve=(),
        )
        hand = 32 / (128 * step_bytes / (BANDWIDTH[gpu] * 0.9))
        assert curve.saturation_rps == pytest.approx(hand, rel=0.06), gpu
        found[gpu] = curve.knee_rps
    assert found["H100-SXM"] > found["A100-80GB-SXM"] > found["L4"]


def test_prefix_caching_skips_the_shared_blocks():
    """Four requests of one group sharing 500 of 600 prompt tokens, each sent while the first still runs: the later
    three reuse its 31 full blocks (496 tokens), prefill only 104 tokens and hold those blocks once."""
    reqs = [RequestSpec(i, 600, 64, 0.05 * i, prefix_group=1, shared_prefix_toks=500) for i in range(4)]
    gpu = get_gpu("H100-SXM")
    cold = serve(LLAMA, gpu, reqs, eff=EFF)
    warm = serve(LLAMA, gpu, reqs, eff=EFF, cfg=EngineConfig(prefix_caching=True))
    assert warm.prefix_hit_tokens == 3 * 496 and cold.prefix_hit_tokens == 0
    assert [s.prefill_tokens for s in warm.steps if s.prefill_tokens] == [600, 104, 104, 104]
    assert cold.kv_blocks_peak - warm.kv_blocks_peak == 3 * 31
    ttft = [t.token_times_s[0] - t.arrival_s for t in warm.timings]
    assert all(t < ttft[0] for t in ttft[1:])


# --- the sim backend through the runner ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    b = get_backend("sim")
    yield b
    b.close()


SCHEDULE = (0.0, 0.013, 0.05, 0.051, 0.2, 0.2, 0.31, 0.5)  # injected arrival offsets, seconds


def test_poisson_cell_traces_keep_the_schedule(backend):
    requests = tuple(RequestSpec(i, 256, 16, a) for i, a in enumerate(SCHEDULE))
    wl = Workload("uniform", requests, load=LoadSpec(kind="poisson", rate_rps=16.0, requests=len(SCHEDULE)))
    result = run_cell(backend, Cell(model=MODEL, backend="sim", workload=wl, hardware="A100-80GB-SXM"))
    assert result.status == "ok", result.reason
    traces = sorted(result.traces, key=lambda t: t.request_id)
    assert [t.arrival_s for t in traces] == list(SCHEDULE)
    assert all(t.start_s >= t.arrival_s and t.output_toks == 16 and t.sent_s == t.arrival_s for t in traces)
    sim = result.extra["sim"]
    assert sim["engine"] == "continuous-batching" and sim["gpu"] == "A100-80GB-SXM" and sim["preemptions"] == 0
    points = result.extra["kv_timeline"]
    assert points and {"t_s", "kv_usage", "kv_used_bytes", "running", "waiting", "preemptions"} <= set(points[0])
    assert max(p["running"] for p in points) >= 2  # arrivals 1 ms apart share steps
    mem = result.memory
    assert mem["kv_reserved_bytes"] > mem["kv_predicted_bytes"] > 0
    assert mem["kv_predicted_bytes"] % (BLOCK * KV_PER_TOKEN) == 0
    assert result.metrics["preemptions"] == 0


def test_closed_loop_cell_arrives_after_its_predecessor(backend):
    requests = (
        RequestSpec(0, 128, 8),
        RequestSpec(1, 128, 8),
        RequestSpec(2, 128, 8, after=0, think_s=0.25),
        RequestSpec(3, 128, 8, after=1, think_s=0.25),
    )
    wl = Workload("uniform", requests, load=LoadSpec(kind="closed", users=2, requests=4))
    result = run_cell(backend, Cell(model=MODEL, backend="sim", workload=wl, hardware="L4"))
    assert result.status == "ok", result.reason
    t = {tr.request_id: tr for tr in result.traces}
    assert t[2].arrival_s == pytest.approx(t[0].end_s + 0.25) and t[3].arrival_s == pytest.approx(t[1].end_s + 0.25)


def test_engine_options_and_oom(backend):
    wl = Workload.uniform(4, 512, 16)
    small = run_cell(
        backend,
        Cell(
            model=MODEL,
            backend="sim",
            workload=wl,
            hardware="H100-SXM",
            options=make_options(layout="paged", max_num_seqs=1),
        ),
    )
    assert small.status == "ok" and small.extra["sim"]["max_num_seqs"] == 1 and small.extra["sim"]["running_peak"] == 1
    assert small.metrics["queue_s_max"] > 0
    oom = run_cell(
        backend,
        Cell(
            model=MODEL,
            backend="sim",
            workload=wl,
            hardware="L4",
            options=make_options(layout="paged", gpu_memory_utilization=0.5),
        ),
    )
    assert oom.status == "oom" and "no KV pool left on L4" in oom.reason
    # the 8-block pool of the preemption test above, through the runner: the count reaches the row and the timeline
    tight = run_cell(
        backend,
        Cell(
            model=MODEL,
            backend="sim",
            workload=Workload.uniform(8, 16, 40),
            hardware="H100-SXM",
            options=make_options(layout="paged", kv_pool_bytes=8 * BLOCK * KV_PER_TOKEN),
        ),
    )
    assert tight.status == "ok" and tight.metrics["preemptions"] == tight.extra["sim"]["preemptions"] > 0
    points = tight.extra["kv_timeline"]
    assert max(p["preemptions"] for p in points) == tight.extra["sim"]["preemptions"]
    assert max(p["kv_usage"] for p in points) == 1.0 and len(points) <= 501 + tight.extra["sim"]["preemptions"]
    with pytest.raises(KvrayInputError, match="max_num_seqs"):
        backend.validate_options({"max_num_seqs": 0})
    with pytest.raises(KvrayInputError, match="chunked_prefill"):
        backend.validate_options({"chunked_prefill": "maybe"})


def test_the_runner_holds_a_cells_timeline_once(backend):
    """Each run returns its own repeat's points; the runner joins a cell's repeats — the same cell run twice (a
    rerun) holds each repeat once, not the first run's points again (the backends used to keep this state)."""
    requests = tuple(RequestSpec(i, 256, 16, a) for i, a in enumerate(SCHEDULE))
    wl = Workload("uniform", requests, load=LoadSpec(kind="poisson", rate_rps=16.0, requests=len(SCHEDULE)))
    cell = Cell(model=MODEL, backend="sim", workload=wl, hardware="A100-80GB-SXM", repeats=2, warmup=1)
    first, again = run_cell(backend, cell), run_cell(backend, cell)
    for result in (first, again):
        repeats = [p["repeat"] for p in result.extra["kv_timeline"]]
        assert sorted(set(repeats)) == [0, 1]  # the warmup (repeat -1) is not the cell's
        assert repeats.count(0) == repeats.count(1)  # the simulator is deterministic: equal repeats, equal points
    assert len(again.extra["kv_timeline"]) == len(first.extra["kv_timeline"])
