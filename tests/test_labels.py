"""Issue 25, items 5 and 7: labels that say what they measured, and the edges a bad-input sweep found.

Expected values are worked by hand in each test (token ids of kvray's word-level vocabulary, a stream's stamps,
the sample a percentile needs), never read back from the code under test."""

from __future__ import annotations

import time

import pytest

from kvray.errors import KvrayInputError

# --- item 7: a bundled kvray/… id is never looked up on the hub ----------------------------------------------


def test_bundled_id_gets_the_offline_word_tokenizer(monkeypatch):
    """kvray/tiny-llama: 4,096 words "w4" … (ids 0–3 <pad> <s> </s> <unk>), BOS 1 in front — with the hub
    unreachable (the discard port), so a lookup there would fail or retry instead of answering at once."""
    from kvray.backends.http import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    tok = load_tokenizer("kvray/tiny-llama")
    assert time.monotonic() - t0 < 20  # the hub's retries took a minute
    assert len(tok) == 4096
    assert tok("w5 w6 w4095")["input_ids"] == [1, 5, 6, 4095]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)  # the bundled config's ids
    assert tok.decode([5, 6, 4095]) == "w5 w6 w4095"


def test_unknown_kvray_id_is_one_line_not_a_hub_lookup():
    from kvray.backends.http import load_tokenizer

    with pytest.raises(KvrayInputError, match="not a model kvray bundles.*kvray/tiny-llama"):
        load_tokenizer("kvray/no-such-model")


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ((None, 1, 2), (0, 1, 2)),  # Llama's: no pad → 0
        ((0, 1, 2), (0, 1, 2)),
        ((3, 0, 1), (3, 0, 1)),  # three distinct special words: kept
        ((None, 128000, [128001, 128009]), (0, 1, 2)),  # beyond the 4 special words: 0, 1, 2
        ((1, 1, 2), (0, 1, 2)),  # pad = bos: not distinct
    ],
)
def test_special_ids_match_the_served_directory(ids, expected):
    from kvray.servers.model_dirs import special_ids

    assert special_ids(*ids) == expected


@pytest.mark.integration
def test_bench_openai_with_a_bundled_id_against_a_live_server(tmp_path, monkeypatch, capsys):
    """The issue's command against a live OpenAI-compatible stub (it serves "stub", not a directory, so the
    tokenizer comes from -m kvray/tiny-llama): measured at once, the hub never asked."""
    from servers_fixtures import PacedOpenAIServer

    from kvray.cli.app import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with PacedOpenAIServer(first_token_s=0.02, token_s=0.005) as stub:
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "bench",
                    "--backend",
                    "openai",
                    "-m",
                    "kvray/tiny-llama",
                    "--base-url",
                    stub.url,
                    "--prompt-toks",
                    "8",
                    "--gen-toks",
                    "6",
                    "--repeats",
                    "1",
                    "--warmup",
                    "0",
                    "--output",
                    str(tmp_path / "out"),
                ]
            )
        elapsed = time.monotonic() - t0
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err
    assert "status: ok" in out.out and elapsed < 45, (elapsed, out.out)


# --- item 5: a bunched stream is flagged, not read as a TPOT ---------------------------------------------------


def _trace(request_id: int, first: float, gap: float, n: int, repeat: int = 0, status: str = "ok"):
    from kvray.measure.trace import RunTrace

    times = [first + i * gap for i in range(n)]
    return RunTrace(request_id, repeat, 0.0, 0.0, times, times[-1], 8, n, status=status)


@pytest.mark.parametrize(
    ("gap_s", "n", "bunched"),
    [
        (0.1e-3 / 7, 8, True),  # docs/benchmarks.md: 8 tokens within 0.1 ms of each other
        (0.24e-3, 4, True),  # 3 gaps, 0.72 ms in all: < 0.25 ms a token
        (0.26e-3, 4, False),  # 0.78 ms: just above the floor
        (0.0, 3, False),  # three tokens are not judged (a first chunk may carry two)
        (0.0, 4, True),  # one chunk of 4 tokens: no TPOT can be read from it
        (0.018, 8, False),  # vLLM's CPU cadence here, 18 ms
    ],
)
def test_tokens_bunched_rule(gap_s, n, bunched):
    from kvray.measure.metrics import tokens_bunched

    assert tokens_bunched(_trace(0, 0.2, gap_s, n)) is bunched


