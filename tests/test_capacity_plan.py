"""`kvray plan` and the capacity planner: hand-worked cases (weights that need TP, an SLO below one weight read,
the cost arithmetic, a price file over the table), the Pareto frontier, the trace adapter, and bad input."""

from __future__ import annotations

import json

import pytest

from kvray.capacity.pareto import ParetoPoint, cost_frontier, frontier
from kvray.capacity.planner import costs, plan_capacity
from kvray.capacity.prices import PRICES, load_prices
from kvray.capacity.traffic import traffic_from_flags, traffic_from_trace
from kvray.cli import main
from kvray.errors import KvrayInputError
from kvray.model.resolve import resolve_geometry


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


def run_json(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args, "--json"])
    out = capsys.readouterr()
    assert exit_info.value.code == 0, out.err
    return json.loads(out.out)


def test_a_model_too_large_for_one_gpu_needs_tp(capsys):
    """Llama-3.1-70B in bf16: 70.55e9 parameters × 2 B = 141 GB (131 GiB) > one H100's 79.6 GiB, so TP 1 does not
    fit; TP 2 holds 65.7 GiB per GPU, under 0.9 × 79.6 = 71.7 GiB, and leaves a KV pool: the best is TP 2."""
    d = run_json(
        [
            "-m",
            "meta-llama/Llama-3.1-70B",
            "--rate",
            "1",
            "--prompt-toks",
            "128",
            "--gen-toks",
            "16",
            "--slo",
            "ttft_ms=2000,tpot_ms=100",
            "--gpus",
            "H100-SXM",
            "--tp",
            "1",
            "2",
        ],
        capsys,
    )
    by_tp = {c["tp"]: c for c in d["candidates"]}
    assert by_tp[1]["reason"].startswith("does not fit") and not by_tp[1]["meets_slo"]
    assert by_tp[1]["max_rps_per_replica"] is None and by_tp[1]["replicas"] is None
    assert d["best"]["tp"] == 2 and d["best"]["gpu"] == "H100-SXM" and by_tp[2]["meets_slo"]
    assert set(d["best"]) >= {"gpu", "tp", "replicas", "kv_dtype", "cost_per_hour", "cost_per_mtok_output"}
    assert set(by_tp[2]) >= {"max_rps_per_replica", "meets_slo", "reason"}


def test_an_slo_below_one_weight_read_is_unreachable():
    """Llama-3-8B on an L4: 8.03e9 parameters × 2 B = 16.06 GB ÷ 300 GB/s = 53.5 ms to read the weights once, so no
    decode step — and no TPOT — is faster: a 50 ms TPOT is unreachable on one L4, whatever the load. At TP 2
    each GPU reads half (26.8 ms): the same SLO is not refused for that reason there."""
    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    assert abs(g.params - 8.03e9) < 0.01e9  # the published parameter count the hand calculation uses
    plan = plan_capacity(g, traffic_from_flags(256, 32), 1.0, {"tpot_ms": 50}, gpus=["L4"], tps=[1, 2], prices=PRICES)
    by_tp = {c.tp: c for c in plan.candidates}
    assert "below one weight read" in by_tp[1].reason and "53.5 ms" in by_tp[1].reason
    assert by_tp[1].reason.startswith("SLO unreachable on one replica") and not by_tp[1].meets_slo
    assert "weight read: " not in by_tp[2].reason
    assert by_tp[2].weight_read_ms == pytest.approx(26.8, abs=0.1)


def test_the_cost_arithmetic():
    """10 req/s on replicas serving 4 req/s each: ⌈10 / 4⌉ = 3 replicas × TP 2 = 6 GPUs × $4/h = $24/h; output
    10 × 100 tokens/s × 3600 = 3.6 M tokens/h → $6.67 per M output tokens; all tokens 10 × 400 × 3600 = 14.4 M/h →
    $1.67 per M."""
    got = costs(10, 4, 2, 4.0, 300, 100)
    assert got["replicas"] == 3 and got["gpus"] == 6 and got["cost_per_hour"] == pytest.approx(24.0)
    assert got["cost_per_mtok_output"] == pytest.approx(24 / 3.6)
    assert got["cost_per_mtok_total"] == pytest.approx(24 / 14.4)
    assert costs(8, 4, 1, 1.0, 1, 1)["replicas"] == 2  # exactly divisible: no extra replica


