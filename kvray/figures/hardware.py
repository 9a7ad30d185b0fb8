"""fig6: the same cells on each GPU type — output throughput, E2E p50, throughput per GiB of KV cache and, where
energy exists, output tokens per joule: measured where any cell measured it, else the simulator's TDP × time
estimate, never both on one axis.

A cell shape (experiment, model, backend, dtypes, workload, lengths) run on at least two hardware types is
one group of bars, a bar per GPU type; a cell that did not fit that GPU is an OOM label where its bar would be,
a partly failed cell's bar is hatched. Panel (c) divides by the measured KV where the cell recorded one and by
kvray's prediction otherwise; its title says which, and bars on the prediction are hatched when both occur.
Without the same cells on two hardware types the figure is one short panel saying so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kvray.analysis.views import ENERGY_TDP_ESTIMATE, OOM_STATUSES, View, joined_keys, ok_rows, tokens_per_joule
from kvray.figures import common, style
from kvray.figures.common import FigureResult
from kvray.measure.trace import MEASURED_STATUSES
from kvray.units import GIB

SHAPE_KEYS = ("experiment", "model", "backend", "dtype", "kv_dtype", "workload", "prompt_toks_list", "gen_toks")
MAX_SHAPES = 24
PANELS = (
    ("output_tps", "output tokens/s", "(a) output throughput"),
    ("e2e_s_p50", "E2E p50 (s)", "(b) end-to-end latency p50"),
    ("_tps_per_gib", "tokens/s per GiB of KV", "(c) throughput per GiB of KV cache"),
)
# drawn only when some cell has energy: measured (tok_per_s_per_w, kvray/measure/telemetry.py) when any cell has it,
# else the simulator's TDP × time estimate (1 / j_per_output_tok_tdp_estimate), titled as such
ENERGY_PANEL = ("_tok_per_j", "output tokens per joule", "(d) energy efficiency")
PREDICTED_HATCH = "//"  # panel (c) bars whose KV is kvray's prediction (no measured KV in that cell)
PARTIAL_HATCH = "xx"  # a partly failed cell: its figures count the successful requests only


def _shape_label(row: Any, varying: set[str]) -> str:
    lengths = str(row["prompt_toks_list"]).split(",")
    users = row["concurrency"]  # NaN for an open loop (its rate, not a count, sets the load)
    shape = f"{'c' + str(int(users)) if users == users else str(row.get('load', 'open'))} p{row['prompt_toks']:.0f}"
    if row["workload"] == "mixed":
        shape = f"{len(lengths)} mixed {min(map(int, lengths))}/{max(map(int, lengths))}"
    parts = [str(row["experiment"])] if row["experiment"] else []
    parts += [str(row[k]) for k in ("model", "backend", "dtype") if k in varying]
    return " ".join(parts + [shape])


def _shared_shapes(keyed: Any, hardware: list[str]) -> tuple[list[str], str]:
    """The cell shapes run on more than one hardware type with an ok cell; else none, and why."""
    if len(hardware) < 2:
        return (
            [],
            f"needs the same cells on at least two hardware types; this dataset has {', '.join(hardware) or 'none'}",
        )
    per_shape = keyed.groupby("_shape")["hardware_label"].nunique()
    has_ok = set(ok_rows(keyed)["_shape"])
    shared = [s for s in per_shape[per_shape > 1].index if s in has_ok]
    return shared, "" if shared else "no cell shape was run on more than one hardware type"


def fig6_cross_hardware(view: View, out_dir: Path) -> FigureResult:
    cells = view.cells
    heading = ("fig6 · The same cells on each GPU type", view.context(cells))
    hardware = sorted({str(h) for h in cells["hardware_label"]}) if len(cells) else []
    keyed = cells.assign(_shape=joined_keys(cells, list(SHAPE_KEYS))) if len(cells) else cells
    shared, why = _shared_shapes(keyed, hardware)
    if not shared:  # one short panel with the message once, not three empty panels
        with common.new_figure("fig6_cross_hardware", out_dir, 1, 1, figsize=(7.0, 2.0), title=heading) as d:
            d.missing(
                f"No cross-hardware comparison: {why}.\nRun with `--hardware each` (or a job "
                "listing several GPU types) to fill it.",
                why,
            )
        return d.result
    sub = keyed[keyed["_shape"].isin(shared)]
    tok_per_j, energy_kind = tokens_per_joule(sub)
    estimate = energy_kind == ENERGY_TDP_ESTIMATE
    energy_panel = (
        "_tok_per_j",
        f"output tokens per joule ({energy_kind})",
        "(d) energy: TDP × time estimate (simulator), not measured" if estimate else ENERGY_PANEL[2],
    )
    panels = PANELS + ((energy_panel,) if energy_kind is not None else ())
    with common.new_figure(
        "fig6_cross_hardware", out_dir, len(panels), 1, figsize=(7.0, 3.0 * len(panels)), title=heading
    ) as d:
        axes, result = d.axes, d.result
        if "straggler" in sub and sub["straggler"].astype(bool).any():  # kvray/sweep/stragglers.py
            slow = sorted({str(h) for h in sub.loc[sub["straggler"].astype(bool), "hardware_label"]})
            result.notes.append(
                f"{int(sub['straggler'].astype(bool).sum())} cells ran on a straggler worker of "
                f"{', '.join(slow)} (column straggler): those bars are one slow GPU, not its type"
            )
        sub = sub.assign(_tok_per_j=tok_per_j)
        first = sub.sort_values(["experiment", "concurrency", "prompt_toks"]).drop_duplicates("_shape")
        order = first["_shape"].tolist()
        if len(order) > MAX_SHAPES:
            result.notes.append(f"showing {MAX_SHAPES} of {len(order)} shared cell shapes (evenly spaced)")
            order = [order[int(i)] for i in np.linspace(0, len(order) - 1, MAX_SHAPES)]
        hw_here = sorted({str(h) for h in sub["hardware_label"]})
        d.fig.set_figwidth(max(7.0, 1.5 + 0.65 * len(order) * max(1.0, len(hw_here) / 3)))
        varying = {k for k in ("model", "backend", "dtype") if sub[k].nunique() > 1}
        labels = [_shape_label(first.set_index("_shape").loc[s], varying) for s in order]
        measured = sub["kv_measured_bytes"].astype(float)
        kv = measured.where(measured > 0).fillna(sub["kv_predicted_bytes"].astype(float))
        on_prediction = measured.isna() | ~(measured > 0)
        sub = sub.assign(_tps_per_gib=sub["output_tps"].astype(float) / (kv / GIB), _kv_predicted=on_prediction)
        ran = sub[sub["status"].isin(MEASURED_STATUSES)]
        basis = _kv_basis(ran["_kv_predicted"])
        for ax, (col, ylabel, title) in zip(axes, panels, strict=True):
            mark = col == "_tps_per_gib" and "hatched" in basis
            ooms, partial = _bars(ax, sub, order, hw_here, col, ylabel, predicted_col="_kv_predicted" if mark else None)
            if ax is axes[0]:
                result.oom_markers += ooms
                result.partial_markers += partial
            ax.set_title(title + (f" — {basis}" if col == "_tps_per_gib" else ""), loc="left")
            ax.set_xticks(
                np.arange(len(order)), labels if ax is axes[-1] else [""] * len(order), rotation=30, ha="right"
            )
            ax.grid(axis="x", visible=False)
        axes[0].legend(title="hardware", loc="upper left", bbox_to_anchor=(1.005, 1.0))
        result.series = hw_here
        if kv.isna().all():
            result.notes.append("panel (c) needs kv_measured_bytes or kv_predicted_bytes: not in the dataset")
        result.notes.append(f"panel (c) per GiB (2^30 bytes) of {basis}; OOM: the cell did not fit that GPU")
        if estimate:
            result.notes.append(
                "panel (d): no cell measured energy; the simulator's TDP × time estimate (the GPUs "
                "at datasheet TDP for the predicted run: an estimate, not a bound)"
            )
        elif energy_kind is not None:
            result.notes.append(
                "panel (d): measured energy (NVML counter / RAPL), summed over each cell's GPUs; "
                "cells without a reading have no bar (no estimate is mixed in)"
            )
        if result.partial_markers:
            result.notes.append("hatched xx: partial cell, some requests failed (successful requests only)")
    return result


def _kv_basis(predicted: Any) -> str:
    """Which KV panel (c) divides by: "measured KV", "predicted KV", or both (the predicted bars hatched)."""
    if not len(predicted) or not predicted.any():
        return "measured KV"
    if predicted.all():
        return "predicted KV (no cell measured its KV)"
    return "measured KV; hatched bars: predicted KV"


def _bars(
    ax: Any, sub: Any, order: list[str], hw_here: list[str], col: str, ylabel: str, predicted_col: str | None = None
) -> tuple[int, int]:
    """One bar per hardware type per shape of ``col`` (measured cells); "OOM" where the cell did not fit; partial
    cells hatched, and bars whose ``predicted_col`` is true (predicted KV or energy) too. Returns (OOM labels, partial bars)
    drawn; log y where small cells would vanish next to large ones (e.g. tokens/s per GiB)."""
    width = 0.8 / len(hw_here)
    drawn: list[float] = []
    oom_count = partial_count = 0
    for h_i, hw in enumerate(hw_here):
        part = sub[sub["hardware_label"] == hw].set_index("_shape")
        xs = np.arange(len(order)) - 0.4 + width * (h_i + 0.5)
        ys, ooms, hatches = [], [], []
        for j, shape in enumerate(order):
            row = part.loc[shape] if shape in part.index else None
            if row is not None and getattr(row, "ndim", 1) > 1:
                row = row.iloc[0]
            hatch = None
            if row is not None and row["status"] in MEASURED_STATUSES:
                ys.append(float(row[col]))
                if row["status"] == "partial":
                    hatch, partial_count = PARTIAL_HATCH, partial_count + 1
                elif predicted_col is not None and bool(row[predicted_col]):
                    hatch = PREDICTED_HATCH
                hatches.append(hatch)
            else:
                hatches.append(None)
                ys.append(math.nan)
                if row is not None and row["status"] in OOM_STATUSES:
                    ooms.append(j)
        bars = ax.bar(xs, ys, width * 0.95, color=style.color(h_i), label=hw, gid=f"bar-{col}-{hw}")
        for bar, hatch in zip(bars, hatches, strict=True):
            if hatch:
                bar.set_hatch(hatch)
                bar.set_edgecolor("white")
        drawn += ys
        for j in ooms:
            ax.annotate(
                "OOM",
                (xs[j], 0),
                xycoords=("data", "axes fraction"),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                va="bottom",
                rotation=90,
                fontsize=7,
                color=style.OOM_COLOR,
                fontweight="bold",
                gid="oom-marker",
            )
        oom_count += len(ooms)
    common.auto_y(ax, drawn, ylabel, span=50, headroom=None)
    return oom_count, partial_count
