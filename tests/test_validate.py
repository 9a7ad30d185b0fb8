"""`kvray validate`: a folder's measured cells replayed on the simulator, errors per cell and metric.

The folder is crafted: cells of a paged engine 'measured' on an H100 are the simulator's own predictions at a known
efficiency (η_memory 0.45, a CPU cost per running request), relabelled as measured. Validated against a
calibration holding that truth, every error is 0; against the defaults (η_memory 0.9, no CPU cost) a decode step of
kvray/tiny-llama on an H100 — bound by reading its 13.6 MB of weights — takes half as long, so TPOT is predicted
50 % low.
"""

import json

import pytest
from sim_measured import simulated_as_measured

from kvray.analysis.validate import validate
from kvray.cli.app import main
from kvray.data.writer import DatasetWriter
from kvray.plan.loads import build_workload
from kvray.spec import LoadSpec, Workload

TRUTH = {"eta_compute": 0.6, "eta_memory": 0.45}
ENGINE = {
    "block_size": 16,
    "max_batch_tokens": 8192,
    "max_num_batched_tokens": 8192,
    "max_num_seqs": 256,
    "kv_cache_memory_bytes": 64 * 2**20,
    "layout": "paged",
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("measured")
    writer = DatasetWriter(out, tables=False)
    workloads = [
        Workload.uniform(8, 64, 16),
        build_workload(LoadSpec(kind="poisson", rate_rps=2000, requests=60), 64, 16),
    ]
    for wl in workloads:
        result = simulated_as_measured("kvray/tiny-llama", wl, **ENGINE, **TRUTH)
        writer.append(result)
    writer.flush()
    return out


def calibration(path, **eff):
    entry = {"eta_compute": 0.7, "eta_memory": 0.9, "layer_overhead_s": 0.0, "rows": 2, **eff}
    path.write_text(json.dumps({"version": 1, "entries": {"H100-SXM": {"paged": entry}}}))
    return path


def test_the_truth_validates_to_zero_error_and_the_defaults_to_the_eta_ratio(measured, tmp_path):
    exact = validate(measured, calibration(tmp_path / "truth.json", **TRUTH))
    assert exact.cells == 2 and exact.skipped == {}
    assert {r["metric"] for r in exact.rows} >= {"ttft_s_p50", "tpot_s_p50", "e2e_s_p50", "achieved_rps"}
    assert all(abs(r["rel_error"]) < 1e-9 for r in exact.rows)

    defaults = validate(measured, calibration(tmp_path / "defaults.json"))
    (burst_tpot,) = [r for r in defaults.rows if r["metric"] == "tpot_s_p50" and "c8" in defaults.labels[r["cell"]]]
    assert burst_tpot["rel_error"] == pytest.approx(0.45 / 0.9 - 1, abs=0.02)


def test_cli_json_keys_and_summary_line(measured, tmp_path, capsys):
    cal = calibration(tmp_path / "truth.json", **TRUTH)
    with pytest.raises(SystemExit) as done:
        main(["validate", str(measured), "--calibration", str(cal), "--json"])
    assert done.value.code == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["rows"][0]) == {"cell", "metric", "measured", "predicted", "rel_error"}
    assert record["median_abs_rel_error"]["tpot_s_p50"] == pytest.approx(0.0, abs=1e-9)
    assert set(record["repeat_spread"]) == {r["cell"] for r in record["rows"]}  # one repeat each: {} per cell
    with pytest.raises(SystemExit):
        main(["validate", str(measured), "--calibration", str(cal)])
    assert "2 cells; median |error| ttft_s_p50 0.0% (worst 0.0%)" in capsys.readouterr().out


@pytest.mark.integration  # draws a figure (matplotlib: ~3 s)
def test_output_folder_gets_the_json_and_the_figure_also_under_the_old_out_spelling(measured, tmp_path):
    cal = calibration(tmp_path / "truth.json", **TRUTH)
    for flag in ("--output", "--out"):
        with pytest.raises(SystemExit) as done:
            main(["validate", str(measured), "--calibration", str(cal), flag, str(tmp_path / flag)])
        assert done.value.code == 0
        assert (tmp_path / flag / "validation.png").is_file() and (tmp_path / flag / "validation.svg").is_file()
        record = json.loads((tmp_path / flag / "validation.json").read_text())
        assert record["cells"] == 2


def test_a_folder_without_cells_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["validate", str(tmp_path)])
    assert done.value.code == 2 and "is not a results folder" in capsys.readouterr().err


