"""The plan's KV choices, hand-worked: candidates of equal cost ranked by headroom known to the same precision,
and fp8 KV's pool twice bf16's."""

from __future__ import annotations

import pytest

from kvray.capacity.planner import plan_capacity
from kvray.capacity.prices import PRICES
from kvray.capacity.search import PRECISION, bisect_rate
from kvray.capacity.traffic import traffic_from_flags
from kvray.model.resolve import resolve_geometry

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


def test_a_plan_bisects_only_to_the_replica_count_and_refines_on_demand():
    """A replica passes up to 10 req/s (an injected verdict). From the bracket (8, 12.5) the plan of 20 req/s
    bisects at √(8 × 12.5) = 10: passes, and ⌈20 ÷ 10⌉ = ⌈20 ÷ 12.5⌉ = 2 replicas — the count is decided, the
    search stops with (10, 12.5): 10 is a lower bound, the top anywhere up to 25 % above. Refined to 5 %: √(10 ×
    12.5) = 11.18 fails, √(10 × 11.18) = 10.57 fails, √(10 × 10.57) = 10.28 fails, 10.28 ÷ 10 ≤ 1.05: (10, 10.28)."""
    seen: list[float] = []

    def passes(rate: float) -> bool:
        seen.append(rate)
        return rate <= 10 + 1e-9

    assert bisect_rate(passes, 8, 12.5, PRECISION, target_rps=20) == pytest.approx((10, 12.5))
    lo, hi = bisect_rate(passes, 10, 12.5, PRECISION)
    assert (lo, hi) == pytest.approx((10, 10.28), abs=0.005)
    assert seen == pytest.approx([10, 11.180, 10.574, 10.283], abs=0.001)


@pytest.fixture(scope="module")
def h100_plan():
    """Llama-3-8B on one H100 at 20 req/s, 512 prompt + 128 output tokens, p99 TTFT 1 s and TPOT 100 ms, KV bf16
    and fp8."""
    return plan_capacity(
        resolve_geometry(LLAMA3_8B),
        traffic_from_flags(512, 128),
        20.0,
        {"ttft_ms": 1000, "tpot_ms": 100},
        gpus=["H100-SXM"],
        tps=[1],
        kv_dtypes=["bf16", "fp8"],
        prices=PRICES,
    )


def test_equal_cost_candidates_are_ranked_on_brackets_narrowed_alike(h100_plan):
    """The plan of ``h100_plan``: bf16 and fp8 KV both serve it on one replica, $4.76/h each — a tie the headroom
    breaks. Each one's search stopped once one replica was known to suffice (a bracket up to 25 % wide); before
    ranking both are bisected to 5 %. fp8 KV
    reads half the KV bytes per decode step with the same weights and the same prefill FLOPs, so a step is never
    slower: its highest rate is no lower than bf16's."""
    plan = h100_plan
    by_kv = {c.kv_dtype: c for c in plan.candidates}
    assert {c.replicas for c in plan.candidates} == {1} and {c.cost_per_hour for c in plan.candidates} == {4.76}
    for c in plan.candidates:
        assert c.max_rps_bracket is not None and c.max_rps_bracket[1] is not None
        lo, hi = c.max_rps_bracket
        assert lo == c.max_rps_per_replica and hi / lo <= 1 + PRECISION + 1e-9
        assert c.at_max is not None and c.at_max["rate_rps"] == lo and c.at_max["tpot_ms"] <= 100
    fp8, bf16 = by_kv["fp8"], by_kv["bf16"]
    assert fp8.max_rps_per_replica is not None and bf16.max_rps_per_replica is not None
    assert fp8.max_rps_bracket[1] >= bf16.max_rps_per_replica  # type: ignore[index]
    assert plan.best is fp8 and plan.candidates[1] is bf16
    assert bf16.reason.startswith("as cheap as the best") and "within 5%" in bf16.reason


