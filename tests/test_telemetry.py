"""Telemetry: the NVML path against a fake pynvml (a contract test: no GPU here), the CPU path for real, RAPL's
sysfs format, and a sweep on real Ray that leaves timeline.parquet with CPU samples for every cell and a fig10.

Expected values come from outside the code under test: an injected power schedule (a constant 250 W GPU),
a child process's own CPU-time accounting (CLOCK_PROCESS_CPUTIME_ID, not /proc/PID/stat that the sampler reads),
the bytes it allocated, and the requests' own timestamps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import types

import pytest

from kvray.measure import telemetry as tel

POWER_W = 250.0


class FakeNVMLError(Exception):
    pass


def fake_pynvml(energy_counter: bool = True, throttle_mask: int = 0x4) -> types.ModuleType:
    """A pynvml with one GPU drawing a constant POWER_W from the moment it is created: its energy counter (mJ)
    grows as POWER_W × elapsed time, as a real one does under a steady load."""
    m = types.ModuleType("pynvml")
    born = time.perf_counter()
    m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 1, 2, 0  # type: ignore[attr-defined]
    m.nvmlInit = lambda: None  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"  # type: ignore[attr-defined]
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=35)  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30)  # type: ignore[attr-defined]
    m.nvmlDeviceGetPowerUsage = lambda h: int(POWER_W * 1000)  # type: ignore[attr-defined]  # mW

    def energy(h: str) -> int:
        if not energy_counter:
            raise FakeNVMLError("Not Supported")
        return int(7_000_000 + POWER_W * 1000 * (time.perf_counter() - born))  # mJ since "driver load"

    m.nvmlDeviceGetTotalEnergyConsumption = energy  # type: ignore[attr-defined]
    m.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == 1 else 2619  # type: ignore[attr-defined]
    m.nvmlDeviceGetTemperature = lambda h, kind: 61  # type: ignore[attr-defined]
    m.nvmlDeviceGetCurrentClocksEventReasons = lambda h: throttle_mask  # type: ignore[attr-defined]
    return m


def run_fake_gpu(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.6, **fake: object) -> tel.TelemetrySampler:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(**fake))  # type: ignore[arg-type]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sources = tel.TelemetrySources(gpus=("cuda:0",), cuda_context=False)
    with tel.TelemetrySampler(sources, 0.05) as sampler:
        sampler.mark(0)
        time.sleep(seconds)
    return sampler


def test_nvml_contract_energy_from_the_counter_of_a_steady_250_w_gpu(monkeypatch):
    sampler = run_fake_gpu(monkeypatch)
    window_s = sampler.ticks[-1][0] - sampler.ticks[0][0]
    f = sampler.figures(output_toks=1000, requests=10)
    # physics: a constant 250 W for the window is 250 J/s × window; every figure follows from it
    assert f["energy_j"] == pytest.approx(POWER_W * window_s, rel=0.02)
    assert f["power_avg_w"] == pytest.approx(POWER_W, rel=0.02) and f["power_peak_w"] == POWER_W
    assert f["j_per_output_tok"] == pytest.approx(POWER_W * window_s / 1000, rel=0.02)
    assert f["j_per_request"] == pytest.approx(POWER_W * window_s / 10, rel=0.02)
    assert f["tok_per_s_per_w"] == pytest.approx(1000 / (POWER_W * window_s), rel=0.02)
    assert f["gpu_util_mean"] == 80 and f["throttled"] == 1.0 and f["throttle_reasons"] == "sw_power_cap"
    assert "NVML total-energy counter" in f["energy_basis"] and f["energy_reason"] is None
    rows = sampler.timeline({0: sampler.marks[0][0]})
    metrics = {m for _, _, source, m, _ in rows if source == "gpu:0"}
    assert metrics == {
        "gpu_util_pct",
        "mem_util_pct",
        "mem_used_bytes",
        "power_w",
        "energy_j",
        "sm_clock_mhz",
        "mem_clock_mhz",
        "temp_c",
        "throttle_mask",
    }
    energy = [v for _, _, s, m, v in rows if (s, m) == ("gpu:0", "energy_j")]
    assert energy[0] == 0 and energy == sorted(energy)  # joules since the window opened, never decreasing


def test_nvml_contract_a_gpu_without_an_energy_counter_integrates_its_power_readings(monkeypatch):
    sampler = run_fake_gpu(monkeypatch, energy_counter=False, throttle_mask=0x1)  # 0x1: idle, not throttling
    window_s = sampler.ticks[-1][0] - sampler.ticks[0][0]
    f = sampler.figures(output_toks=500, requests=5)
    assert f["energy_j"] == pytest.approx(POWER_W * window_s, rel=0.01)
    assert "power readings integrated" in f["energy_basis"]
    assert f["throttled"] == 0.0 and f["throttle_reasons"] is None


def test_without_nvml_energy_is_nan_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    with tel.TelemetrySampler(tel.TelemetrySources(gpus=("cuda:0",)), 0.05) as sampler:
        sampler.mark(0)
        time.sleep(0.15)
    f = sampler.figures(output_toks=10, requests=1)
    assert math.isnan(f["energy_j"]) and math.isnan(f["j_per_output_tok"]) and math.isnan(f["gpu_util_mean"])
    assert "NVML unavailable for cuda:0" in f["gpu_telemetry_reason"] and "NVML unavailable" in f["energy_reason"]
    assert f["telemetry_samples"] >= 2 and not math.isnan(f["cpu_util_mean"])  # the CPU side still measured


SPINNER = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()                      # "go": the sampler is watching
t = time.process_time()                   # CLOCK_PROCESS_CPUTIME_ID: the process's own CPU accounting
block = b"\\x01" * (128 * 2**20)          # 128 MiB written, so resident
while time.process_time() - t < 0.6:
    pass
print(time.process_time() - t, flush=True)
sys.stdin.readline()                      # "exit", after the sampler closed
"""


