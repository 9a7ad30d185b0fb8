"""Partly failed cells (status ``partial``) end to end, and the sanity warnings on constructed rows.

The partial cells come from the synthetic backend's injected failures through the real runner, dataset,
findings, figures and report; the sanity rows are built by hand with numbers whose verdict physics decides.
"""

from __future__ import annotations

import pandas as pd

from kvray.analysis.evidence import throughput_plateaus
from kvray.analysis.findings import SANITY_MARGIN, sanity_warnings
from kvray.analysis.views import prepare
from kvray.backends import get_backend
from kvray.data.reader import load_dataset
from kvray.data.writer import DatasetWriter
from kvray.experiments import compute_findings
from kvray.measure.trace import FINAL_STATUSES
from kvray.report import make_report
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload, make_options


def synthetic_cell(c: int, fail_every: int = 0, repeats: int = 2) -> Cell:
    return Cell(
        model="kvray/tiny-llama",
        backend="synthetic",
        workload=Workload.uniform(c, 64, 6),
        warmup=0,
        repeats=repeats,
        experiment="exp1",
        options=make_options(ttft_s=0.01, tpot_s=0.002, fail_every=fail_every),
    )


def test_a_cell_with_some_failed_requests_is_partial_with_counts():
    backend = get_backend("synthetic")
    result = run_cell(backend, synthetic_cell(4, fail_every=4))  # request 3 of 4 fails, in both repeats
    assert result.status == "partial"
    assert result.reason is not None and result.reason.startswith("2 of 8 requests failed: synthetic: injected")
    m = result.metrics
    assert (m["requests"], m["requests_ok"], m["requests_failed"], m["failure_rate"]) == (8, 6, 2, 0.25)
    assert m["ttft_s_n"] == 6 and m["tpot_s_n"] == 6 and m["itl_s_n"] == 6 * 5
    failed = [t for t in result.traces if t.status != "ok"]
    assert {t.request_id for t in failed} == {3} and all(t.output_toks == 3 for t in failed)  # half of 6 tokens
    assert run_cell(backend, synthetic_cell(4)).status == "ok"
    every = run_cell(backend, synthetic_cell(2, fail_every=1))
    assert every.status == "error"  # nothing succeeded: no measurement at all


def test_partial_is_final_for_resume_and_shown_wherever_latencies_are(tmp_path):
    assert "partial" in FINAL_STATUSES
    backend = get_backend("synthetic")
    writer = DatasetWriter(tmp_path, tables=False)
    for c, fail_every in ((1, 0), (2, 0), (4, 4), (8, 0)):
        writer.append(run_cell(backend, synthetic_cell(c, fail_every, repeats=1)))
    writer.write_tables()
    partial_id = synthetic_cell(4, 4, repeats=1).cell_id
    assert partial_id in DatasetWriter(tmp_path).done_ids  # a resumed sweep skips it like any other row

    cells, traces, _ = load_dataset(tmp_path)
    view = prepare(cells, traces)
    row = view.cells[view.cells["cell_id"] == partial_id].iloc[0]
    assert (row["status"], row["failure_rate"], row["ttft_s_n"]) == ("partial", 0.25, 3)
    findings = compute_findings(view)
    (failure,) = [f for f in findings if f.key == "failures"]
    assert "1 of 4 requests failed (25.0%)" in failure.text and "only the 3 that succeeded" in failure.text
    (plateau,) = throughput_plateaus(view)
    assert plateau.values["partial_concurrencies"] == [4] and "c=4: 1 of 4 failed" in plateau.text

    paths = make_report(tmp_path)
    md = paths.markdown.read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| 4 |")]
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[3] == "partial" and cols[9] == "1/4 (25.0%)"  # the failed count right before the latencies
    assert cols[10].endswith("(n=3)")  # TTFT p50 of the 3 successful requests
    assert "(n=3)" in md and "(n=8)" in md  # every percentile with its sample count
    assert "Cells with failed requests" in md
    figs = {f.name: f for f in paths.figures}
    assert figs["fig2_tps_vs_concurrency"].partial_markers == 1
    assert any("1 partial cell(s)" in n and "c=4 p64: 1/4 failed" in n for n in figs["fig2_tps_vs_concurrency"].notes)


# ---------------------------------------------------------------- sanity warnings on constructed rows


