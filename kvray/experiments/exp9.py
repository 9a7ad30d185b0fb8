"""exp9 — capacity planning: which GPU, how many, split how, for a traffic and its SLOs, and at what cost.

The job sweeps concurrency on each GPU type and TP degree (the simulator by default: seconds, no GPU), so its
cells are operating points of every deployment: the Pareto figure (tokens/s per GPU against tokens/s per user, a
$/M-token panel) draws them with the frontier. Its report section then runs the planner (kvray/capacity/, the
same as ``kvray plan``) for each model of the folder at ``EXP9_RATE`` under ``EXP9_SLO`` over the folder's GPU
types and TP degrees, and shows the cheapest deployment, the table of candidates and why each loses.

``draw`` makes the Pareto figure for any results folder whose cells with a TPOT and a throughput span at least two
deployments (GPU type × TP: ``kvray plot`` of an exp6 or exp7 folder across GPUs gets one too), and the plan
figures of exp9 folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.experiments.base import Experiment
from kvray.experiments.sections import cells_blocks, figure_blocks
from kvray.experiments.tp_sweep import tp_sweep_build

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.document import Block
    from kvray.experiments.base import Page

EXP9_GPUS = ("H100-SXM", "A100-80GB-SXM", "L4")
EXP9_TP = (1, 2, 4, 8)
EXP9_RATE = 20.0  # requests/s the section's plan serves
EXP9_SLO = {"ttft_ms": 1000.0, "tpot_ms": 100.0}  # at the 99th percentile


build = tp_sweep_build(
    "exp9",
    "Exp9, capacity planning: operating points of each GPU type × TP (Pareto figure, $/M tokens) and the cheapest "
    "deployment for 20 req/s under p99 TTFT 1 s, TPOT 100 ms. With only sim and no --hardware: H100, A100, L4.",
    default_prompt_toks=512,
    default_gen_toks=128,
    default_concurrency=(1, 8, 32, 128),
    default_tp=EXP9_TP,
    sim_gpus=EXP9_GPUS,
)


def _slug(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "--")).strip("-.") or "model"


def _exp9_records(dataset: Dataset) -> list[dict[str, Any]]:
    return [r for r in dataset.records if r["cell"].get("experiment") == "exp9"]


def plan_for(model: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The section's plan (module docstring) over the GPU types and TP degrees ``records`` ran, as JSON."""
    from kvray.capacity.planner import plan_capacity
    from kvray.capacity.prices import PRICES
    from kvray.capacity.traffic import traffic_from_flags
    from kvray.hardware.gpus import match_gpu
    from kvray.model.resolve import resolve_geometry

    mine = [r for r in records if r["cell"]["model"] == model]
    gpus = sorted({s.name for r in mine if (s := match_gpu(str(r["cell"].get("hardware", "")))) is not None})
    tps = sorted({int(r["cell"].get("tensor_parallel", 1) or 1) for r in mine})
    first = mine[0]["cell"]["workload"]["requests"][0]
    traffic = traffic_from_flags(int(first["prompt_toks"]), int(first["gen_toks"]))
    plan = plan_capacity(
        resolve_geometry(model),
        traffic,
        EXP9_RATE,
        EXP9_SLO,
        gpus=gpus or list(EXP9_GPUS),
        tps=tps or list(EXP9_TP),
        prices=PRICES,
    )
    return plan.to_dict(probes=True)


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """The Pareto figure of any folder with operating points; for exp9 cells, each model's plan and its figure."""
    from kvray.figures.pareto import has_pareto_data, pareto_figures, plan_figures

    drawn: list[Any] = pareto_figures(dataset, out_dir) if has_pareto_data(dataset.records) else []
    records = _exp9_records(dataset)
    for model in sorted({r["cell"]["model"] for r in records}):
        plan = plan_for(model, records)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"exp9_plan_{_slug(model)}.json").write_text(json.dumps(plan, indent=2, default=str) + "\n")
        for fig in plan_figures(plan, out_dir):  # named after the model: one plan figure per model
            name = f"exp9_plan_{_slug(model)}"
            moved = [path.replace(out_dir / f"{name}{path.suffix}") for path in fig.paths]
            fig.name, fig.paths = name, moved
            drawn.append(fig)
    return drawn


def section(exp: Experiment, page: Page) -> list[Block]:
    """The cells, then per model the plan's answer and its candidates, then the figures (of an exp9 folder)."""
    from kvray.document import Block

    blocks = cells_blocks(exp, page)
    for path in sorted(page.figure.fig_dir.glob("exp9_plan_*.json")):
        plan = json.loads(path.read_text())
        slo = ", ".join(f"{k} {v:g}" for k, v in plan["slo"].items())
        blocks.append(
            Block("h3", f"Plan: {plan['model']} at {plan['rate_rps']:g} req/s, p{plan['percentile']:g} {slo}")
        )
        best = plan["best"]
        blocks.append(
            Block(
                "p",
                "No candidate meets the SLOs."
                if best is None
                else f"Cheapest: {best['replicas']} × {best['gpu']} TP{best['tp']} (KV {best['kv_dtype']}) = "
                f"{best['gpus']} GPUs, ${best['cost_per_hour']:.2f}/h, ${best['cost_per_mtok_output']:.3f} "
                f"per M output tokens; one replica serves {best['max_rps_per_replica']:.3g} req/s within "
                f"the SLOs (predicted; bundled prices, kvray/capacity/prices.py).",
            )
        )
        what = plan.get("what_ifs") or {}
        if "offload" in what and "disaggregation" in what:
            blocks.append(
                Block(
                    "p",
                    f"What-ifs for the cheapest (predicted): CPU offload — {what['offload']['verdict']}. "
                    f"Disaggregated prefill/decode — {what['disaggregation']['verdict']} (docs/simulator.md, "
                    f'"KV what-ifs").',
                )
            )
        rows = [
            [
                c["gpu"],
                str(c["tp"]),
                "—" if c["max_rps_per_replica"] is None else f"{c['max_rps_per_replica']:.3g}",
                "—" if c["replicas"] is None else str(c["replicas"]),
                "—" if c["cost_per_hour"] is None else f"${c['cost_per_hour']:.2f}",
                "—" if c["cost_per_mtok_output"] is None else f"${c['cost_per_mtok_output']:.3f}",
                "best" if best is not None and c == best else c["reason"],
            ]
            for c in plan["candidates"]
        ]
        blocks.append(
            Block(
                "table",
                headers=["GPU", "TP", "req/s per replica", "replicas", "$/h", "$/M output", "why not"],
                rows=rows,
            )
        )
    # the Pareto figure is drawn for any folder (kvray plot); the report embeds it where exp9 ran
    return blocks + (figure_blocks(exp, page) if _exp9_records(page.dataset) else [])


EXPERIMENT = Experiment.of_module(
    globals(),
    "Exp9 — capacity planning: GPU × TP × replicas, priced, and the Pareto frontier",
    figures=("pareto_*", "exp9_plan_*"),
    table_sort=("hardware", "tensor_parallel", "concurrency"),
)
