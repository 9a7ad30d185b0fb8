"""Calibration recovers the step model's CPU terms (and η) from rows made with them, run-to-run noise included.

The truth is injected: the simulator's continuous-batching engine with known η and CPU costs makes the rows, each
latency then scaled by a seeded 2 % noise (the spread of repeated measurements), and they are relabelled as a
measured paged engine on an H100. The rows are what the prescribed calibration job runs (jobs/calibrate_*.yaml):
bursts up to the engine's batch (1 … 64) at two output lengths and Poisson loads at three rates.
"""

import random

import pytest
from sim_measured import simulated_as_measured

from kvray.analysis.calibrate import calibrate_rows
from kvray.plan.loads import build_workload
from kvray.sim.costs import CPU_TERMS
from kvray.spec import LoadSpec, Workload

TRUTH = {
    "eta_compute": 0.6,
    "eta_memory": 0.85,
    "step_overhead_s": 2e-3,
    "request_step_s": 50e-6,
    "admit_s": 1e-3,
    "finish_s": 0.5e-3,
}


def rows(noise: float, seed: int = 0, serving: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    workloads = [Workload.uniform(c, 128, n) for c in (1, 2, 4, 8, 16, 32, 64) for n in (16, 48)]
    if serving:
        workloads += [build_workload(LoadSpec(kind="poisson", rate_rps=r, requests=150), 128, 32) for r in (5, 20, 40)]
    for wl in workloads:
        result = simulated_as_measured("meta-llama/Meta-Llama-3-8B", wl, layout="paged", **TRUTH)
        row = result.to_row()
        for key in ("ttft_s_p50", "tpot_s_p50", "tpot_s_mean"):
            row[key] *= 1 + rng.gauss(0, noise)
        out.append(row)
    return out


def test_recovers_the_cpu_terms_and_eta_from_noisy_rows_and_predicts_a_held_out_load():
    """With 2 % noise on 17 rows the seven parameters trade off (seeds 0–3 put η within 11 %, the per-step,
    per-request and per-admission costs within 32 %, the per-finish cost within 40 %); what the fit is for — the
    latency of a load it never saw — lands within 3 % (TPOT, E2E; seed 0: +0.7 %, +0.8 %) and 8 % (TTFT, a single
    step's worth of admission and prefill: −2.7 %)."""
    (fit,) = calibrate_rows(rows(noise=0.02))
    assert (fit.gpu, fit.layout) == ("H100-SXM", "paged")
    assert fit.steady_observations == 3 and fit.tpot_observations == 14
    assert all(fit.identified[k] for k in ("compute", "memory", *CPU_TERMS)) and not fit.identified["overhead"]
    for key in ("eta_compute", "eta_memory"):
        assert getattr(fit, key) == pytest.approx(TRUTH[key], rel=0.12)
    for key in ("step_overhead_s", "request_step_s", "admit_s"):
        assert getattr(fit, key) == pytest.approx(TRUTH[key], rel=0.35)
    assert fit.finish_s == pytest.approx(TRUTH["finish_s"], rel=0.5)
    assert fit.median_abs_rel_error_after["tpot"] < 0.03 < fit.median_abs_rel_error_before["tpot"]

    fitted = {k: getattr(fit, k) for k in TRUTH}
    held_out = build_workload(LoadSpec(kind="poisson", rate_rps=30, requests=200, seed=7), 96, 24)
    model = "meta-llama/Meta-Llama-3-8B"
    truth, predicted = (simulated_as_measured(model, held_out, layout="paged", **eff) for eff in (TRUTH, fitted))
    for metric, tolerance in (("tpot_s_p50", 0.03), ("e2e_s_p50", 0.03), ("ttft_s_p50", 0.08)):
        assert predicted.metrics[metric] == pytest.approx(truth.metrics[metric], rel=tolerance)


def test_a_burst_that_queued_past_its_prefill_still_gives_its_tpot():
    """hf-paged admits a burst over several steps: a request that waited 10 ms has a TTFT that is no prefill alone
    (10 ms > 5 % of 50 ms), but within 5 % of a 31 × 20 ms decode span it shares nearly every decode step."""
    from kvray.analysis.calibrate import observations_from_rows

    row = {
        "status": "ok",
        "simulated": False,
        "hardware": "NVIDIA H100 80GB HBM3",
        "backend": "hf-paged",
        "ttft_basis": "engine",
        "model": "kvray/tiny-llama",
        "dtype": "fp32",
        "prompt_toks": 32,
        "gen_toks": 32,
        "concurrency": 8,
        "ttft_s_p50": 0.05,
        "tpot_s_p50": 0.02,
    }

    def kinds(queue: float) -> list[str]:
        groups, _ = observations_from_rows([{**row, "queue_s_max": queue}])
        return [o.kind for o in groups[("H100-SXM", "paged")]]

    assert kinds(0.001) == ["ttft", "tpot"]
    assert kinds(0.010) == ["tpot"]
    assert observations_from_rows([{**row, "queue_s_max": 0.05}])[1] == {"requests queued (more than one batch)": 1}
