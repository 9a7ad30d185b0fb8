"""The sim backend through the real runner: predicted traces become the same metrics the predictor gives."""

import pytest

from kvray.backends import get_backend
from kvray.backends.base import Backend
from kvray.model.kvmath import kv_bytes_sequence
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.sim.simulate import Efficiency, predict_cell
from kvray.spec import Cell, Workload, make_options

MODEL = "meta-llama/Meta-Llama-3-8B"


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


@pytest.fixture(scope="module")
def backend():
    b = get_backend("sim")
    yield b
    b.close()


def cell(workload, hardware="H100-SXM", model=MODEL, **options):
    return Cell(model=model, backend="sim", workload=workload, hardware=hardware, options=make_options(**options))


def test_protocol_and_device_info(backend):
    assert isinstance(backend, Backend) and backend.simulated is True
    backend.load(cell(Workload.uniform(1, 8, 2), hardware="NVIDIA L40S"))
    info = backend.device_info()
    assert info == {"name": "L40S", "memory_bytes": 46068 * 2**20, "simulated": True, "accelerator_type": "L40S"}


# Published figures the expected values below are built from, independently of kvray's simulator:
LLAMA3_8B_PARAMS = 8_030_261_248  # Meta-Llama-3-8B, untied embeddings
VOCAB, HIDDEN = 128_256, 4_096
KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V × 32 layers × 8 KV heads × head_dim 128 × bf16
DATASHEET = {"H100-SXM": (3350e9, 989e12), "RTX-4090": (1008e9, 165e12)}  # bytes/s, dense bf16 FLOP/s
ETA_COMPUTE, ETA_MEMORY = 0.7, 0.9  # llm-analysis's default efficiencies (no calibration file in these tests)


