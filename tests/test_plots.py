"""Figures from a crafted dataset (two GPU types, repeats, OOM / skipped / refused / error cells, columns
missing) and from empty and partial ones — checked by what the written SVG and PNG contain."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_findings import MODEL, result, uniform_traces, write_crafted

from kvray.data.writer import DatasetWriter
from kvray.figures.plots import FIGURES, make_figures
from kvray.spec import Cell, Workload

SVG_NS = "{http://www.w3.org/2000/svg}"


def svg_of(path: Path) -> ET.Element:
    return ET.parse(path.with_suffix(".svg")).getroot()


def svg_text(path: Path) -> str:
    """Every text element of the SVG (svg.fonttype none keeps text as text), joined."""
    return " ".join("".join(t.itertext()) for t in svg_of(path).iter(f"{SVG_NS}text"))


def hatched_bars(path: Path, gid: str) -> int:
    """Bars (paths) filled with a hatch pattern inside the group ``gid``."""
    groups = [g for g in svg_of(path).iter(f"{SVG_NS}g") if g.get("id") == gid]
    return sum("url(#h" in (p.get("style") or "") for g in groups for p in g.iter(f"{SVG_NS}path"))


def group_ids(path: Path) -> set[str]:
    return {g.get("id", "") for g in svg_of(path).iter(f"{SVG_NS}g")}


def markers_in(path: Path, gid_prefix: str) -> int:
    """Markers (<use> elements) drawn inside the groups whose id starts with ``gid_prefix``."""
    root = svg_of(path)
    return sum(
        len(list(g.iter(f"{SVG_NS}use"))) for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith(gid_prefix)
    )


def png_dpi(path: Path) -> float:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i = data.index(b"pHYs")
    ppm_x, _, unit = struct.unpack(">IIB", data[i + 4 : i + 13])
    assert unit == 1  # pixels per metre
    return ppm_x * 0.0254


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    out = write_crafted(tmp_path_factory.mktemp("crafted"))
    return out, {r.name: r for r in make_figures(out)}


def test_every_figure_in_both_formats_at_300_dpi(crafted):
    out, figs = crafted
    assert tuple(figs) == FIGURES
    for name, fig in figs.items():
        assert [p.name for p in fig.paths] == [f"{name}.png", f"{name}.svg"]
        assert all(p.parent == out / "figures" and p.stat().st_size > 5000 for p in fig.paths)
        assert png_dpi(fig.paths[0]) == pytest.approx(300, abs=0.5)
        assert not fig.empty and not any(n.startswith("could not draw") for n in fig.notes), (name, fig.notes)


def test_titles_carry_model_dtype_backend_hardware(crafted):
    _, figs = crafted
    for name in FIGURES[:6]:
        text = svg_text(figs[name].paths[0])
        for needle in (MODEL, "bf16", "hf", "A100-40GB-SXM, H100-SXM"):
            assert needle in text, (name, needle)


def test_fig1_memory_series_capacity_and_oom_markers(crafted):
    _, figs = crafted
    fig = figs["fig1_mem_vs_concurrency"]
    path = fig.paths[0]
    assert fig.series == ["A100-40GB-SXM", "H100-SXM"]
    ids = group_ids(path)
    # Both GPUs: peak, baseline and predicted KV; measured KV only where the dataset has it (H100, index 1).
    assert {"peak-0", "peak-1", "weights-0", "weights-1", "kv_predicted-0", "kv_predicted-1"} <= ids
    assert "kv_measured-1" in ids and "kv_measured-0" not in ids
    # OOM boundary: A100 ran out at 32 and skipped 64; H100 ran out at 64 — all marked on the axis.
    assert fig.oom_markers == 3
    assert markers_in(path, "oom-marker-oom-0") == 1 and markers_in(path, "oom-marker-oom-1") == 1
    assert markers_in(path, "oom-marker-skipped_after_oom-0") == 1
    assert {"oom-boundary-0", "oom-boundary-1"} <= ids
    text = svg_text(path)
    assert "H100-SXM memory 80 GiB" in text and "A100-40GB-SXM memory 40 GiB" in text
    assert "measured peak" in text and "predicted KV" in text and "skipped after OOM" in text
    # The error cell is noted, never drawn as a result or a tick.
    assert any("failed with an error" in n for n in fig.notes)
    assert ">3<" not in ET.tostring(svg_of(path), encoding="unicode").replace(" ", "")


def test_fig2_repeats_as_error_bars(crafted):
    _, figs = crafted
    fig = figs["fig2_tps_vs_concurrency"]
    assert fig.series == ["A100-40GB-SXM", "H100-SXM"] and fig.oom_markers == 3
    assert any("min–max of output throughput over 3 repeats" in n for n in fig.notes)
    assert {"tps-0", "tps-1", "tpot-0", "tpot-1"} <= group_ids(fig.paths[0])


def test_fig3_loglog_fit_labels_and_refused_marker(crafted):
    _, figs = crafted
    fig = figs["fig3_latency_vs_seqlen"]
    text = svg_text(fig.paths[0])
    assert text.count("1.50") >= 2  # TTFT ∝ L^1.50 on both GPUs, by construction
    assert fig.oom_markers == 1 and markers_in(fig.paths[0], "oom-marker-refused-0") == 3  # one per panel
    assert "refused (predicted OOM)" in text


def test_fig4_memory_vs_seqlen(crafted):
    _, figs = crafted
    fig = figs["fig4_mem_vs_seqlen"]
    assert fig.oom_markers == 1 and {"kv_predicted-0", "kv_predicted-1", "capacity"} <= group_ids(fig.paths[0])


def test_fig5_short_requests_alone_vs_mixed(crafted):
    _, figs = crafted
    fig = figs["fig5_mixed_lengths_latency"]
    assert sorted(fig.series) == ["A100-40GB-SXM", "H100-SXM"]
    ids = group_ids(fig.paths[0])
    assert {"bar-alone-ttft_s-0", "bar-mixed-ttft_s-0", "bar-alone-e2e_s-1", "bar-mixed-e2e_s-1"} <= ids
    text = svg_text(fig.paths[0])
    assert "×26.0" in text  # TTFT of the short requests, mixed / alone, by construction
    assert "3 × 128 tok alone" in text and "1 × 4096 tok (mixed)" in text


def test_fig6_cross_hardware_marks_cells_that_did_not_fit(crafted):
    _, figs = crafted
    fig = figs["fig6_cross_hardware"]
    assert fig.series == ["A100-40GB-SXM", "H100-SXM"]
    assert fig.oom_markers == 2  # exp1 c32 and exp2 p4096 ran on H100 only
    marks = [g for g in svg_of(fig.paths[0]).iter(f"{SVG_NS}g") if g.get("id") == "oom-marker"]
    assert len(marks) == 3 * 2 and all("OOM" in "".join(g.itertext()) for g in marks)  # in each of three panels
    text = svg_text(fig.paths[0])
    assert "exp1 c32 p512" in text and "throughput per GiB of KV" in text and "per GB " not in text
    # H100 cells measured their KV, A100 cells did not: panel (c) says so and hatches the predicted bars
    assert "hatched bars: predicted KV" in text
    assert hatched_bars(fig.paths[0], "bar-_tps_per_gib-A100-40GB-SXM") > 0
    assert hatched_bars(fig.paths[0], "bar-_tps_per_gib-H100-SXM") == 0
    assert hatched_bars(fig.paths[0], "bar-output_tps-A100-40GB-SXM") == 0  # only panel (c) divides by KV


def test_fig7_kv_scatter_and_error_per_cell(crafted):
    _, figs = crafted
    fig = figs["fig7_kv_predicted_vs_measured"]
    assert fig.series == ["H100-SXM"]
    assert markers_in(fig.paths[0], "kv-points-1") == 14 and markers_in(fig.paths[0], "kv-error-1") == 14
    assert "identity" in group_ids(fig.paths[0])
    assert any("no measured KV recorded for: A100-40GB-SXM" in n for n in fig.notes)
    assert any("mean |error| 2.00%" in n for n in fig.notes)


def test_empty_dataset_gives_figures_that_say_what_is_missing(tmp_path):
    figs = {r.name: r for r in make_figures(tmp_path)}
    assert tuple(figs) == FIGURES
    for name, fig in figs.items():
        assert fig.empty and fig.paths[1].is_file() and "missing-data" in group_ids(fig.paths[0]), name
    assert "No exp1 cells in this dataset" in svg_text(figs["fig1_mem_vs_concurrency"].paths[0])
    fig6 = figs["fig6_cross_hardware"].paths[0]
    # one short panel saying it once, not three panels repeating it in a tall empty figure
    assert svg_text(fig6).count("at least two hardware types") == 1
    assert float(svg_of(fig6).get("height", "0pt").removesuffix("pt")) < 0.3 * 9.0 * 72


def test_partial_dataset_without_memory_columns_or_traces(tmp_path):
    """Cells with metrics but no memory figures and no traces (e.g. a remote server without metrics)."""
    writer = DatasetWriter(tmp_path, tables=False)
    for c in (1, 2, 4):
        r = result(
            Cell(MODEL, Workload.uniform(c, 256, 8), experiment="exp1"),
            "H100",
            "ok",
            uniform_traces(c, 256, 8, 0.01, 0.01, 0),
            {},
        )
        r.traces = []  # keep the summary metrics, drop the per-request rows
        writer.append(r)
    figs = {f.name: f for f in make_figures(tmp_path)}
    fig1 = figs["fig1_mem_vs_concurrency"]
    assert not fig1.empty and any("not in the dataset: measured peak memory" in n for n in fig1.notes)
    assert figs["fig2_tps_vs_concurrency"].series == ["H100-SXM"]
    assert any("one repeat per cell" in n for n in figs["fig2_tps_vs_concurrency"].notes)
    fig7 = figs["fig7_kv_predicted_vs_measured"]
    assert fig7.empty and "kv_measured_bytes, kv_predicted_bytes" in fig7.notes[0]


def test_one_failing_figure_does_not_stop_the_others(tmp_path, monkeypatch):
    import kvray.figures.plots as plots

    def broken(view, out_dir):
        raise ValueError("boom")

    monkeypatch.setattr(plots, "fig2_tps_vs_concurrency", broken)
    figs = {f.name: f for f in make_figures(write_crafted(tmp_path / "d"))}
    failed = figs["fig2_tps_vs_concurrency"]
    assert failed.empty and failed.notes == ["could not draw: boom"] and failed.paths[0].is_file()
    assert "could not be drawn" in svg_text(failed.paths[0]) and "boom" in svg_text(failed.paths[0])
    assert not figs["fig1_mem_vs_concurrency"].empty and len(figs) == len(FIGURES)


@pytest.mark.integration  # a `kvray` child process
def test_plot_command_needs_neither_ray_nor_torch(crafted, tmp_path):
    out, _ = crafted
    code = (
        "import sys\n"
        "from kvray.cli import main\n"
        f"try: main(['plot', {str(out)!r}, '--out', {str(tmp_path)!r}])\n"
        "except SystemExit as e: assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "fig1_mem_vs_concurrency: 2 series, 3 OOM cell(s) marked" in proc.stdout
    # fig1–fig7, and the Pareto frontier (exp9's draw): the folder holds two deployments, A100-40GB and H100
    pareto = "pareto_" + MODEL.replace("/", "--")
    names = (*FIGURES, pareto)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{e}" for n in names for e in ("png", "svg"))


def test_plot_command_on_a_missing_folder_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kvray.cli", "plot", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is not a results folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_energy_panels_appear_where_energy_exists_and_say_tdp_estimate(tmp_path):
    """Issue #16: simulated cells carry the simulator's TDP × time estimate, so fig2 gains (c) tokens per joule and
    fig6 (d), titled as the estimate (issue 25: never on an axis with measured energy). The row's estimate is TDP ×
    the run's time (first arrival → last token)."""
    from kvray.backends.sim import SimBackend
    from kvray.runner.run import run_cell

    writer = DatasetWriter(tmp_path)
    for gpu in ("H100-SXM", "A100-80GB-SXM"):
        for c in (1, 4):
            cell = Cell(
                model="meta-llama/Meta-Llama-3-8B",
                workload=Workload.uniform(c, 512, 32),
                backend="sim",
                hardware=gpu,
                warmup=0,
                repeats=1,
                experiment="exp1",
            )
            result = run_cell(SimBackend(), cell)
            row = result.to_row()
            e2e_run = max(t.end_s for t in result.traces)
            assert row["energy_j_tdp_estimate"] == pytest.approx(row["tdp_power_w"] * e2e_run)
            assert row["j_per_output_tok_tdp_estimate"] == pytest.approx(row["energy_j_tdp_estimate"] / (c * 32))
            writer.append(result)
    figs = {f.name: f for f in make_figures(tmp_path)}
    fig2, fig6 = figs["fig2_tps_vs_concurrency"], figs["fig6_cross_hardware"]
    assert any(g.startswith("tok-per-j-") for g in group_ids(fig2.paths[0]))
    assert {"bar-_tok_per_j-H100-SXM", "bar-_tok_per_j-A100-80GB-SXM"} <= group_ids(fig6.paths[0])
    assert any("TDP × time estimate" in n for n in fig6.notes) and any("TDP × time estimate" in n for n in fig2.notes)