def test_a_price_file_overrides_the_table(tmp_path, capsys):
    prices = tmp_path / "prices.yaml"
    prices.write_text("L4: 0.5\nh100 sxm: 9\n")
    table = load_prices(prices)
    assert table["L4"].usd_per_gpu_hour == 0.5 and table["L4"].date == "given"
    assert table["H100-SXM"].usd_per_gpu_hour == 9.0  # any spelling the GPU table matches
    assert table["A100-80GB-SXM"] == PRICES["A100-80GB-SXM"]  # the rest keep the bundled price
    args = [
        "-m",
        "facebook/opt-125m",
        "--rate",
        "20",
        "--prompt-toks",
        "128",
        "--gen-toks",
        "16",
        "--slo",
        "ttft_ms=200,tpot_ms=20",
        "--gpus",
        "L4",
        "--tp",
        "1",
    ]
    bundled = run_json(args, capsys)["best"]
    given = run_json([*args, "--prices", str(prices)], capsys)["best"]
    assert bundled["cost_per_hour"] == pytest.approx(bundled["replicas"] * 1 * PRICES["L4"].usd_per_gpu_hour)
    assert given["cost_per_hour"] == pytest.approx(given["replicas"] * 1 * 0.5)
    assert given["replicas"] == bundled["replicas"]


def test_every_bundled_price_says_where_and_when():
    for name, price in PRICES.items():
        assert price.usd_per_gpu_hour > 0 and price.source and price.date[:4].isdigit(), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "1"], "--slo is required"),
        (["--rate", "1", "--slo", "ttft_ms=abc"], "ttft_ms"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--gpus", "B900"], "unknown GPU"),
        (["--rate", "-3", "--slo", "ttft_ms=100"], "--rate"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--prefix-caching", "maybe"], "--prefix-caching"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--tp", "0"], "--tp"),
        (["--slo", "ttft_ms=100"], "--rate is required"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--percentile", "101"], "--percentile"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--router", "random"], "--router"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--trace", "/nonexistent.jsonl"], "--trace"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--limit", "5"], "need --trace FILE"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--calibration", "/nonexistent.json"], "--calibration"),
        (["--rate", "1", "--slo", "ttft_ms=100", "--measured", "/tmp"], "--output"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "-m", "facebook/opt-125m", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n- 2\n", "expected a mapping"),
        ("B900: 1\n", "unknown GPU"),
        ("L4: -1\n", "positive number"),
        ("L4: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_price_file_is_one_line_and_exit_2(tmp_path, text, message, capsys):
    bad = tmp_path / "prices.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "-m", "facebook/opt-125m", "--rate", "1", "--slo", "ttft_ms=100", "--prices", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "--prices" in err and err.count("\n") == 1


def test_the_pareto_frontier_by_hand():
    """(user tok/s, GPU tok/s): a (10, 100) and c (50, 40) trade off; b (10, 80) is beaten by a, d (30, 30) by c."""
    pts = {
        n: ParetoPoint("H100-SXM", 1, "predicted", u, t, 3.6)
        for n, (u, t) in {"a": (10, 100), "b": (10, 80), "c": (50, 40), "d": (30, 30)}.items()
    }
    assert frontier(list(pts.values())) == [pts["a"], pts["c"]]
    # $3.6/GPU-hour at 100 tok/s per GPU = 360,000 tok/h → $10 per M output tokens
    assert pts["a"].usd_per_mtok_output == pytest.approx(10.0)
    assert cost_frontier(list(pts.values())) == [pts["a"], pts["c"]]


def test_a_mooncake_trace_keeps_lengths_arrivals_and_reuse_by_its_blocks(tmp_path):
    """Equal leading hash_ids are equal 512-token blocks. By vLLM's rule at 16-token blocks: request 1 shares hash
    ids 1, 2 with request 0 — its first 1024 tokens, 64 full blocks, all cached (1024 ≤ its 1200 − 1) — then its
    block 9 differs from request 0's block 3: 1024 hit tokens; request 2 starts with another block: 0. Hit rate
    1024 / (1100 + 1200 + 300) = 39.4 %. The arrivals keep their gaps when scaled to a rate."""
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 1000, "input_length": 1200, "output_length": 20, "hash_ids": [1, 2, 9]},
        {"timestamp": 3000, "input_length": 300, "output_length": 5, "hash_ids": [7]},
    ]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    traffic = traffic_from_trace(trace)
    reqs = traffic.trace
    assert [(r.prompt_toks, r.gen_toks, r.arrival_s) for r in reqs] == [(1100, 10, 0), (1200, 20, 1), (300, 5, 3)]
    assert [r.shared_prefix_toks for r in reqs] == [0, 1024, 0]
    assert reqs[1].prefix_group == reqs[0].prefix_group != reqs[2].prefix_group  # grouped by the first block
    assert traffic.has_prefixes and any("39.4%" in n for n in traffic.notes)
    assert traffic.trace_rate_rps == pytest.approx(2 / 3)  # 2 gaps over 3 s
    probe = traffic.requests(rate_rps=4 / 3, n=5)  # twice the trace's rate: gaps halved
    # the second lap starts one mean gap (0.75 s) after the first lap's last arrival, as new content
    assert [r.arrival_s for r in probe] == pytest.approx([0, 0.5, 1.5, 2.25, 2.75])
    assert probe[3].block_ids == (11, 12, 13) and probe[3].prefix_group not in {r.prefix_group for r in probe[:3]}
    assert traffic_from_trace(trace, speedup=2).trace_rate_rps == pytest.approx(4 / 3)
    assert len(traffic_from_trace(trace, limit=2).trace) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(KvrayInputError, match="not a trace kvray knows"):
        traffic_from_trace(bad)


