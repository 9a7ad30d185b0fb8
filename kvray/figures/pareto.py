"""The Pareto figure: tokens/s per GPU against tokens/s per user, frontier drawn, measured and predicted points on
one figure, and its cost variant ($/M output tokens against tokens/s per user) — from a plan (``kvray plan
--output``) or a results folder (``kvray plot``, drawn by exp9's ``draw`` for any folder with such cells).

pareto_<name>   (a) throughput per GPU vs interactivity: a colour per GPU type, a marker per TP degree, filled for
                measured points, hollow for predicted ones; the frontier as a step line. (b) $/M output tokens
                against interactivity for the points whose GPU has a price, with its own frontier (lower is better).
Points and their axes are kvray/capacity/pareto.py's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.capacity.pareto import ParetoPoint, cost_frontier, frontier, points_from_plan, points_from_records
from kvray.capacity.prices import PRICES
from kvray.figures import style
from kvray.figures.common import FigureResult, each_figure, failed_figure, label_axes, new_figure

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset

TP_MARKERS = {1: "o", 2: "s", 4: "^", 8: "D"}


def fig_pareto(points: Sequence[ParetoPoint], out_dir: Path, name: str, context: str) -> FigureResult:
    """Both panels (module docstring) for ``points``; a placeholder saying what is missing when there are none."""
    with new_figure(
        name,
        out_dir,
        1,
        2,
        figsize=(12, 4.6),
        title=("Throughput per GPU vs tokens/s per user: the Pareto frontier", context),
    ) as d:
        if not points:
            return d.missing(
                "no point with a TPOT and an output throughput:\nrun kvray plan or a sweep first", "no operating points"
            )
        ax, ax_cost = d.axes
        gpus = sorted({p.gpu for p in points})
        for i, gpu in enumerate(gpus):
            for tp in sorted({p.tp for p in points if p.gpu == gpu}):
                for measured in (True, False):
                    pts = [p for p in points if p.gpu == gpu and p.tp == tp and p.measured == measured]
                    if not pts:
                        continue
                    label = f"{gpu} TP{tp} {'measured' if measured else 'predicted'}"
                    face = style.color(i) if measured else "none"
                    kw = {"marker": TP_MARKERS.get(tp, "P"), "edgecolors": style.color(i), "facecolors": face, "s": 26}
                    ax.scatter(
                        [p.tokens_per_s_per_user for p in pts], [p.tokens_per_s_per_gpu for p in pts], label=label, **kw
                    )
                    priced = [p for p in pts if p.usd_per_mtok_output is not None]
                    if priced:
                        ax_cost.scatter(
                            [p.tokens_per_s_per_user for p in priced], [p.usd_per_mtok_output for p in priced], **kw
                        )
                    d.result.series.append(label)
        front = frontier(points)
        _frontier_line(ax, front, "tokens_per_s_per_gpu", where="post", label="Pareto frontier")
        d.result.notes.append(
            "frontier: "
            + ", ".join(
                f"{p.gpu} TP{p.tp} ({p.tokens_per_s_per_user:.0f} tok/s/user, {p.tokens_per_s_per_gpu:.0f} tok/s/GPU)"
                for p in front[:6]
            )
        )
        cheap = cost_frontier(points)
        if cheap:
            _frontier_line(ax_cost, cheap, "usd_per_mtok_output", where="pre")
            ax_cost.set_yscale("log")
        else:
            style.placeholder(ax_cost, "no GPU here has a price:\ngive them with --prices")
            d.result.notes.append("cost panel empty: no priced GPU")
        for a, ylabel, title in (
            (ax, "output tokens/s per GPU", "(a) throughput per GPU"),
            (ax_cost, "$ per M output tokens", "(b) cost (lower is better)"),
        ):
            label_axes(a, "tokens/s per user (1 / TPOT)", ylabel, title, legend_size=None)
        ax.legend(fontsize=6, ncol=2)
        d.result.caption = (
            "Each point is one deployment at one load: right is more interactive, up is more throughput per GPU. "
            "The frontier is the best trade-off any GPU type and TP degree reaches; hollow = predicted, filled = measured."
        )
    return d.result


def plan_figures(plan: Mapping[str, Any], out_dir: Path, extra: Sequence[ParetoPoint] = ()) -> list[FigureResult]:
    """The Pareto figure of a plan's probes (``Plan.to_dict(probes=True)``), ``pareto_plan``; ``extra``: points
    drawn beside them (a results folder's measured cells, ``kvray plan --measured``)."""
    slo = ", ".join(f"{k} {v:g}" for k, v in plan.get("slo", {}).items())
    context = f"{plan.get('model', '')} · {plan.get('traffic', '')} · predicted (kvray plan, SLO {slo})"
    with style.styled():
        try:
            return [fig_pareto([*points_from_plan(plan), *extra], out_dir, "pareto_plan", context)]
        except Exception as exc:  # a figure never costs the plan its answer
            return [failed_figure("pareto_plan", exc, out_dir)]


def has_pareto_data(records: Sequence[Mapping[str, Any]]) -> bool:
    """Cells with a TPOT and an output throughput from at least two deployments (GPU type × TP): a frontier across
    deployments needs two (one deployment's curve is fig2's and exp5's already)."""
    return len({(p.gpu, p.tp) for p in points_from_records(records, {})}) >= 2


def pareto_figures(dataset: Dataset, out_dir: Path, prices: Mapping[str, Any] | None = None) -> list[FigureResult]:
    """One Pareto figure per model of a results folder (``pareto_<model>``), bundled prices unless ``prices``."""
    import re

    points = points_from_records(dataset.records, prices if prices is not None else PRICES)
    drawers = []
    for model in sorted({p.model for p in points}):
        name = "pareto_" + (re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--")).strip("-.") or "model")
        mine = [p for p in points if p.model == model]
        drawers.append((name, functools.partial(fig_pareto, mine, out_dir, name, f"{model} · {len(mine)} cells")))
    return each_figure(out_dir, drawers)


def _frontier_line(ax: Any, front: Sequence[ParetoPoint], y: str, *, where: str, label: str | None = None) -> None:
    """A frontier as a black step line: tokens/s per user across, the points' attribute ``y`` up."""
    xs, ys = [p.tokens_per_s_per_user for p in front], [getattr(p, y) for p in front]
    ax.step(xs, ys, where=where, color="black", linewidth=1.2, label=label)
