"""Every figure, drawn from a results folder alone (no Ray, no torch): ``make_figures(results_dir)``.

fig1_mem_vs_concurrency      exp1 memory: measured peak, weights baseline, measured and predicted KV,
                             the GPU's capacity, OOM cells marked on the x axis
fig2_tps_vs_concurrency      exp1 output throughput (min–max over repeats) and TPOT p50–p99
fig3_latency_vs_seqlen       exp2 TTFT, TPOT and E2E vs prompt length, log-log, with the fitted exponent
fig4_mem_vs_seqlen           exp2 memory, as fig1
fig5_mixed_lengths_latency   exp3 short requests alone vs batched with long ones: p50/p99 TTFT and E2E
fig6_cross_hardware          the same cells on each GPU type: throughput, latency, throughput per GiB of KV
fig7_kv_predicted_vs_measured  predicted vs measured KV with y = x, and the error of each cell

One module per family draws them: memory.py (fig1, fig4), throughput.py (fig2), latency.py (fig3, fig5),
hardware.py (fig6), kv.py (fig7); common.py holds what they share. Which experiment embeds which figure, and the
figures of exp4–exp7 (server.py, serving.py, reuse.py, parallelism.py), are declared by the experiments
(kvray/experiments/); ``kvray.report.draw_figures`` draws them all for ``kvray plot`` and the report. A figure without the data it needs is still written, saying what is
missing; one figure failing never stops the others. Each call returns what it drew (series, OOM markers,
notes), which the tests check.
"""

from __future__ import annotations

from pathlib import Path

from kvray.analysis.views import View
from kvray.figures.common import FIGURES_DIR, FigureResult, figures_of
from kvray.figures.hardware import fig6_cross_hardware
from kvray.figures.kv import fig7_kv_predicted_vs_measured
from kvray.figures.latency import fig3_latency_vs_seqlen, fig5_mixed_lengths_latency
from kvray.figures.memory import fig1_mem_vs_concurrency, fig4_mem_vs_seqlen
from kvray.figures.throughput import fig2_tps_vs_concurrency

# The figures in report order; each is written to a file named as its function, by which plot_view finds it.
FIGURES = tuple(
    draw.__name__
    for draw in (
        fig1_mem_vs_concurrency,
        fig2_tps_vs_concurrency,
        fig3_latency_vs_seqlen,
        fig4_mem_vs_seqlen,
        fig5_mixed_lengths_latency,
        fig6_cross_hardware,
        fig7_kv_predicted_vs_measured,
    )
)


def make_figures(results_dir: str | Path, out_dir: str | Path | None = None) -> list[FigureResult]:
    """Load a results folder and write every figure (PNG 300 dpi + SVG) into ``out_dir`` (default
    RESULTS_DIR/figures)."""
    from kvray.analysis.dataset import Dataset

    target = Path(out_dir) if out_dir is not None else Path(results_dir) / FIGURES_DIR
    return plot_view(Dataset.load(results_dir).view, target)


def plot_view(view: View, out_dir: Path, names: tuple[str, ...] = FIGURES) -> list[FigureResult]:
    """The figures ``names`` (of FIGURES; all by default) from a prepared View; a figure that fails is replaced
    by one saying why."""
    return figures_of(
        view, out_dir, ((name, globals()[name]) for name in names)
    )  # a figure's file is its function's name