def test_repeat_spread_is_the_range_over_repeats_of_each_percentile():
    """Two repeats of two requests: TTFT 0.1 and 0.3 s in repeat 0 (p50 0.2), 0.3 and 0.5 s in repeat 1 (p50 0.4):
    spread (0.4 − 0.2) / median(0.2, 0.4) = 0.2 / 0.3; one repeat alone has no spread."""
    from kvray.analysis.validate import repeat_spread
    from kvray.measure.trace import RunTrace

    def trace(repeat: int, ttft: float) -> RunTrace:
        return RunTrace(
            request_id=0,
            repeat=repeat,
            arrival_s=0.0,
            start_s=0.0,
            token_times_s=[ttft, ttft + 0.01],
            end_s=ttft + 0.01,
            prompt_toks=8,
            output_toks=2,
        )

    traces = [trace(0, 0.1), trace(0, 0.3), trace(1, 0.3), trace(1, 0.5)]
    assert repeat_spread(traces)["ttft_s_p50"] == pytest.approx(0.2 / 0.3)
    assert repeat_spread(traces)["tpot_s_p50"] == pytest.approx(0.0, abs=1e-9)
    assert repeat_spread(traces[:2]) == {}


def test_a_rate_the_client_could_not_offer_is_kept_but_left_out_of_the_summary():
    """A rate measured while the client fell behind its schedule is the client's; a knee bracketed by such a probe
    is a lower bound. Both stay in the rows (marked), neither moves the median: two judged achieved rates at
    +10 % and −30 % give 20 %, whatever the excluded +500 % says."""
    from kvray.analysis.validate import Validation, not_the_engines

    assert "client fell behind" in not_the_engines("achieved_rps", {"client_behind": True})
    assert not_the_engines("achieved_rps", {"client_behind": False}) is None
    assert not_the_engines("tpot_s_p50", {"client_behind": True}) is None  # latencies stay judged
    assert "lower bound" in not_the_engines("knee_rps", {"knee_client_bound": True})
    rows = [
        {"cell": "a", "metric": "achieved_rps", "measured": 10.0, "predicted": 11.0, "rel_error": 0.1},
        {"cell": "b", "metric": "achieved_rps", "measured": 10.0, "predicted": 7.0, "rel_error": -0.3},
        {"cell": "c", "metric": "achieved_rps", "measured": 2.0, "predicted": 12.0, "rel_error": 5.0, "excluded": "x"},
    ]
    v = Validation(rows, 3)
    assert v.median_abs_rel_error()["achieved_rps"] == pytest.approx(0.2)
    assert v.worst_abs_rel_error()["achieved_rps"] == pytest.approx(0.3)


def test_rounds_of_one_job_are_judged_on_their_median_with_the_range_beside_it(measured, tmp_path):
    """Two rounds of the same cells, the second on a machine whose memory roof fell from η 0.45 to 0.30: a decode
    step bound by reading the weights takes 0.45 / 0.30 = 1.5 × as long. Against the truth of the first round, the
    median over the rounds is 1.25 × its TPOT, so the error is 1 / 1.25 − 1 = −20 %, and the spread (1.5 − 1) /
    1.25 = 40 %; each round's own value stays in the row."""

    slower = tmp_path / "round2"
    writer = DatasetWriter(slower, tables=False)
    wl = Workload.uniform(8, 64, 16)
    first = simulated_as_measured("kvray/tiny-llama", wl, **ENGINE, **TRUTH)
    second = simulated_as_measured("kvray/tiny-llama", wl, **ENGINE, **{**TRUTH, "eta_memory": 0.30})
    second.cell = first.cell  # the same cell, measured again later
    writer.append(second)
    writer.flush()
    truth = calibration(tmp_path / "truth.json", **TRUTH)
    both = validate([measured, slower], truth)
    assert both.rounds == 2 and both.cells == 2  # the Poisson cell has one round: judged on it alone
    (tpot,) = [r for r in both.rows if r["metric"] == "tpot_s_p50" and r["cell"] == first.cell.cell_id]
    assert tpot["rel_error"] == pytest.approx(-0.2, abs=0.02)
    assert len(tpot["measured_rounds"]) == 2 and tpot["measured"] == pytest.approx(sum(tpot["measured_rounds"]) / 2)
    assert both.spread[first.cell.cell_id]["tpot_s_p50"] == pytest.approx(0.4, abs=0.03)
    assert validate(measured, truth).rounds == 1
    with pytest.raises(SystemExit) as done:
        main(["validate", str(measured), str(slower), "--calibration", str(truth)])
    assert done.value.code == 0
