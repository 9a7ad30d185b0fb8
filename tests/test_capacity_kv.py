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


def test_equal_cost_candidates_are_ranked_on_brackets_narrowed_alike():
    """Llama-3-8B on one H100 at 20 req/s, 512 prompt + 128 output tokens, p99 TTFT 1 s and TPOT 100 ms: bf16 and
    fp8 KV both serve it on one replica, $4.76/h each — a tie the headroom breaks. Each one's search stopped once
    one replica was known to suffice (a bracket up to 25 % wide); before ranking both are bisected to 5 %. fp8 KV
    reads half the KV bytes per decode step with the same weights and the same prefill FLOPs, so a step is never
    slower: its highest rate is no lower than bf16's."""
    g = resolve_geometry(LLAMA3_8B)
    plan = plan_capacity(
        g,
        traffic_from_flags(512, 128),
        20.0,
        {"ttft_ms": 1000, "tpot_ms": 100},
        gpus=["H100-SXM"],
        tps=[1],
        kv_dtypes=["bf16", "fp8"],
        prices=PRICES,
    )
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