def test_cpu_path_tracks_a_child_busy_for_a_known_cpu_time_and_memory():
    child = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline().strip() == "ready"  # interpreter up: its start-up is not in the window
        sources = tel.TelemetrySources(pids=lambda: [child.pid], scope="child")
        with tel.TelemetrySampler(sources, 0.05) as sampler:
            sampler.mark(0)
            child.stdin.write("go\n")
            child.stdin.flush()
            cpu_s = float(child.stdout.readline())
            time.sleep(0.15)
        child.stdin.write("exit\n")
        child.stdin.flush()
    finally:
        child.wait(timeout=30)
    cpu = sampler._series("cpu", "cpu_pct")
    times = [t for t, _ in sampler.ticks]
    # Σ cpu_pct × Δt over the ticks is the CPU time /proc accounted to the child; the child's own clock agrees
    integral = sum(pct / 100 * (t - times[times.index(t) - 1]) for t, pct in cpu)
    assert integral == pytest.approx(cpu_s, rel=0.1, abs=0.05)
    rss = [v for _, v in sampler._series("cpu", "rss_bytes")]
    assert max(rss) - min(rss) == pytest.approx(128 * 2**20, rel=0.1)
    f = sampler.figures(output_toks=0, requests=0)
    assert f["telemetry_scope"] == "child" and f["cpu_util_mean"] > 0