def test_a_traces_reuse_behind_a_router_follows_its_blocks(tmp_path):
    """4 prompts of 1024 tokens, hash ids [1, k]: their first 512 tokens (32 blocks of 16) are equal. One replica
    (prefix affinity keys on that first block: all 4 on one) computes them once, 3 hit: 3 × 512 / 4096 = 0.375;
    round-robin puts requests 0, 2 and 1, 3 on two replicas, each computes them once: 2 × 512 / 4096 = 0.25."""
    from kvray.capacity.routing import predict_every_policy

    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 100 * k, "input_length": 1024, "output_length": 2, "hash_ids": [1, k]} for k in range(2, 6)]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rates = predict_every_policy(traffic_from_trace(trace).requests(1.0, 4), replicas=2)
    assert rates["prefix_affinity"] == pytest.approx(0.375) and rates["round_robin"] == pytest.approx(0.25)


AZURE_2023 = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.0000000,200,10
2023-11-16 18:15:46.5000000,300,20
2023-11-16 18:15:47.0000000,400,30
2023-11-16 18:15:47.5000000,500,40
2023-11-16 18:15:48.0000000,600,50
"""
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time
0,ChatGPT,100,20,120,Conversation log,s1,0.5
1,ChatGPT,40,10,50,API log,,0.2
2,ChatGPT,50,30,80,Conversation log,s1,0.5
3,ChatGPT,60,0,60,API log,,0
4,ChatGPT,80,16,96,API log,,0.3
"""
SMALL_PLAN = ["-m", "facebook/opt-125m", "--gpus", "H100-SXM", "--tp", "1", "--slo", "ttft_ms=1000,tpot_ms=100"]


def test_an_azure_and_a_burstgpt_trace_plan(tmp_path, capsys):
    """Azure 2023: 5 requests 0.5 s apart — 2 req/s, prompts 200…600 (mean 400), outputs 10…50 (mean 30), no
    blocks: no reuse. BurstGPT: the 0-token response at 3 s is a failure, dropped; 4 requests over 4 s — 0.75 req/s,
    × --speedup 2 = 1.5. Session s1's second turn sends the conversation so far: 50 + 100 + 20 = 170 tokens, of
    which the first turn's prompt is cached in full blocks of 16 — 96 tokens (the answer it sends is not the one
    the engine generated, so it does not hit); prompts 100, 40, 170, 80 (mean 97.5): 96 / 390 = 24.6 % hit."""
    azure = tmp_path / "azure.csv"
    azure.write_text(AZURE_2023)
    d = run_json([*SMALL_PLAN, "--trace", str(azure)], capsys)
    assert d["rate_rps"] == pytest.approx(2.0) and "azure trace" in d["traffic"]
    assert (d["mean_prompt_toks"], d["mean_gen_toks"]) == (400, 30)
    assert d["best"] is not None and not d["best"]["prefix_caching"]  # nothing shared: caching off by default

    burst = tmp_path / "burst.csv"
    burst.write_text(BURSTGPT)
    d = run_json([*SMALL_PLAN, "--trace", str(burst), "--trace-format", "burstgpt", "--speedup", "2"], capsys)
    assert d["rate_rps"] == pytest.approx(1.5) and "burstgpt trace" in d["traffic"]
    assert (d["mean_prompt_toks"], d["mean_gen_toks"]) == (97.5, 19)
    assert any("24.6%" in n for n in d["notes"]) and any("failed" in n for n in d["notes"])
    assert d["best"] is not None and d["best"]["prefix_caching"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trace-format", "parquet"], "unknown trace format"),
        (["--speedup", "2", "--rate", "1"], "--speedup"),
        (["--limit", "1"], "--limit"),
        (["--speedup", "0"], "--speedup"),
    ],
)
def test_bad_trace_flags_are_one_line_and_exit_2(tmp_path, extra, message, capsys):
    azure = tmp_path / "azure.csv"
    azure.write_text(AZURE_2023)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *SMALL_PLAN, "--trace", str(azure), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_prefix_caching_needs_prefixes_to_matter():
    traffic = traffic_from_flags(128, 16)
    assert not traffic.has_prefixes
    shared = traffic_from_flags(128, 16, groups=4, prefix_toks=256)
    assert shared.has_prefixes and shared.lengths[0][0] == 384  # the prefix, then the drawn prompt
    probe = shared.requests(1.0, 8)
    assert {r.prefix_group for r in probe} <= {0, 1, 2, 3} and probe[0].shared_prefix_toks == 256
    assert [r.prefix_group for r in shared.requests(1.0, 8)] == [r.prefix_group for r in probe]  # seeded


