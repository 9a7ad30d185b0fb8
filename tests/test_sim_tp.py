"""Tensor parallelism in the simulator: a 70B model on H100 and A100 for TP 1–8, against hand arithmetic.

The expected figures are worked out below from Llama-3.1-70B's config (hidden 8,192, 80 layers, 64 heads,
8 KV heads × 128, MLP 28,672, vocabulary 128,256, untied) and the datasheets (H100 SXM 3,350 GB/s HBM and
900 GB/s NVLink; A100 SXM 2,039 GB/s and 600 GB/s NVLink; both directions summed, so half each way).
"""

import json

import pytest

from kvray.backends import get_backend
from kvray.cli import main
from kvray.hardware.gpus import get_gpu
from kvray.model.resolve import resolve_geometry
from kvray.runner.run import run_cell
from kvray.sim.simulate import Efficiency, allreduce_s, predict_cell
from kvray.spec import Cell, Workload, make_options

MODEL = "meta-llama/Llama-3.1-70B"
EFF = Efficiency(0.7, 0.9)  # the defaults, explicit: no calibration file may move the figures
P, G = 1024, 128


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRAY_CALIBRATION", str(tmp_path / "absent.json"))


@pytest.fixture(scope="module")
def g():
    return resolve_geometry(MODEL)


