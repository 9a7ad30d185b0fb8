"""fp8 KV's dequantisation term in the step model (kvray/sim/costs.py ``kv_dequant_s_per_gb``), hand-worked: it
adds its rate × the fp8 KV bytes the attention touches, nothing for bf16 KV, and comes from a calibration entry."""

from __future__ import annotations

import json

import pytest

from kvray.hardware.gpus import get_gpu
from kvray.model.resolve import resolve_geometry
from kvray.sim.costs import Efficiency, StepRequests, StepTimer, efficiency_for, step_roofs
from kvray.sim.passes import decode_step_cost

# Llama-3-8B, one sequence decoding at 1024 positions in fp8: 1024 × 32 layers × 2 (K, V) × 8 KV heads × 128 dims
# × 1 B = 67,108,864 B of KV read. At 0.01 s per GB the dequantisation adds 0.01 × 0.067108864 = 0.671 ms.
KV_BYTES = 1024 * 32 * 2 * 8 * 128
ADDED_S = 0.01 * KV_BYTES / 1e9


def test_dequantisation_adds_its_rate_times_the_fp8_kv_bytes_read():
    g, gpu = resolve_geometry("meta-llama/Meta-Llama-3-8B"), get_gpu("H100-SXM")
    eff, plain = Efficiency(kv_dequant_s_per_gb=0.01), Efficiency()
    fp8 = decode_step_cost(g, [1024], "bf16", "fp8", "paged")
    assert fp8.decode_attention_bytes == KV_BYTES == 67_108_864
    roofs = step_roofs(fp8, g, gpu, "bf16", kv_dtype="fp8")
    assert roofs.time_s(eff) - roofs.time_s(plain) == pytest.approx(ADDED_S, rel=1e-9)
    assert abs(ADDED_S - 0.671e-3) < 1e-6
    timer, untimed = StepTimer(g, gpu, "bf16", eff, kv_dtype="fp8"), StepTimer(g, gpu, "bf16", plain, kv_dtype="fp8")
    work = StepRequests(1)
    assert timer.time_s(fp8, work)[0] - untimed.time_s(fp8, work)[0] == pytest.approx(ADDED_S, rel=1e-9)
    assert timer.time_s(fp8, work)[0] == pytest.approx(roofs.time_s(eff), rel=1e-12)  # the two timers agree
    bf16 = decode_step_cost(g, [1024], "bf16", "bf16", "paged")  # bf16 KV: nothing to dequantise
    assert step_roofs(bf16, g, gpu, "bf16", kv_dtype="bf16").time_s(eff) == pytest.approx(
        step_roofs(bf16, g, gpu, "bf16").time_s(plain), rel=1e-12
    )
    assert StepTimer(g, gpu, "bf16", eff, kv_dtype="bf16").time_s(bf16, work) == StepTimer(
        g, gpu, "bf16", plain
    ).time_s(bf16, work)


def test_the_term_comes_from_a_calibration_entry_and_is_never_negative(tmp_path):
    path = tmp_path / "calibration.json"
    entry = {"eta_compute": 0.6, "eta_memory": 0.8, "layer_overhead_s": 0.0, "kv_dequant_s_per_gb": 0.02, "rows": 3}
    path.write_text(json.dumps({"version": 1, "entries": {"H100-SXM": {"paged": entry}}}))
    eff = efficiency_for(get_gpu("H100-SXM"), "paged", path)
    assert eff.kv_dequant_s_per_gb == 0.02 and "fp8 KV dequantisation 20 ms/GB" in eff.describe()
    assert efficiency_for(get_gpu("A100-80GB-SXM"), "paged", path).kv_dequant_s_per_gb == 0.0  # the default
    with pytest.raises(Exception, match="KV dequantisation"):
        Efficiency(kv_dequant_s_per_gb=-1)


def test_a_refit_keeps_the_term_set_by_hand(tmp_path):
    """``kvray calibrate`` does not fit the term (that takes fp8-KV rows measured on the GPU): a refit of an entry
    replaces its η and CPU terms and keeps the dequantisation rate its user set."""
    from kvray.analysis.calibrate import calibrate
    from kvray.backends.sim import SimBackend
    from kvray.data.writer import DatasetWriter
    from kvray.runner.run import run_cell
    from kvray.spec import Cell, Workload, make_options

    writer, backend = DatasetWriter(tmp_path / "rows", tables=False), SimBackend()
    for concurrency in (1, 8):
        for prompt in (128, 2048):
            cell = Cell(
                model="facebook/opt-125m",
                backend="hf",
                workload=Workload.uniform(concurrency, prompt, 8),
                hardware="H100-SXM",
                warmup=0,
                options=make_options(eta_compute=0.5, eta_memory=0.8),
            )
            result = run_cell(backend, cell)
            result.simulated, result.hardware = False, {"name": "NVIDIA H100 80GB HBM3"}  # "measured" at known η
            writer.append(result)
    path = tmp_path / "calibration.json"
    entry = {"eta_compute": 0.9, "eta_memory": 0.9, "kv_dequant_s_per_gb": 0.02}
    path.write_text(json.dumps({"version": 1, "entries": {"H100-SXM": {"hf": entry}}}))
    calibrate(tmp_path / "rows", out=path)
    refit = json.loads(path.read_text())["entries"]["H100-SXM"]["hf"]
    assert refit["eta_memory"] == pytest.approx(0.8, rel=1e-3) and refit["kv_dequant_s_per_gb"] == 0.02