def test_offload_pays_above_the_pool_when_a_transfer_beats_a_recompute():
    """Llama-3-8B, bf16 KV: 2 (K, V) × 32 layers × 8 KV heads × 128 × 2 B = 131,072 B per token. Over an A100's
    PCIe Gen4 x16 (16 GT/s × 16 lanes × 128/130 ÷ 8 = 31.5 GB/s one way) a token comes back in 4.16 µs; recomputing
    it costs at least 2 × 6.98e9 matmul parameters ÷ 312 TFLOP/s = 44.7 µs even at peak. Offload pays, above the
    working set W = the GPU pool's tokens."""
    from kvray.capacity.search import Replica
    from kvray.capacity.whatif import offload_verdict
    from kvray.hardware.gpus import get_gpu

    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    traffic = traffic_from_flags(256, 32, groups=8, prefix_toks=1024)
    v = offload_verdict(Replica(g, get_gpu("A100-80GB-SXM")), traffic, 400_000)
    assert v.kv_bytes_per_token_per_gpu == 131_072
    assert v.transfer_s_per_token == pytest.approx(131_072 / 31.5077e9, rel=1e-4)
    assert v.prefill_s_per_token > 44.7e-6 and v.pays
    assert v.working_set_threshold_tokens == 400_000 and "W = 400,000 tokens" in v.verdict
    assert v.working_set_tokens == 8 * 1024 and "within W" in v.verdict


def test_disaggregation_adds_the_prompt_kv_transfer_to_ttft():
    """A 1000-token prompt of Llama-3-8B carries 1000 × 131,072 B = 131 MB of KV; over an H100's NVLink 4 (900 GB/s
    both ways, 450 one way) that is 0.291 ms more TTFT."""
    from kvray.capacity.search import Replica
    from kvray.capacity.whatif import disaggregation
    from kvray.hardware.gpus import get_gpu

    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    d = disaggregation(Replica(g, get_gpu("H100-SXM")), traffic_from_flags(1000, 100), 10.0, 50.0, pool_tokens=400_000)
    assert d.kv_transfer_bytes_per_request == 1000 * 131_072
    assert d.ttft_added_s == pytest.approx(131.072e6 / 450e9)
    assert d.prefill_groups >= 1 and d.decode_groups >= 1 and d.gpus == d.prefill_groups + d.decode_groups


def record(gpu: str, tp: int, tpot_s: float, output_tps: float, simulated: bool) -> dict:
    """A results row as cells.jsonl holds it, reduced to what the Pareto figure reads."""
    return {
        "status": "ok",
        "simulated": simulated,
        "hardware": {"name": gpu},
        "metrics": {"tpot_s_p50": tpot_s, "output_tps": output_tps},
        "cell": {
            "model": "kvray/tiny-llama",
            "tensor_parallel": tp,
            "hardware": gpu,
            "backend": "sim" if simulated else "vllm",
        },
    }


def test_a_results_folder_gets_a_pareto_figure_across_deployments(tmp_path):
    """Per GPU: output tok/s ÷ TP; per user: 1 ÷ TPOT p50. H100 TP 2 at 20 ms and 4000 tok/s → (50, 2000)."""
    from types import SimpleNamespace

    from kvray.capacity.pareto import points_from_records
    from kvray.figures.pareto import has_pareto_data, pareto_figures

    rows = [
        record("H100", 2, 0.020, 4000, False),
        record("H100-SXM", 2, 0.010, 1000, True),
        record("NVIDIA L4", 1, 0.050, 500, True),
    ]
    points = points_from_records(rows, PRICES)
    assert (points[0].gpu, points[0].tokens_per_s_per_user, points[0].tokens_per_s_per_gpu) == ("H100-SXM", 50, 2000)
    assert points[0].measured and not points[1].measured
    assert points[0].usd_per_mtok_output == pytest.approx(4.76 / (2000 * 3600) * 1e6)
    assert not has_pareto_data(rows[:2]) and has_pareto_data(rows)  # one deployment is not a frontier
    (fig,) = pareto_figures(SimpleNamespace(records=rows), tmp_path)
    assert fig.name == "pareto_kvray--tiny-llama" and (tmp_path / f"{fig.name}.png").is_file()
    assert "H100-SXM TP2 measured" in fig.series and "H100-SXM TP2 predicted" in fig.series
    assert "H100-SXM TP2 (50 tok/s/user, 2000 tok/s/GPU)" in " ".join(fig.notes)