def _decode_bytes_per_gpu(tp: int) -> float:
    """One decode step of one sequence, per GPU, averaged over the 127 steps (contexts 1,025 … 1,151, mean 1,088).

    Weights: the rank's share (params 70,553,706,496; norms 80 × 2 × 8,192 + 8,192 = 1,318,912 on every rank),
    less the embedding rows the one token does not look up (the rank's 128,256 / tp rows, one read). KV: 8 / tp
    KV heads × 128 × 2 (K, V) × 2 B × 80 layers per position.
    """
    norms = 1_318_912
    rank_params = (70_553_706_496 - norms) / tp + norms
    unread_rows = (128_256 // tp - 1) * 8_192
    kv_per_token = 80 * 2 * (8 // tp) * 128 * 2
    return 2 * (rank_params - unread_rows) + kv_per_token * 1_088


def test_all_reduce_term_by_hand(g):
    # Decode, one token: 160 all-reduces of 8,192 × 2 B = 16,384 B; a ring moves 2·7/8 = 1.75 of it per GPU.
    h100, a100 = get_gpu("H100-SXM"), get_gpu("A100-80GB-SXM")
    assert allreduce_s(g, h100, 1, "bf16", 8) == pytest.approx(160 * (8e-6 + 1.75 * 16_384 / 450e9), rel=1e-12)
    assert allreduce_s(g, h100, 1, "bf16", 8) == pytest.approx(1.290194e-3, rel=1e-6)
    assert allreduce_s(g, a100, 1, "bf16", 2) == pytest.approx(160 * (8e-6 + 1.0 * 16_384 / 300e9), rel=1e-12)
    # Prefill of 1,024 tokens at TP 8: 16 MiB per all-reduce, 29,360,128 B crossing each GPU's link.
    assert allreduce_s(g, h100, 1024, "bf16", 8) == pytest.approx(160 * (8e-6 + 29_360_128 / 450e9), rel=1e-12)
    assert allreduce_s(g, h100, 1024, "bf16", 1) == 0.0


@pytest.mark.parametrize(
    ("gpu", "hbm_gbps", "link_gbps_each_way"), [("H100-SXM", 3_350, 450), ("A100-80GB-SXM", 2_039, 300)]
)
def test_70b_fits_from_tp2_and_tpot_falls_sublinearly(g, gpu, hbm_gbps, link_gbps_each_way):
    preds = {tp: predict_cell(g, gpu, 1, P, G, layout="paged", eff=EFF, tp=tp) for tp in (1, 2, 4, 8)}
    # 141.1 GB of bf16 weights do not fit one 80 GB GPU; half of them (70.6 GB, 65.7 GiB) do.
    assert not preds[1].fits and preds[1].weights_bytes == 141_107_412_992
    assert all(preds[tp].fits for tp in (2, 4, 8))
    assert preds[8].weights_bytes == 17_640_734_720
    for tp in (1, 2, 4, 8):
        comm = 0.0 if tp == 1 else 160 * (8e-6 + 2 * (tp - 1) / tp * 16_384 / (link_gbps_each_way * 1e9))
        expected = _decode_bytes_per_gpu(tp) / (hbm_gbps * 1e9 * 0.9) + comm  # memory-bound decode
        assert preds[tp].tpot_s == pytest.approx(expected, rel=2e-3), tp
        assert preds[tp].decode_bound == "memory"
        assert preds[tp].output_tps_per_gpu == pytest.approx(G / preds[tp].e2e_s / tp)
    # Sub-linear: every doubling of GPUs buys less than 2× TPOT, and TP 8 short of 8× (by hand: H100 46.2 / 7.07
    # = 6.5×, A100 75.9 / 10.8 = 7.0×: the 1.3 ms of all-reduces weigh more against H100's faster HBM).
    assert preds[1].tpot_s / preds[8].tpot_s < 7.5
    for a, b in ((1, 2), (2, 4), (4, 8)):
        assert 1.5 < preds[a].tpot_s / preds[b].tpot_s < 2.0
    # Throughput per GPU therefore falls as TP grows: TP stops paying per GPU as soon as the model fits.
    per_gpu = [preds[tp].output_tps_per_gpu for tp in (2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True)


def test_hand_figures_h100_tp8(g):
    p = predict_cell(g, "H100-SXM", 1, P, G, layout="paged", eff=EFF, tp=8)
    # 17,422,647,296 B / (3,350 GB/s × 0.9) = 5.7787 ms of HBM, + 1.2902 ms of all-reduces.
    assert p.tpot_s == pytest.approx(7.069e-3, rel=1e-3)
    assert p.interconnect == "NVLink 4" and p.tensor_parallel == 8


def test_pcie_prefill_is_communication_bound(g):
    # L40S over PCIe Gen4 (32 GB/s each way): a 1,024-token prefill at TP 8 moves 160 × 29.4 MB per GPU,
    # 147 ms of link time, against 20 ms of compute at 362 TFLOP/s × 0.7.
    p = predict_cell(g, "L40S", 1, P, G, layout="paged", eff=EFF, tp=8)
    assert p.prefill_bound == "communication"
    assert p.ttft_s > 160 * 29_360_128 / 32e9


def test_predict_json_per_tp(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", MODEL, "--gpu", "H100-SXM", "--tp", "1", "2", "4", "8", "--gen-toks", "32", "--json"])
    assert exit_info.value.code == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    by_tp = {p["tensor_parallel"]: p for p in preds}
    assert sorted(by_tp) == [1, 2, 4, 8]
    assert [by_tp[t]["fits"] for t in (1, 2, 4, 8)] == [False, True, True, True]
    assert all(by_tp[t]["ttft_s"] > 0 and by_tp[t]["tpot_s"] > 0 for t in by_tp)
    assert by_tp[8]["tpot_s"] < by_tp[4]["tpot_s"] < by_tp[2]["tpot_s"]


def test_sim_backend_honours_the_cells_tp():
    backend = get_backend("sim")
    try:
        workload = Workload.uniform(1, P, 16)
        one = run_cell(backend, Cell(model=MODEL, backend="sim", workload=workload, hardware="H100-SXM"))
        assert one.status == "oom"
        tp4 = Cell(model=MODEL, backend="sim", workload=workload, hardware="H100-SXM", tensor_parallel=4)
        result = run_cell(backend, tp4)
        assert result.status == "ok"
        expected = predict_cell(resolve_geometry(MODEL), "H100-SXM", 1, P, 16, tp=4)
        assert result.metrics["tpot_s_mean"] == pytest.approx(expected.tpot_s, rel=1e-9)
        assert result.memory["weights_bytes"] == 35_278_831_616  # one GPU's share
        row = result.to_row()
        assert row["tensor_parallel"] == 4 and "tensor parallel 4" in row["parallelism"]
        # The continuous engine: each GPU's pool holds the same blocks of its own KV heads.
        paged = Cell(
            model=MODEL,
            backend="sim",
            workload=workload,
            hardware="H100-SXM",
            tensor_parallel=8,
            options=make_options(layout="paged"),
        )
        served = run_cell(backend, paged)
        assert served.status == "ok"
        assert served.memory["kv_reserved_bytes"] % (16 * 40_960) == 0  # blocks of 16 tokens × 40,960 B per GPU
    finally:
        backend.close()


def test_tp_1_keeps_old_cell_ids():
    cell = Cell(model=MODEL, backend="sim", workload=Workload.uniform(1, 8, 4))
    assert "tensor_parallel" not in cell.to_dict()
    assert Cell.from_dict(cell.to_dict()) == cell
    tp2 = Cell(model=MODEL, backend="sim", workload=Workload.uniform(1, 8, 4), tensor_parallel=2)
    assert tp2.cell_id != cell.cell_id and Cell.from_dict(tp2.to_dict()) == tp2