def test_fig10_request_axis_has_integer_ticks_for_one_request():
    """One request is row 0: its axis shows the tick 0 only, not −0.5 … 0.5 in fractional steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvray.figures.timeline import _request_bars

    fig, ax = plt.subplots()
    trace = {"request_id": 0, "arrival_s": 0.0, "start_s": 0.01, "end_s": 0.2, "token_times_s": [0.05, 0.1, 0.2]}
    assert _request_bars(ax, [trace]) == 1
    fig.canvas.draw()
    low, high = sorted(ax.get_ylim())
    shown = [t for t in ax.get_yticks() if low <= t <= high]
    plt.close(fig)
    assert shown == [0.0]


def straggler_cells(straggler_on_h100: bool):
    """Two cell shapes on an A100 and on two H100 workers, one of which (h1) the run named a straggler."""
    import pandas as pd

    rows = []
    for hardware, worker, speed in (
        ("NVIDIA A100-SXM4-40GB", "a0", 1.0),
        ("NVIDIA H100 80GB HBM3", "h0", 2.0),
        ("NVIDIA H100 80GB HBM3", "h1", 0.6),
    ):
        for c in (1, 4):
            rows.append(
                {
                    "cell_id": f"{worker}-c{c}",
                    "experiment": "exp1",
                    "model": MODEL,
                    "backend": "hf",
                    "dtype": "bf16",
                    "workload": "uniform",
                    "prompt_toks": 512,
                    "prompt_toks_list": "512",
                    "gen_toks": 64,
                    "concurrency": c,
                    "hardware": hardware,
                    "simulated": False,
                    "status": "ok",
                    "output_tps": 100.0 * c * speed,
                    "e2e_s_p50": 1.0 / speed,
                    "kv_predicted_bytes": c * 576 * 196_608,
                    "straggler": straggler_on_h100 and worker == "h1",
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("marked", [True, False])
def test_fig6_says_how_many_of_its_cells_ran_on_a_straggler(tmp_path, marked):
    """The two cells of the H100 worker named a straggler: fig6 counts them in its notes, printed under the
    figure, and names their GPU type; with no straggler in the run there is no such note."""
    from kvray.analysis.views import prepare
    from kvray.figures import style
    from kvray.figures.hardware import fig6_cross_hardware

    with style.styled():  # as `kvray plot` draws it: text stays text in the SVG
        fig = fig6_cross_hardware(prepare(straggler_cells(marked)), tmp_path)
    assert fig.series == ["A100-40GB-SXM", "H100-SXM"]
    note = "2 cells ran on a straggler worker of H100-SXM (column straggler): those bars are one slow GPU, not its type"
    assert (note in fig.notes) is marked
    text = svg_text(fig.paths[1])
    assert "H100-SXM" in text and ("2 cells ran on a straggler worker" in text) is marked
