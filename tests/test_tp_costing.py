"""Tensor-parallel rows costed per GPU of their group, decode attention as its own term, MLA's absorbed decode.

Expected values are injected truths (simulator rows made at known η, calibrated back) or hand arithmetic from
published figures: the GPU table's H100 SXM (NVIDIA datasheet: 3,350 GB/s HBM3, 989 TFLOP/s dense bf16) and the
models' configs — Llama-3.1-70B (hidden 8,192, 80 layers, 64 heads, 8 KV heads × 128, MLP 28,672, vocabulary
128,256, untied; 70,553,706,496 parameters), Meta-Llama-3-8B (hidden 4,096, 32 layers, 32 heads, 8 KV heads × 128,
MLP 14,336, vocabulary 128,256, untied; 8,030,261,248 parameters) and DeepSeek-V2-Lite (27 layers, 16 heads,
kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128).
"""

import pandas as pd
import pytest

from kvray.analysis.calibrate import calibrate
from kvray.analysis.findings import sanity_warnings
from kvray.analysis.views import ENERGY_TDP_ESTIMATE, prepare, tokens_per_joule
from kvray.backends.sim import SimBackend
from kvray.data.writer import DatasetWriter
from kvray.hardware.gpus import get_gpu
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.sim.passes import attention_flops, sequence_step_cost, step_cost
from kvray.sim.simulate import Efficiency, pass_time_s, roofs_s
from kvray.spec import Cell, Workload, make_options

H100_BW, H100_BF16 = 3.35e12, 989e12
EFF = Efficiency(0.7, 0.9)


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


# ---------------------------------------------------------------- calibration of TP rows


def sim_rows_at_tp(out, tp: int, eta_compute: float, eta_memory: float):
    """Simulator rows at TP ``tp`` on H100 made with known η: the injected truth calibration must recover."""
    writer = DatasetWriter(out, tables=False)
    backend = SimBackend()
    for model in ("meta-llama/Llama-3.1-70B", "meta-llama/Meta-Llama-3-8B"):
        for concurrency in (1, 16):
            for prompt in (256, 4096):
                cell = Cell(
                    model=model,
                    backend="sim",
                    workload=Workload.uniform(concurrency, prompt, 8),
                    hardware="H100-SXM",
                    warmup=0,
                    tensor_parallel=tp,
                    options=make_options(eta_compute=eta_compute, eta_memory=eta_memory),
                )
                writer.append(run_cell(backend, cell))  # an OOM cell (70B, TP 2, 16 × 4096) is skipped by calibrate
    return out


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("eta", [(0.7, 0.9), (0.5, 0.75)])
def test_tp_rows_calibrate_back_to_the_eta_they_were_made_with(tmp_path, tp, eta):
    """Issue 25 item 4: TP 4 rows at η 0.7/0.9 used to calibrate to 1.96/2.56 (costed as the whole model)."""
    data = sim_rows_at_tp(tmp_path / "res", tp, *eta)
    (fit,), _ = calibrate(data, out=tmp_path / "cal.json", include_simulated=True)
    assert fit.identified["compute"] and fit.identified["memory"]  # both roofs seen, not defaults kept
    assert fit.eta_compute == pytest.approx(eta[0], rel=2e-3)
    assert fit.eta_memory == pytest.approx(eta[1], rel=2e-3)
    assert fit.median_abs_rel_error_after["tpot"] < 1e-3 and fit.median_abs_rel_error_after["ttft"] < 1e-3


# ---------------------------------------------------------------- roofline floor per GPU of the group


def rows(*cells: dict) -> pd.DataFrame:
    base = {
        "experiment": "exp1",
        "model": "meta-llama/Llama-3.1-70B",
        "dtype": "bf16",
        "kv_dtype": "bf16",
        "weights": "pretrained",
        "workload": "uniform",
        "status": "ok",
        "reason": "",
        "simulated": False,
        "prompt_toks": 512,
        "gen_toks": 64,
        "hardware": "NVIDIA H100 80GB HBM3",
        "backend": "vllm",
        "requests": 1,
        "requests_ok": 1,
        "requests_failed": 0,
        "concurrency": 1,
    }
    out = []
    for i, c in enumerate(cells):
        row = {**base, **c}
        row.setdefault("cell_id", f"cell{i}")
        row["prompt_toks_list"] = str(row["prompt_toks"])
        out.append(row)
    return pd.DataFrame(out)


