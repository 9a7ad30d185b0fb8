"""Calibration recovers known efficiencies from rows the predictor generated with them."""

import json
import random

import pytest

from kvray.analysis.calibrate import calibrate
from kvray.backends.sim import SimBackend
from kvray.data.writer import DatasetWriter
from kvray.errors import KvrayInputError
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.sim.simulate import predict_cell
from kvray.spec import Cell, Workload, make_options

NVML_NAMES = {"H100-SXM": "NVIDIA H100 80GB HBM3", "L4": "NVIDIA L4"}


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


def make_dataset(out, gpu, eta_compute, eta_memory, overhead_s=0.0, noise=0.0, measured=True, seed=0):
    """A concurrency × prompt sweep 'measured' on ``gpu``: sim traces at known η, relabelled as hf rows."""
    rng = random.Random(seed)
    writer = DatasetWriter(out, tables=False)
    backend = SimBackend()
    for model in ("meta-llama/Meta-Llama-3-8B", "facebook/opt-125m"):
        for concurrency in (1, 4, 16):
            for prompt in (128, 1024, 4096):
                cell = Cell(
                    model=model,
                    backend="hf" if measured else "sim",
                    workload=Workload.uniform(concurrency, prompt, 12),
                    hardware=gpu,
                    warmup=0,
                    options=make_options(eta_compute=eta_compute, eta_memory=eta_memory, layer_overhead_s=overhead_s),
                )
                result = run_cell(backend, cell)  # an OOM cell is written too, and skipped by calibrate
                if measured:
                    result.simulated = False
                    result.hardware = {"name": NVML_NAMES[gpu]}
                for key in ("ttft_s_p50", "tpot_s_p50"):
                    if key in result.metrics:
                        result.metrics[key] *= 1 + rng.gauss(0, noise)
                writer.append(result)
    return out


def test_recovers_exact_eta_and_says_overhead_is_unidentified(tmp_path):
    data = make_dataset(tmp_path / "res", "H100-SXM", 0.62, 0.81)
    fits, path = calibrate(data, out=tmp_path / "cal.json")
    (fit,) = fits
    assert (fit.gpu, fit.layout, fit.rows) == ("H100-SXM", "hf", 18)
    assert fit.eta_compute == pytest.approx(0.62, rel=1e-3)
    assert fit.eta_memory == pytest.approx(0.81, rel=1e-3)
    assert fit.layer_overhead_s == 0.0
    assert {k: fit.identified[k] for k in ("compute", "memory", "overhead")} == {
        "compute": True,
        "memory": True,
        "overhead": False,
    }
    # every row generates 12 tokens, so the cost per finish is the cost per running request scaled: not identified
    assert fit.identified["finish_s"] is False and fit.finish_s == 0.0
    assert fit.step_overhead_s == fit.request_step_s == fit.admit_s == 0.0  # the rows have no CPU side
    assert fit.median_abs_rel_error_after["tpot"] < 1e-3 < fit.median_abs_rel_error_before["tpot"]
    saved = json.loads(path.read_text())["entries"]["H100-SXM"]["hf"]
    assert saved["eta_memory"] == pytest.approx(0.81, rel=1e-3) and saved["source"].endswith("res")


def test_recovers_noisy_eta_and_overhead_and_predictions_use_them(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "res", "H100-SXM", 0.55, 0.8, overhead_s=20e-6, noise=0.02)
    cal = tmp_path / "cal.json"
    (fit,), _ = calibrate(data, out=cal)
    assert fit.eta_compute == pytest.approx(0.55, rel=0.05)
    assert fit.eta_memory == pytest.approx(0.8, rel=0.05)
    assert fit.layer_overhead_s == pytest.approx(20e-6, rel=0.1)
    assert fit.identified["compute"] and fit.identified["memory"] and fit.identified["overhead"]
    assert fit.median_abs_rel_error_after["tpot"] < 0.03 and fit.median_abs_rel_error_before["tpot"] > 0.05

    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    monkeypatch.setenv("KVRAY_CALIBRATION", str(cal))
    calibrated = predict_cell(g, "H100-SXM", 8, 2048, 32)
    assert calibrated.efficiency_source.startswith("calibrated from 18 rows")
    truth = run_cell(
        SimBackend(),
        Cell(
            model=g.name,
            backend="sim",
            workload=Workload.uniform(8, 2048, 32),
            options=make_options(eta_compute=0.55, eta_memory=0.8, layer_overhead_s=20e-6),
        ),
    )
    assert calibrated.tpot_s == pytest.approx(truth.metrics["tpot_s_p50"], rel=0.05)
    assert calibrated.ttft_s == pytest.approx(truth.metrics["ttft_s_p50"], rel=0.05)


def test_groups_per_gpu_and_merges_into_the_file(tmp_path):
    cal = tmp_path / "cal.json"
    calibrate(make_dataset(tmp_path / "h100", "H100-SXM", 0.6, 0.85), out=cal)
    (l4,), _ = calibrate(make_dataset(tmp_path / "l4", "L4", 0.5, 0.7), out=cal)
    assert l4.rows < 18 and l4.skipped == {"status not ok": 18 - l4.rows}  # the 8B model OOMs at 16 × 4096
    entries = json.loads(cal.read_text())["entries"]
    assert entries["H100-SXM"]["hf"]["eta_memory"] == pytest.approx(0.85, rel=1e-3)
    assert entries["L4"]["hf"]["eta_memory"] == pytest.approx(0.7, rel=1e-3)


def test_simulated_rows_are_skipped_unless_asked(tmp_path):
    data = make_dataset(tmp_path / "sim", "H100-SXM", 0.6, 0.85, measured=False)
    with pytest.raises(KvrayInputError, match="18 simulated"):
        calibrate(data, out=tmp_path / "cal.json")
    (fit,), _ = calibrate(data, out=tmp_path / "cal.json", include_simulated=True)
    assert fit.gpu == "H100-SXM" and fit.layout == "hf"