def hand_roofline(gpu: str, c: int, p: int, g: int) -> tuple[float, float]:
    """(TTFT, TPOT) of c equal requests in one static batch, by hand: prefill = 2 × matmul params × tokens +
    causal attention (P(P+1)/2 query-key pairs, 2 × 32 heads × (128 + 128) FLOPs each, 32 layers) per row, at
    η_compute; a decode step reads the weights once (the input embedding only for its c rows) plus every row's KV
    at its context, at η_memory. Each pass takes the slower of the two."""
    bandwidth, flops = DATASHEET[gpu]
    body = LLAMA3_8B_PARAMS - 2 * VOCAB * HIDDEN  # less the embedding table and the LM head
    attention = 32 * 2 * (32 * 2 * 128) * (p * (p + 1) // 2)
    prefill_flops = c * (2 * body * p + 2 * VOCAB * HIDDEN + attention)
    prefill_bytes = (LLAMA3_8B_PARAMS - (VOCAB - c * p) * HIDDEN) * 2 + c * p * KV_PER_TOKEN
    ttft = max(prefill_flops / (flops * ETA_COMPUTE), prefill_bytes / (bandwidth * ETA_MEMORY))
    steps = []
    for context in range(p + 1, p + g):  # tokens 2 … g, each step after writing its own position
        step_flops = c * 2 * (LLAMA3_8B_PARAMS - VOCAB * HIDDEN)
        step_bytes = (LLAMA3_8B_PARAMS - (VOCAB - c) * HIDDEN) * 2 + c * context * KV_PER_TOKEN
        steps.append(max(step_flops / (flops * ETA_COMPUTE), step_bytes / (bandwidth * ETA_MEMORY)))
    return ttft, sum(steps) / len(steps)


@pytest.mark.parametrize(("hardware", "gpu"), [("H100-SXM", "H100-SXM"), ("any", "H100-SXM"), ("RTX 4090", "RTX-4090")])
def test_metrics_from_predicted_traces_equal_the_prediction(backend, hardware, gpu):
    """The sim row's metrics against the roofline worked by hand from published figures (hand_roofline): on an
    H100 the 4 × 512-token prefill is compute-bound (~41.7 ms) and a decode step memory-bound (~5.07 ms)."""
    result = run_cell(backend, cell(Workload.uniform(4, 512, 16), hardware=hardware))
    assert result.status == "ok", result.reason
    assert result.simulated is True and result.hardware["name"] == gpu
    ttft, tpot = hand_roofline(gpu, 4, 512, 16)
    e2e = ttft + 15 * tpot
    m = result.metrics
    assert m["ttft_s_p50"] == pytest.approx(ttft, rel=1e-6)
    assert m["tpot_s_p50"] == pytest.approx(tpot, rel=1e-6)
    assert m["itl_s_mean"] == pytest.approx(tpot, rel=1e-6)
    assert m["e2e_s_p50"] == pytest.approx(e2e, rel=1e-6)
    assert m["output_tps"] == pytest.approx(4 * 16 / e2e, rel=1e-6)
    assert m["queue_s_max"] == 0.0 and m["requests_ok"] == 4 and m["ttft_s_n"] == 4
    if gpu == "H100-SXM":
        assert 0.0415 < ttft < 0.0420 and 0.00505 < tpot < 0.00510  # the figures quoted in the docstring
    mem = result.memory
    assert mem["weights_bytes"] == LLAMA3_8B_PARAMS * 2
    assert mem["kv_predicted_bytes"] == 4 * (512 + 16 - 1) * KV_PER_TOKEN  # P + G − 1 cached positions each
    assert (
        mem["peak_allocated_bytes"] == mem["weights_bytes"] + mem["kv_predicted_bytes"] + mem["activation_peak_bytes"]
    )
    assert mem["fits"] is True and mem["predicted_total_bytes"] > mem["peak_allocated_bytes"]
    assert mem["kv_measured_bytes"] is None
    row = result.to_row()
    assert row["simulated"] is True and row["hardware"] == gpu and row["tpot_s_p50"] == m["tpot_s_p50"]


def test_repeats_are_identical_and_warmup_is_discarded(backend):
    result = run_cell(backend, Cell(model=MODEL, backend="sim", workload=Workload.uniform(2, 64, 4), repeats=3))
    assert result.status == "ok" and len(result.traces) == 6
    assert {t.repeat for t in result.traces} == {0, 1, 2}
    assert result.metrics["ttft_s_std"] == 0.0


def test_oversize_cell_is_oom_with_sizes(backend):
    result = run_cell(backend, cell(Workload.uniform(64, 8192, 16), hardware="L4"))
    assert result.status == "oom"
    assert "predicted out of memory on L4" in result.reason and "64 requests" in result.reason
    assert result.memory["oom_attempted_bytes"] > 24 * 2**30
    assert result.simulated is True and result.hardware["name"] == "L4"
    assert run_cell(backend, cell(Workload.uniform(64, 8192, 16), hardware="H200")).status == "ok"


def test_paged_layout_option_rounds_blocks_and_skips_padding(backend):
    g = resolve_geometry(MODEL)
    mixed = Workload.mixed([100, 100, 100, 3000], gen_toks=8)
    hf = run_cell(backend, cell(mixed))
    paged = run_cell(backend, cell(mixed, layout="paged", block_size=32))
    assert hf.status == paged.status == "ok"
    per_token = kv_bytes_sequence(g, 1, "bf16")
    assert hf.memory["kv_predicted_bytes"] == 4 * 3007 * per_token
    assert paged.memory["kv_predicted_bytes"] == (3 * 4 + 94) * 32 * per_token  # ceil(107/32)=4, ceil(3007/32)=94
    assert paged.metrics["ttft_s_p50"] < hf.metrics["ttft_s_p50"]
    assert paged.extra["sim"]["layout"] == "paged"


def test_arrivals_queue_like_the_hf_backend(backend):
    # Requests 10 ms apart: the first batch (one request) takes longer, so the others wait and batch together.
    result = run_cell(backend, cell(Workload.uniform(3, 2048, 64, arrival_gap_s=0.01)))
    traces = sorted(result.traces, key=lambda t: t.request_id)
    assert traces[0].start_s == 0.0
    assert traces[1].start_s == traces[2].start_s == pytest.approx(traces[0].end_s)
    assert result.metrics["queue_s_max"] > 0 and result.extra["sim"]["batches"] == 2


def test_efficiency_options_override(backend):
    slow = run_cell(backend, cell(Workload.uniform(1, 64, 8), eta_memory=0.45))
    base = predict_cell(resolve_geometry(MODEL), "H100-SXM", 1, 64, 8, eff=Efficiency(0.7, 0.9))
    assert slow.metrics["tpot_s_p50"] == pytest.approx(2 * base.tpot_s, rel=1e-9)
    assert slow.extra["sim"]["efficiency_source"] == "cell options"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hardware": "Z100"}, "unknown GPU"),
        ({"layout": "ring"}, "unknown layout"),
        ({"model": "nobody/x"}, "nobody/x"),
    ],
)
def test_bad_cells_are_errors_not_crashes(backend, kwargs, needle):
    result = run_cell(backend, cell(Workload.uniform(1, 8, 2), **kwargs))
    assert result.status == "error" and needle in result.reason