def floor_warnings(view) -> dict[str, dict]:
    return {
        w.values["suspect_cell_id"]: w for w in sanity_warnings(view) if w.values["check"] == "below_roofline_floor"
    }


def test_a_tp8_row_is_floored_per_gpu_of_its_group():
    """70B bf16 at TP 8: each GPU reads 1/8 of the weights per decode step — all but the input embedding's
    128,256 × 8,192 rows (looked up, one row read): (70,553,706,496 − 1,050,673,152) / 8 × 2 B = 17,375,758,336 B
    at 3.35 TB/s = 5.187 ms. On top, at most: the norms every rank holds whole (161 × 8,192 × 7/8 × 2 B) and one KV
    head's cache (80 layers × 2 × 128 × 2 B = 40,960 B per position, ≤ 576 positions). The old TP 1 floor read all
    weights: 139,006,066,688 B / 3.35 TB/s = 41.49 ms, which flagged the simulator's own 7.1 ms as impossible."""
    floor_low = (70_553_706_496 - 1_050_673_152) / 8 * 2 / H100_BW
    slack = (161 * 8_192 * 7 / 8 * 2 + 576 * 40_960) / H100_BW
    assert floor_low == pytest.approx(5.187e-3, rel=1e-3)
    view = prepare(
        rows(
            {"cell_id": "sim-equal", "tensor_parallel": 8, "tpot_s_p50": 7.1e-3},
            {"cell_id": "too-fast", "tensor_parallel": 8, "tpot_s_p50": 4.0e-3},
            {"cell_id": "hf-spread", "tensor_parallel": 8, "tpot_s_p50": 7.1e-3, "backend": "hf"},
        )
    )
    found = floor_warnings(view)
    assert "sim-equal" not in found  # the simulator's own TP 8 prediction is possible
    fast = found["too-fast"]
    assert floor_low <= fast.values["floor_s"] <= floor_low + slack
    assert fast.values["tensor_parallel"] == 8 and "per GPU of TP 8" in fast.text
    # hf spreads whole layers over the 8 GPUs (one computes at a time): every weight is read per step, as on one GPU
    whole = (70_553_706_496 - 1_050_673_152) * 2 / H100_BW
    assert whole == pytest.approx(41.49e-3, rel=1e-3)
    spread = found["hf-spread"]
    assert (
        whole <= spread.values["floor_s"] <= whole + 576 * 327_680 / H100_BW and spread.values["tensor_parallel"] == 1
    )


# ---------------------------------------------------------------- decode attention in a mixed step


LLAMA3_8B_BODY = 8_030_261_248 - 2 * 128_256 * 4_096  # matmul parameters: less the input embedding and the LM head
LLAMA3_8B_KV = 32 * 2 * 8 * 128 * 2  # bytes per cached position: 131,072


