"""`kvray calibrate --cpu-host`: this machine's CPU as a simulator device, its peaks measured, CPU rows fitted to it."""

from __future__ import annotations

import os

import pytest

from kvray.analysis.calibrate import calibrate_rows, observations_from_rows
from kvray.hardware.gpus import GPUS, match_gpu
from kvray.hardware.host import HOST_NAME, HostPeaks, measure_host

# A host with round figures, so the roofs are known: decode of kvray/tiny-llama (4 layers, 13.6 MB fp32 weights)
# reads ≥ 13.6 MB a step, 1.4 ms at 10 GB/s — below the 12 ms steps the rows below inject.
HOST = HostPeaks(
    fp32_gflops=50.0, bandwidth_gbps=10.0, threads=2, matmul_n=1024, copy_mib=256, repeats=5, memory_gib=16.0
)
STEP_S = 0.012  # every decode step, whatever the batch: a fixed per-step cost (Python, scheduling), no roof


def cpu_row(concurrency: int, **extra):
    base = {
        "status": "ok",
        "simulated": False,
        "hardware": "cpu",
        "backend": "vllm",
        "ttft_basis": "client-http",
        "model": "kvray/tiny-llama",
        "dtype": "fp32",
        "kv_dtype": "fp32",
        "prompt_toks": 32,
        "gen_toks": 32,
        "concurrency": concurrency,
        "prompt_toks_list": ",".join(["32"] * concurrency),
        "ttft_s_p50": 5.0,  # on the client's clock, absurd on purpose: the fit must not use it
        "tpot_s_p50": STEP_S,
        "queue_s_max": 0.0,
    }
    return {**base, **extra}


def test_host_peaks_are_measured_physically_possible_and_never_in_the_gpu_table():
    peaks = measure_host(matmul_n=512, copy_mib=64, repeats=3)
    threads = len(os.sched_getaffinity(0))
    assert peaks.threads == threads
    # upper bound: two AVX-512 FMA units (64 fp32 FLOP a cycle) at 6 GHz on every thread; lower: a working CPU
    assert 0.1 < peaks.fp32_gflops < threads * 6 * 64
    assert 0.1 < peaks.bandwidth_gbps < 2000  # far above any socket's DRAM bandwidth (12-channel DDR5 ≈ 460 GB/s)
    spec = peaks.spec()
    assert spec.name == HOST_NAME and spec.fp32_tflops == spec.tflops("bf16") == peaks.fp32_gflops / 1e3
    assert HOST_NAME not in GPUS and match_gpu("cpu") is None and match_gpu(HOST_NAME) is None


def test_cpu_rows_are_skipped_without_a_host_and_fitted_on_tpot_alone_with_one():
    rows = [cpu_row(c) for c in (1, 2, 4, 8)]
    rows.append({**cpu_row(1), "hardware": "NVIDIA H100 80GB HBM3"})  # a GPU server row: its TTFT still disqualifies
    _, skipped = observations_from_rows(rows)
    assert skipped == {"hardware not in the GPU table": 4, "TTFT not on the engine's clock (ttft_basis)": 1}

    (fit,) = calibrate_rows(rows, host=HOST)
    assert (fit.gpu, fit.layout, fit.rows) == (HOST_NAME, "paged", 4)
    assert (fit.ttft_observations, fit.tpot_observations) == (0, 4)
    # a flat 12 ms step: neither roof is identified (they keep their defaults, the memory roof 13.6 MB at
    # 10 GB/s × 0.9 = 1.51 ms), and the rest is a CPU cost per step; a per-layer launch floor says the same as
    # the per-step cost for one model, so it is not identified either
    assert {k: fit.identified[k] for k in ("compute", "memory", "overhead", "step_overhead_s")} == {
        "compute": False,
        "memory": False,
        "overhead": False,
        "step_overhead_s": True,
    }
    assert (fit.eta_compute, fit.eta_memory, fit.layer_overhead_s) == pytest.approx((0.7, 0.9, 0.0))
    assert 0.0100 < fit.step_overhead_s < 0.0106  # 12 ms less the default roofs (weights + KV: 1.5–1.7 ms)
    # the default memory roof grows with the batch's KV where the rows stay flat: within the 1 % refit tolerance
    assert fit.median_abs_rel_error_after["tpot"] < 0.01
    assert fit.host_peaks == HOST.to_dict() and "measured" in fit.host_peaks["method"]
    assert fit.skipped == {"TTFT not on the engine's clock (ttft_basis)": 1}