def test_rapl_sysfs_contract_package_domains_and_counter_wrap(tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    (tmp_path / "intel-rapl:0:0").mkdir(parents=True)  # a sub-domain (core): not a package, not summed
    pkg.mkdir()
    (pkg / "max_energy_range_uj").write_text("2000000\n")
    (pkg / "energy_uj").write_text("1500000\n")
    domains, reason = tel.rapl_domains(tmp_path)
    assert reason is None and [p.parent.name for p, _ in domains] == ["intel-rapl:0"]
    reader = tel._RaplReader(domains)
    assert reader.read() == {"rapl_energy_j": 0.0}
    (pkg / "energy_uj").write_text("500000\n")  # wrapped past 2 J: 0.5 J to the top, 0.5 J after
    assert reader.read()["rapl_energy_j"] == pytest.approx(1.0)
    assert tel.rapl_domains(tmp_path / "absent")[1].startswith("no ")


def test_interval_option_checked():
    assert tel.interval_from_options({}) == tel.DEFAULT_INTERVAL_S
    assert tel.interval_from_options({"telemetry_interval_s": 0}) == 0
    for bad in (-1, "often", 0.001, float("nan")):
        with pytest.raises(Exception, match="telemetry_interval_s"):
            tel.interval_from_options({"telemetry_interval_s": bad})


def test_a_sweep_leaves_cpu_samples_for_every_cell_on_the_traces_clock_and_a_fig10(ray_session, tmp_path):
    import pandas as pd

    from kvray.figures.timeline import figure_name
    from kvray.plan.job import job_from_dict
    from kvray.report import make_all
    from kvray.sweep import run_job

    job = job_from_dict(
        {
            "name": "timeline",
            "models": ["kvray/tiny-llama"],
            "backends": ["synthetic"],
            "dtypes": ["fp32"],
            "warmup": 0,
            "repeats": 2,
            "options": {"ttft_s": 0.05, "tpot_s": 0.02, "max_batch": 2},
            "grid": {"prompt_toks": [8], "gen_toks": [12], "concurrency": [1, 4]},
        }
    )
    out = run_job(job, tmp_path / "out", progress=False).output_dir
    cells = pd.read_parquet(out / "cells.parquet")
    timeline = pd.read_parquet(out / "timeline.parquet")
    traces = pd.read_parquet(out / "traces.parquet")
    assert list(timeline.columns) == ["cell_id", "repeat", "t_s", "source", "metric", "value"]
    assert len(cells) == 2 and (cells["status"] == "ok").all()
    for cell_id in cells["cell_id"]:
        cpu = timeline[(timeline["cell_id"] == cell_id) & (timeline["metric"] == "cpu_pct")]
        assert set(cpu["repeat"]) == {0, 1}
        for repeat in (0, 1):  # samples span the repeat's requests, on their clock
            ts = timeline[(timeline["cell_id"] == cell_id) & (timeline["repeat"] == repeat)]["t_s"]
            tr = traces[(traces["cell_id"] == cell_id) & (traces["repeat"] == repeat)]
            assert ts.min() <= tr["arrival_s"].min() + 0.1 and ts.max() >= tr["end_s"].max() - 0.1
    row = cells.iloc[0]
    assert math.isnan(row["energy_j"]) and row["energy_reason"]  # this VM: no GPU, no readable RAPL
    assert row["telemetry_samples"] >= 4 and row["telemetry_interval_s"] == 0.1
    cells_jsonl = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert all("timeline" not in c["extra"] for c in cells_jsonl)  # samples live in timeline.*, not the row
    paths = make_all(out)
    slowest = cells.loc[cells["ttft_s_p99"].idxmax(), "cell_id"]
    assert (out / "figures" / f"{figure_name(slowest)}.png").is_file()
    assert f"--cell {slowest}" in paths.markdown.read_text()


def test_the_simulator_estimates_energy_as_tdp_times_time_named_as_such():
    from kvray.hardware.gpus import get_gpu
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import predict_cell

    g = resolve_geometry("meta-llama/Meta-Llama-3-8B")
    p = predict_cell(g, "H100-SXM", concurrency=8, prompt_toks=512, gen_toks=64)
    assert get_gpu("H100-SXM").tdp_w == 700 and get_gpu("L4").tdp_w == 72  # the datasheets' maximum board power
    assert p.tdp_power_w == 700
    assert p.energy_j_tdp_estimate == pytest.approx(700 * p.e2e_s)  # the GPU at its TDP for the whole cell
    assert p.j_per_output_tok_tdp_estimate == pytest.approx(700 * p.e2e_s / (8 * 64))
    d = p.to_dict()
    assert "energy_j" not in d and not any(k.startswith("predicted_") for k in d)  # never a measured name
    p4 = predict_cell(resolve_geometry("meta-llama/Llama-3.1-70B"), "H100-SXM", 8, 512, 64, tp=4)
    assert p4.tdp_power_w == 4 * 700 and p4.energy_j_tdp_estimate == pytest.approx(4 * 700 * p4.e2e_s)


def fake_pynvml_group(
    power_w: tuple[float, ...], used_bytes: tuple[int, ...], start_mj: tuple[int, ...]
) -> types.ModuleType:
    """A pynvml with one GPU per entry: GPU i draws ``power_w[i]`` from the moment the fake is created (its energy
    counter, mJ, starts at ``start_mj[i]`` and grows at that rate) and holds ``used_bytes[i]`` of device memory."""
    m = fake_pynvml()
    born = time.perf_counter()
    index = {f"handle{i}": i for i in range(len(power_w))}
    m.nvmlDeviceGetCount = lambda: len(power_w)  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used_bytes[index[h]], total=80 * 2**30)  # type: ignore[attr-defined]
    m.nvmlDeviceGetPowerUsage = lambda h: int(power_w[index[h]] * 1000)  # type: ignore[attr-defined]
    m.nvmlDeviceGetTotalEnergyConsumption = lambda h: int(  # type: ignore[attr-defined]
        start_mj[index[h]] + power_w[index[h]] * 1000 * (time.perf_counter() - born)
    )
    return m