def rows(*cells: dict) -> pd.DataFrame:
    base = {
        "experiment": "exp1",
        "model": "facebook/opt-1.3b",
        "dtype": "bf16",
        "kv_dtype": "bf16",
        "weights": "random",
        "workload": "uniform",
        "status": "ok",
        "reason": "",
        "simulated": False,
        "prompt_toks": 128,
        "gen_toks": 64,
        "hardware": "cpu",
        "backend": "hf",
        "requests": 4,
        "requests_ok": 4,
        "requests_failed": 0,
    }
    out = []
    for i, c in enumerate(cells):
        row = {**base, **c}
        row.setdefault("cell_id", f"cell{i}")
        row["prompt_toks_list"] = ",".join([str(row["prompt_toks"])] * int(row["concurrency"]))
        out.append(row)
    return pd.DataFrame(out)


def test_tpot_falling_with_concurrency_on_a_static_batch_is_a_warning():
    # The quickstart's disturbed first cell: 18.7 ms at c=1 where c=2 measured 6.4 ms.
    view = prepare(
        rows(
            {"cell_id": "c1", "concurrency": 1, "tpot_s_p50": 0.0187},
            {"cell_id": "c2", "concurrency": 2, "tpot_s_p50": 0.0064},
            {"cell_id": "c4", "concurrency": 4, "tpot_s_p50": 0.0071},
        )
    )
    (warning,) = sanity_warnings(view)
    assert warning.key == "sanity" and warning.values["suspect_cell_id"] == "c1"
    assert warning.values["concurrency"] == [1, 2]
    assert "18.7 ms at c=1" in warning.text and "6.4 ms at c=2" in warning.text


def test_plausible_orderings_and_engines_that_may_reorder_are_not_flagged():
    rising = [{"concurrency": c, "tpot_s_p50": t} for c, t in ((1, 0.0065), (2, 0.0064), (4, 0.0071), (8, 0.009))]
    assert sanity_warnings(prepare(rows(*rising))) == []  # 0.0064 vs 0.0065: noise, within the margin
    just_inside = [
        {"concurrency": 1, "tpot_s_p50": 0.010},
        {"concurrency": 2, "tpot_s_p50": 0.010 * (1 - SANITY_MARGIN) + 1e-6},
    ]
    assert sanity_warnings(prepare(rows(*just_inside))) == []
    falling = [{"concurrency": 1, "tpot_s_p50": 0.0187}, {"concurrency": 2, "tpot_s_p50": 0.0064}]
    paged = [{**r, "backend": "hf-paged"} for r in falling]  # continuous batching: not a static batch
    simulated = [{**r, "simulated": True} for r in falling]
    assert sanity_warnings(prepare(rows(*paged))) == [] and sanity_warnings(prepare(rows(*simulated))) == []


def test_latency_below_the_gpus_roofline_floor_is_a_warning():
    """opt-1.3b bf16 decodes one token by reading its 1,315,758,080 parameters (published count; OPT ties the
    LM head to the embedding, its 2,050 × 2,048 learned positions are looked up one row at a time), 2 bytes
    each: ≥ 2.62 GB per step at 3.35 TB/s (H100 SXM, NVIDIA's datasheet) is ≥ 0.783 ms per token."""
    weights_read = (1_315_758_080 - (2050 - 1) * 2048) * 2
    floor_low = weights_read / 3.35e12
    kv_high = (128 + 64) * 196_608 / 3.35e12  # at most every cached position's KV on top
    h100 = "NVIDIA H100 80GB HBM3"
    view = prepare(
        rows(
            {"cell_id": "fast", "concurrency": 1, "tpot_s_p50": 0.0005, "hardware": h100},
            {"cell_id": "real", "concurrency": 2, "tpot_s_p50": 0.0012, "hardware": h100},
            {"cell_id": "cpu", "concurrency": 1, "tpot_s_p50": 0.0001},
        )
    )
    (warning,) = [w for w in sanity_warnings(view) if w.values["check"] == "below_roofline_floor"]
    assert warning.values["suspect_cell_id"] == "fast" and warning.values["metric"] == "tpot_s_p50"
    assert floor_low <= warning.values["floor_s"] <= floor_low + kv_high
    assert "H100-SXM" in warning.text and "below the roofline floor" in warning.text


def test_the_report_puts_sanity_warnings_first_and_marks_the_suspect_cell(tmp_path):
    from kvray.analysis.dataset import Dataset
    from kvray.document import render_markdown
    from kvray.report import build_blocks

    dataset = Dataset.from_frames(
        tmp_path,
        rows(
            {"cell_id": "c1", "concurrency": 1, "tpot_s_p50": 0.0187},
            {"cell_id": "c2", "concurrency": 2, "tpot_s_p50": 0.0064},
        ),
    )
    md = render_markdown(build_blocks(dataset, compute_findings(dataset.view), []), tmp_path)
    assert md.index("## Findings") < md.index("Implausible measurements") < md.index("Exp1 — concurrency sweep")
    assert "| ok ⚠ |" in md and md.count("⚠ |") == 1