def test_fp8_kv_doubles_the_pool_of_the_same_gpu_and_tp(h100_plan):
    """One H100 (85,520,809,984 B) at vLLM's gpu_memory_utilization 0.9 holds 76,968,728,985.6 B; less Llama-3-8B's
    weights (8.03 × 10⁹ parameters × 2 B = 16,060,522,496 B), the profiling pass's activation peak (738,710,528 B)
    and the runtime's 512 MiB (536,870,912 B) leaves 59,632,625,049.6 B for KV. A token of Llama-3-8B holds
    K and V for 32 layers × 8 KV heads × 128 dims: 2 × 32 × 8 × 128 × 2 B = 131,072 B in bf16, 65,536 B in fp8;
    a 16-token block 2,097,152 B or 1,048,576 B. The pool: ⌊59,632,625,049.6 ÷ 2,097,152⌋ = 28,435 blocks =
    454,960 tokens in bf16; ⌊… ÷ 1,048,576⌋ = 56,870 blocks = 909,920 tokens in fp8 — twice as many."""
    by_kv = {c.kv_dtype: c for c in h100_plan.candidates}
    assert by_kv["bf16"].kv_pool_tokens == 454_960
    assert by_kv["fp8"].kv_pool_tokens == 909_920 == 2 * by_kv["bf16"].kv_pool_tokens


def test_offload_over_nvlink_c2c_and_the_host_memory_given():
    """Llama-3-8B in bf16 KV: 131,072 B per token. Over a GH200's NVLink-C2C (900 GB/s both ways, 450 one way) a
    token comes back in 131,072 ÷ 450 × 10⁹ = 0.291 µs, 7.1× faster than over PCIe Gen5 x16 (63.0 GB/s: 2.08 µs);
    64 GiB of host memory hold 64 × 2³⁰ ÷ 2¹⁷ = 524,288 tokens."""
    from kvray.capacity.search import Replica
    from kvray.capacity.whatif import HostMemory, offload_verdict
    from kvray.hardware.gpus import get_gpu

    replica = Replica(resolve_geometry(LLAMA3_8B), get_gpu("H100-SXM"))
    traffic = traffic_from_flags(256, 32, groups=8, prefix_toks=1024)
    c2c = offload_verdict(replica, traffic, 400_000, host=HostMemory(64, "nvlink-c2c"))
    assert c2c.transfer_s_per_token == pytest.approx(131_072 / 450e9) and c2c.host_link == "NVLink-C2C"
    assert c2c.host_capacity_tokens == 524_288 and "up to 924,288 tokens with 64 GiB" in c2c.verdict
    pcie = offload_verdict(replica, traffic, 400_000)
    assert pcie.transfer_s_per_token == pytest.approx(131_072 / 63.0154e9, rel=1e-4) and pcie.host_kv_gib == 256
    assert pcie.transfer_s_per_token / c2c.transfer_s_per_token == pytest.approx(450 / 63.0154, rel=1e-4)


@pytest.mark.parametrize(("gib", "link", "message"), [(0, "pcie", "--host-memory-gib"), (1, "usb", "--host-link")])
def test_bad_host_memory_is_one_line_and_exit_2(gib, link, message, capsys):
    from kvray.cli import main

    with pytest.raises(SystemExit) as exit_info:
        args = ["--rate", "1", "--slo", "ttft_ms=100", "--host-memory-gib", str(gib), "--host-link", link]
        main(["plan", "-m", "facebook/opt-125m", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_disaggregated_split_is_priced_against_the_colocated_best(h100_plan):
    """The best of ``h100_plan``: one H100 at $4.76/h. The split's prefill and decode groups of TP 1 are priced
    at the same $4.76 per GPU-hour: G GPUs cost G × 4.76 $/h; at 20 req/s × 128 output tokens × 3600 s = 9.216 M
    output tokens an hour, G × 4.76 ÷ 9.216 $ per M."""
    d = h100_plan.what_ifs["disaggregation"]
    assert d["gpus"] == d["prefill_groups"] + d["decode_groups"] >= 2  # a pool each: never fewer than 2 GPUs
    assert d["cost_per_hour"] == pytest.approx(d["gpus"] * 4.76)
    assert d["cost_per_mtok_output"] == pytest.approx(d["gpus"] * 4.76 / 9.216)
    assert (d["colocated_gpus"], d["colocated_cost_per_hour"]) == (1, 4.76)
    extra = (d["gpus"] - 1) * 100
    assert f"${d['gpus'] * 4.76:.2f}/h — {extra} % more than co-located (1 GPU, $4.76/h)" in d["verdict"]
    assert d["ttft_alone_ms"] > d["ttft_added_s"] * 1e3 > 0