def test_a_mixed_step_pays_its_decodes_kv_read_on_top_of_a_compute_bound_prefill():
    """One 2,048-token prefill chunk and 64 decodes at context 4,096, Llama-3-8B on H100, η 0.7 / 0.9.

    Decode attention: 64 × 4,096 positions × 131,072 B = 34,359,738,368 B read → at 3.35 TB/s × 0.9 = 11.40 ms
    (its FLOPs, 64 × 32 layers × 2 × (32 × 256) × 4,096 = 1.37e11, are 0.2 ms of compute: memory-bound).
    The rest, compute-bound: 2 × body × 2,112 tokens + 2 × LM head × 65 sequences + the prefill's causal
    attention 32 × 2 × 8,192 × 2,048·2,049/2 at 989 TFLOP/s × 0.7 = 44.27 ms. Step: 44.27 + 11.40 = 55.67 ms,
    where the roofline of the whole step (compute 44.47 ms) hid the KV read entirely."""
    g, gpu = resolve_geometry("meta-llama/Meta-Llama-3-8B"), get_gpu("H100-SXM")
    chunks = [(0, 2048)] + [(4095, 1)] * 64
    kv_read = 64 * 4096 * LLAMA3_8B_KV
    attention_s = kv_read / (H100_BW * 0.9)
    rest_flops = 2 * LLAMA3_8B_BODY * 2112 + 2 * 128_256 * 4_096 * 65 + 32 * 2 * 8_192 * (2048 * 2049 // 2)
    rest_s = rest_flops / (H100_BF16 * 0.7)
    assert attention_s == pytest.approx(11.396e-3, rel=1e-3) and rest_s == pytest.approx(44.27e-3, rel=1e-3)
    cost = step_cost(g, chunks, "bf16", "bf16")
    assert cost.decode_attention_bytes == kv_read
    assert pass_time_s(cost, g, gpu, "bf16", EFF) == pytest.approx(rest_s + attention_s, rel=1e-9)
    assert pass_time_s(cost, g, gpu, "bf16", EFF) > max(roofs_s(cost, g, gpu, "bf16", EFF))  # the floor, exceeded


def test_a_memory_bound_decode_step_is_weights_plus_kv_over_bandwidth_as_before():
    """64 decodes at context 4,096 alone: (weights read + KV) / (3.35 TB/s × 0.9) — the weights all but the
    128,256 − 64 embedding rows no token looks up: (8,030,261,248 − 128,192 × 4,096) × 2 B + 34,359,738,368 B."""
    g, gpu = resolve_geometry("meta-llama/Meta-Llama-3-8B"), get_gpu("H100-SXM")
    cost = step_cost(g, [(4095, 1)] * 64, "bf16", "bf16")
    expected = ((8_030_261_248 - 128_192 * 4_096) * 2 + 64 * 4096 * LLAMA3_8B_KV) / (H100_BW * 0.9)
    assert expected == pytest.approx(16.375e-3, rel=1e-3)
    assert pass_time_s(cost, g, gpu, "bf16", EFF) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- MLA decodes in the latent space


def test_mla_decode_reads_the_latent_and_scores_it_absorbed():
    """DeepSeek-V2-Lite, one decode token at context 4,096: the latent cache read is 27 layers × (512 + 64) × 2 B =
    31,104 B per position, 127,401,984 B in all; the absorbed score and sum cost 2 × 16 heads × (2 × 512 + 64)
    FLOPs per layer and position = 3,850,371,072 FLOPs (expanded heads would be 2 × 16 × 320: 1,132,462,080). At
    TP 2 each GPU scores 8 heads (half the FLOPs) over the same latent, which every rank holds whole."""
    from kvray.model.parallel import shard_geometry

    g = resolve_geometry("deepseek-ai/DeepSeek-V2-Lite")
    one = sequence_step_cost(g, 4095, 1, "bf16")
    assert one.decode_attention_bytes == 4096 * 27 * 576 * 2 == 127_401_984
    assert one.decode_attention_flops == 27 * 2 * 16 * (2 * 512 + 64) * 4096 == 3_850_371_072
    half = sequence_step_cost(shard_geometry(g, 2), 4095, 1, "bf16")
    assert half.decode_attention_flops == 3_850_371_072 / 2 and half.decode_attention_bytes == 127_401_984
    assert sequence_step_cost(g, 0, 8, "bf16").decode_attention_flops == 0.0  # a prefill is no decode
    assert attention_flops(g, 0, 8) == 36 * 2 * 16 * 320 * 27  # and runs expanded: 8·9/2 pairs × 2 × 16 × 320


# ---------------------------------------------------------------- measured energy and the TDP estimate apart


def test_measured_energy_and_the_tdp_estimate_never_share_an_axis():
    frame = pd.DataFrame({"tok_per_s_per_w": [2.0, float("nan")], "j_per_output_tok_tdp_estimate": [0.25, 0.1]})
    per_j, kind = tokens_per_joule(frame)
    assert kind == "measured" and per_j.iloc[0] == 2.0 and pd.isna(per_j.iloc[1])  # no estimate filled in
    estimate, kind = tokens_per_joule(frame.drop(columns="tok_per_s_per_w"))
    assert kind == ENERGY_TDP_ESTIMATE and list(estimate) == [4.0, 10.0]
    old = pd.DataFrame({"predicted_j_per_output_tok": [0.5]})  # a dataset written before the rename
    assert tokens_per_joule(old)[1] == ENERGY_TDP_ESTIMATE and tokens_per_joule(old)[0].iloc[0] == 2.0
    assert tokens_per_joule(pd.DataFrame({"x": [1]}))[1] is None