def test_nvml_contract_a_tp_group_is_metered_on_every_gpu_summed_with_the_per_gpu_figure_beside(monkeypatch):
    """A TP=2 worker: two GPUs at 300 W and 200 W holding 30 and 20 GiB. By hand: the group draws 500 W, so over
    a window of w seconds energy_j = 500·w, per GPU 250·w; memory 50 GiB in all, 30 GiB the most on one GPU.
    The counters start at different values (7,000 J and 123,000 J since driver load): only increases count."""
    from kvray.backends.base import BackendBase

    gib = 2**30
    fake = fake_pynvml_group((300.0, 200.0), (30 * gib, 20 * gib), (7_000_000, 123_000_000))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    class OnGpu(BackendBase):
        name = "on-gpu"
        device = "cuda:0"

    sources = OnGpu().telemetry_sources(gpus=2)  # the backend contract names the whole group
    assert sources.gpus == ("cuda:0", "cuda:1")
    sources.cuda_context = False  # find the fake's handles by index, without torch
    with tel.TelemetrySampler(sources, 0.05) as sampler:
        sampler.mark(0)
        time.sleep(0.5)
    window_s = sampler.ticks[-1][0] - sampler.ticks[0][0]
    f = sampler.figures(output_toks=1000, requests=10)
    assert f["telemetry_gpus"] == 2
    assert f["energy_j"] == pytest.approx(500 * window_s, rel=0.02)
    assert f["energy_j_per_gpu"] == pytest.approx(250 * window_s, rel=0.02)
    assert f["power_avg_w"] == pytest.approx(500, rel=0.02) and f["power_peak_w"] == 500
    assert f["j_per_output_tok"] == pytest.approx(500 * window_s / 1000, rel=0.02)
    assert f["gpu_mem_peak_bytes"] == 50 * gib and f["gpu_mem_peak_bytes_per_gpu_max"] == 30 * gib
    assert "gpu:0, gpu:1" in f["energy_basis"]
    sources = {s for _, _, s, m, _ in sampler.timeline({0: sampler.marks[0][0]}) if m == "energy_j"}
    assert sources == {"gpu:0", "gpu:1"}


def test_group_devices_are_the_workers_gpus_from_its_first():
    assert tel.group_devices("cuda:0", 4) == ("cuda:0", "cuda:1", "cuda:2", "cuda:3")
    assert tel.group_devices("cuda:2", 2) == ("cuda:2", "cuda:3") and tel.group_devices("cuda:1") == ("cuda:1",)
    assert tel.group_devices("cpu", 4) == ()


def test_hf_paged_engine_gauges_join_the_cpu_samples_on_the_traces_clock(tmp_path):
    """hf-paged's own scheduler, sampled by its KV sampler, lands in the cell's timeline as source "engine": each
    sample counts at least the requests its traces had streaming then (first token before, last token after)."""
    from kvray.backends.hf_paged import HFPagedBackend
    from kvray.data.reader import read_timeline
    from kvray.data.writer import DatasetWriter
    from kvray.runner.run import run_cell
    from kvray.spec import Cell, Workload, make_options

    backend = HFPagedBackend()
    try:
        cell = Cell(
            model="kvray/tiny-llama",
            workload=Workload.uniform(4, 32, 24),
            backend="hf-paged",
            dtype="fp32",
            device="cpu",
            warmup=1,
            repeats=1,
            options=make_options(telemetry_interval_s=0.05),
        )
        result = run_cell(backend, cell)
    finally:
        backend.close()
    assert result.status == "ok", result.reason
    DatasetWriter(tmp_path).append(result)
    tl = read_timeline(tmp_path, result.cell_id)
    running = tl[(tl["source"] == "engine") & (tl["metric"] == "running")]
    assert len(running) >= 2 and set(tl["source"]) == {"cpu", "engine"}
    for t_s, value in zip(running["t_s"], running["value"], strict=True):
        streaming = sum(1 for t in result.traces if t.token_times_s[0] <= t_s < t.token_times_s[-1])
        assert value >= streaming, (t_s, value, streaming)
    assert running["value"].max() >= 1  # the gauge rose while requests were in flight
    cpu = tl[tl["metric"] == "cpu_pct"]
    assert cpu["t_s"].min() <= 0.2 and cpu["t_s"].max() >= max(t.end_s for t in result.traces) - 0.1