def test_bunched_streams_leave_the_tpot_columns_and_are_counted():
    """4 requests streamed at 20 ms a token (8 tokens: TPOT 20 ms, 7 gaps each) and 2 stalled ones (8 tokens in
    0.07 ms): TPOT p50 = 20 ms over n = 4, ITL over 28 gaps, tpot_bunched_n = 2; TTFT and E2E keep all 6."""
    from kvray.measure.metrics import summarize

    good = [_trace(i, 0.05, 0.020, 8) for i in range(4)]
    stalled = [_trace(4 + i, 0.30, 0.00001, 8) for i in range(2)]
    m = summarize(good + stalled)
    assert m["tpot_bunched_n"] == 2
    assert m["tpot_s_n"] == 4 and m["tpot_s_p50"] == pytest.approx(0.020)
    assert m["tpot_s_min"] == pytest.approx(0.020)  # the 0.01 ms "TPOT" is gone
    assert m["itl_s_n"] == 4 * 7 and m["itl_s_min"] == pytest.approx(0.020)
    assert m["ttft_s_n"] == 6 and m["e2e_s_n"] == 6
    # the simulator's traces are computed, not read: a tiny model's microsecond TPOT stays a TPOT
    sim = summarize(good + stalled, simulated=True)
    assert sim["tpot_bunched_n"] == 0 and sim["tpot_s_n"] == 6


def test_trace_rows_mark_the_bunched_request():
    from kvray.data.reader import trace_rows
    from kvray.measure.trace import CellResult
    from kvray.spec import Cell, Workload

    result = CellResult(Cell("kvray/tiny-llama", Workload.uniform(2, 8, 8), backend="synthetic"), "ok")
    result.traces = [_trace(0, 0.05, 0.020, 8), _trace(1, 0.30, 0.00001, 8)]
    rows = {r["request_id"]: r for r in trace_rows(result)}
    assert rows[0]["tokens_bunched"] is False and rows[0]["tpot_s"] == pytest.approx(0.020)
    assert rows[1]["tokens_bunched"] is True and rows[1]["tpot_s"] != rows[1]["tpot_s"]  # NaN


# --- item 5: kvray bench prints n, "max of n" below a percentile's sample, no spread for one repeat -----------


@pytest.mark.parametrize(
    ("n", "stat", "shown"),
    [
        (4, "p90", "max of 4"),  # p90 needs ⌈100 / 10⌉ = 10 values
        (9, "p90", "max of 9"),
        (10, "p90", "90.00"),
        (99, "p99", "max of 99"),  # p99 needs 100
        (100, "p99", "99.00"),
        (4, "p50", "50.00"),  # p50 needs 2
        (4, "max", "100.00"),
    ],
)
def test_bench_stat_holds_back_a_percentile_the_sample_cannot_hold(n, stat, shown):
    from kvray.cli.render import bench_stat

    m = {"tpot_s_n": n, "tpot_s_p50": 0.050, "tpot_s_p90": 0.090, "tpot_s_p99": 0.099, "tpot_s_max": 0.100}
    assert bench_stat(m, "tpot_s", stat) == shown


def test_bench_prints_n_and_no_spread_for_one_repeat(tmp_path, monkeypatch, capsys):
    """4 requests × 1 repeat on the synthetic engine (4 output tokens: 3 ITL gaps each, 12 in all): every p90
    and p99 reads "max of n" except ITL's p90 (12 ≥ 10), and throughput has no "± 0.0"."""
    from kvray.cli.app import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "bench",
                "-m",
                "kvray/tiny-llama",
                "--backend",
                "synthetic",
                "--prompt-toks",
                "8",
                "--gen-toks",
                "4",
                "-c",
                "4",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(tmp_path / "out"),
            ]
        )
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), out
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in out.splitlines()
        if line.count("│") == 8
    }
    assert rows["TTFT"][0] == "4" and rows["TTFT"][3:5] == ["max of 4", "max of 4"]
    assert rows["ITL"][0] == "12" and rows["ITL"][4] == "max of 12" and "max" not in rows["ITL"][3]
    assert "± 0.0" not in out and "1 repeat, no spread" in out


# --- item 5: a vLLM row on a GPU shows the server's GPU memory, not its host RSS ------------------------------

GIB, MIB = 2**30, 2**20


def _vllm_gpu_rows():
    """exp1 on vLLM, one H100: the server's GPU memory (NVML, its tree) 20 GiB + 100 MiB per request; its host
    RSS a flat 3 GiB (what "peak mem" showed); the whole device 0.5 GiB above the server's."""
    import pandas as pd

    rows = []
    for c in (1, 2, 4, 8):
        gpu = 20 * GIB + c * 100 * MIB
        rows.append(
            {
                "cell_id": f"c{c}",
                "experiment": "exp1",
                "model": "m",
                "backend": "vllm",
                "dtype": "bf16",
                "hardware": "NVIDIA H100 80GB HBM3",
                "status": "ok",
                "workload": "uniform",
                "concurrency": c,
                "prompt_toks": 128,
                "gen_toks": 16,
                "simulated": False,
                "server_gpu_peak_bytes": gpu,
                "server_rss_peak_bytes": 3 * GIB,
                "rss_peak_bytes": 3 * GIB,
                "nvml_peak_used_bytes": gpu + GIB // 2,
                "kv_predicted_bytes": c * MIB,
                "kv_measured_bytes": c * MIB,
            }
        )
    return pd.DataFrame(rows)


def test_peak_memory_is_the_servers_gpu_memory_everywhere():
    from kvray.analysis.findings import memory_slopes
    from kvray.analysis.views import peak_column, peak_memory, prepare
    from kvray.figures.server import memory_bytes

    view = prepare(_vllm_gpu_rows())
    row = view.cells.iloc[0]
    assert peak_memory(row) == (20 * GIB + 100 * MIB, "server process tree GPU memory (NVML)")
    assert memory_bytes(row) == peak_memory(row)  # fig8 reads the same definition
    assert peak_column(view.cells) == ("server_gpu_peak_bytes", "server process tree GPU memory (NVML)")
    (slope,) = memory_slopes(view)
    assert slope.values["peak_column"] == "server_gpu_peak_bytes"
    assert slope.values["slope_bytes_per_request"] == pytest.approx(100 * MIB)  # the host RSS has slope 0


def test_report_peak_mem_cell_is_the_servers_gpu_memory():
    from kvray.analysis.views import prepare
    from kvray.document.blocks import CELL_COLUMNS

    view = prepare(_vllm_gpu_rows())
    cell = dict(CELL_COLUMNS)["peak mem"](view.cells.iloc[0])
    assert cell == "20.10 GiB"  # 20 GiB + 100 MiB, not the host RSS's 3.00 GiB


def test_in_process_and_cpu_rows_keep_their_own_columns():
    from kvray.analysis.views import peak_memory

    hf_gpu = {"peak_allocated_bytes": 5 * GIB, "rss_peak_bytes": 2 * GIB, "nvml_peak_used_bytes": 6 * GIB}
    assert peak_memory(hf_gpu) == (5 * GIB, "torch max_memory_allocated")
    vllm_cpu = {"server_gpu_peak_bytes": None, "server_rss_peak_bytes": 4 * GIB, "rss_peak_bytes": 4 * GIB}
    assert peak_memory(vllm_cpu) == (4 * GIB, "server process tree RSS")
    assert peak_memory({"rss_peak_bytes": float("nan")}) == (None, None)


# --- item 5: KV not recomputed is not memory saved -------------------------------------------------------------


def _reuse_record(cell_id, prefix_caching, peak_kv, status="ok", backend="sim", key="prefix_caching"):
    options = {} if prefix_caching is None else {key: prefix_caching}
    cell = {
        "model": "kvray/tiny-llama",
        "backend": backend,
        "dtype": "bf16",
        "workload": {"kind": "multi_turn"},
        "options": options,
        "experiment": "exp6",
    }
    return {"cell_id": cell_id, "status": status, "cell": cell, "memory": {"kv_predicted_bytes": peak_kv}}


def test_kv_memory_saved_is_peak_without_minus_with_and_nan_for_one_arm():
    """The issue's 6-turn chat: peak KV 432 MiB with and without caching → 0 saved (while 1,040 MiB were not
    recomputed); another cell 432 MiB off vs 300 MiB on → 132 MiB; a cell run only with the cache → NaN."""
    from kvray.analysis.reuse import kv_memory_saved

    records = [
        _reuse_record("chat-off", False, 432 * MIB),
        _reuse_record("chat-on", None, 432 * MIB),  # unset: on, as in vLLM V1 and the simulator
        {
            **_reuse_record("b-off", "false", 432 * MIB),
            "cell": {**_reuse_record("x", "false", 0)["cell"], "dtype": "fp16"},
        },
        {**_reuse_record("b-on", True, 300 * MIB), "cell": {**_reuse_record("x", True, 0)["cell"], "dtype": "fp16"}},
        _reuse_record("alone", True, 100 * MIB, backend="vllm", key="enable_prefix_caching"),
    ]
    saved = kv_memory_saved(records)
    assert saved["chat-on"] == 0 and saved["b-on"] == 132 * MIB
    assert saved["alone"] != saved["alone"]  # NaN: the dataset has no cache-off arm of it
    assert "chat-off" not in saved and "b-off" not in saved  # the baselines carry none


def test_old_kv_saved_columns_load_under_their_new_names(tmp_path):
    import json

    from kvray.data.reader import load_frames, read_results
    from kvray.measure.trace import CellResult
    from kvray.spec import Cell, Workload

    result = CellResult(Cell("kvray/tiny-llama", Workload.uniform(1, 8, 2), backend="sim"), "ok")
    record = result.to_dict()
    record["memory"] = {"kv_saved_bytes": 20 * MIB, "kv_saved_bytes_predicted": 20 * MIB}  # a dataset of before
    (tmp_path / "cells.jsonl").write_text(json.dumps(record) + "\n")
    (row,) = read_results(tmp_path, traces=False)
    assert row["memory"] == {"kv_not_recomputed_bytes": 20 * MIB, "kv_not_recomputed_bytes_predicted": 20 * MIB}
    cells, _ = load_frames(tmp_path)
    assert cells["kv_not_recomputed_bytes"].iloc[0] == 20 * MIB and "kv_saved_bytes" not in cells.columns
