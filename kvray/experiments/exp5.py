"""exp5 — serving load: a closed loop per user count and an open loop at each rate (or a saturation search),
every cell judged against SLOs. fig11 (latency vs throughput, the knee) and fig12 (throughput per GPU vs per
user, kvray/figures/serving.py); its section tabulates the highest goodput per configuration.

The pieces it runs on are general and live in their stages: the loads and SLOs a job file parses
(kvray/plan/loads.py), the open/closed-loop clients (kvray/backends/arrivals.py), the steady-state window
(kvray/measure/serving.py) and the saturation search (kvray/runner/saturation.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.errors import KvrayInputError
from kvray.experiments.base import Experiment, Flags, Page
from kvray.experiments.options import (
    BackendsOpt,
    GenDistOpt,
    GenOpt,
    PromptDistOpt,
    PromptToksOpt,
    SeedOpt,
    ServerFlags,
    SloOpt,
    server_common,
)
from kvray.experiments.sections import every_cell_blocks, figure_blocks

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.document import Block
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job

EXP5_GPUS = ("H100-SXM", "A100-80GB-SXM", "L4")  # sim's default hardware for exp5: a prediction per GPU type
EXP5_SLO = {"ttft_ms": 500.0, "tpot_ms": 50.0}


def exp5_job(
    common: Common,
    prompt: int | dict[str, Any] = 512,
    gen: int | dict[str, Any] = 128,
    users: list[int] | None = None,
    requests_per_user: int = 8,
    open_load: str | None = "poisson",
    rates: list[float] | str = "auto",
    requests: int = 200,
    slo: dict[str, float] | None = None,
    seed: int = 0,
    burstiness: float = 1.0,
) -> Job:
    """A closed loop per user count (``requests_per_user`` each: the first and the last of every user fall in
    the ramp-up and the drain, kvray/measure/serving.py) and an open loop (``open_load``) at each of ``rates`` —
    or ``"auto"``: a saturation search — every cell judged against ``slo``. ``users=[]`` or ``open_load=None``
    leaves that half out."""
    from kvray.plan.experiments import job_from_grid_blocks, max_positions, positive
    from kvray.spec import OPEN_LOOPS

    users = sorted(set(users if users is not None else [1, 4, 16, 64]))
    if users:
        positive("--users", users)
    positive("--requests-per-user", [requests_per_user])
    positive("--requests", [requests])
    if requests_per_user < 3:
        raise KvrayInputError(
            f"--requests-per-user must be >= 3 (each user's first and last request are not "
            f"steady state), got {requests_per_user}"
        )
    if open_load is not None and open_load not in OPEN_LOOPS:
        raise KvrayInputError(f"--open-load: expected one of {', '.join(OPEN_LOOPS)}, got {open_load!r}")
    if not users and open_load is None:
        raise KvrayInputError("exp5 needs a closed loop (--users) or an open loop (--open-load), or both")
    rate_list = [] if isinstance(rates, str) else sorted(set(rates))
    if rates != "auto":
        if not rate_list:
            raise KvrayInputError("--rates needs at least one value (requests/s) or auto")
        if bad := [r for r in rate_list if not (r > 0 and math.isfinite(r))]:
            raise KvrayInputError(f"--rates values must be positive requests/s, got {bad[0]}")
    lengths: dict[str, Any] = {}
    for side, value in (("prompt", prompt), ("gen", gen)):
        if isinstance(value, int):
            positive(f"--{side}-toks", [value])
            lengths[f"{side}_toks"] = [value]
        else:
            lengths[f"{side}_dist"] = dict(value)
    longest = [int(v[0]) if isinstance(v, list) else int(v.get("max", v.get("value", 0))) for v in lengths.values()]
    if sum(longest) - 1 > (limit := max_positions(common.model)):
        raise KvrayInputError(
            f"prompt {longest[0]} + {longest[1]} generated tokens exceed {common.model}'s {limit} positions"
        )
    slo = dict(EXP5_SLO if slo is None else slo)
    blocks: list[dict[str, Any]] = [
        {**lengths, "load": {"kind": "closed", "users": u, "requests": u * requests_per_user, "seed": seed}, "slo": slo}
        for u in users
    ]
    if open_load is not None:
        load: dict[str, Any] = {"kind": open_load, "requests": requests, "seed": seed}
        load.update({"rate": "auto"} if rates == "auto" else {"rates": rate_list})
        if open_load == "gamma":
            load["burstiness"] = burstiness
        blocks.append({**lengths, "load": load, "slo": slo})
    if common.hardware == "any" and set(common.backends) == {"sim"}:
        common = dataclasses.replace(common, hardware=list(EXP5_GPUS))
    return job_from_grid_blocks("exp5", common, blocks)  # as a job file writes them: loads and SLOs checked there


@dataclass(frozen=True)
class ClosedLoopFlags:
    """exp5's closed loops: how many users (one cell each) and how many requests each user sends."""

    users: Annotated[
        list[int] | None, typer.Option("--users", help="closed-loop users: 1 4 16 64 (default); 0: no closed loop")
    ] = None
    requests_per_user: Annotated[int, typer.Option("--requests-per-user", help="requests per user (>= 3)")] = 8


@dataclass(frozen=True)
class OpenLoopFlags:
    """exp5's open loops: the arrival process, its rates (or a saturation search) and how many requests each
    sends."""

    open_load: Annotated[str, typer.Option("--open-load", help="poisson (default) | gamma | constant | none")] = (
        "poisson"
    )
    rates: Annotated[
        list[str] | None,
        typer.Option("--rates", "--rate", help="open-loop requests/s: auto (default: a saturation search) or 1 2 4 …"),
    ] = None
    requests: Annotated[
        int, typer.Option("--requests", help="requests per open-loop rate (a search probe sends at least this many)")
    ] = 100
    burstiness: Annotated[float, typer.Option("--burstiness", help="gamma loads: 1 = poisson, > 1 burstier")] = 1.0

    def rate_list(self) -> list[float] | str:
        """The rates as requests/s, or "auto" (a saturation search)."""
        values = [v.strip() for item in self.rates or ["auto"] for v in item.split(",") if v.strip()]
        if values == ["auto"]:
            return "auto"
        try:
            return [float(v) for v in values]
        except ValueError:
            raise KvrayInputError(f"--rates: expected requests/s or auto, got {' '.join(values)}") from None


def build(
    flags: Flags,
    backends: BackendsOpt = ["sim"],  # noqa: B006 - typer reads a list default, never mutates it
    closed_loop: ClosedLoopFlags = ClosedLoopFlags(),
    open_loop: OpenLoopFlags = OpenLoopFlags(),
    seed: SeedOpt = 0,
    slo: SloOpt = "ttft_ms=500,tpot_ms=50",
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    prompt_dist: PromptDistOpt = None,
    gen_dist: GenDistOpt = None,
    servers: ServerFlags = ServerFlags(),
) -> tuple[Job, list[str]]:
    """Exp5, serving load: closed-loop users and open-loop rates (auto: up to saturation) under SLOs — latency vs
    throughput, goodput, the knee (fig11, fig12). With only sim and no --hardware: H100-SXM, A100-80GB-SXM and L4."""
    from kvray.plan.loads import parse_dist, parse_slo

    common = server_common(flags, backends, servers, default_backends=("sim",))
    job = exp5_job(
        common,
        parse_dist(prompt_dist, "--prompt-dist") if prompt_dist else prompt_toks,
        parse_dist(gen_dist, "--gen-dist") if gen_dist else gen_toks,
        [u for u in closed_loop.users if u != 0] if closed_loop.users is not None else None,
        closed_loop.requests_per_user,
        None if open_loop.open_load == "none" else open_loop.open_load,
        open_loop.rate_list(),
        open_loop.requests,
        parse_slo(slo, "--slo"),
        seed,
        open_loop.burstiness,
    )
    return job, []


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """fig11 and fig12 when the folder holds serving rows (closed or open loops: exp5's, or ``bench --load``)."""
    from kvray.figures.serving import has_serving_data, serving_figures

    return serving_figures(dataset, out_dir) if has_serving_data(dataset.cells) else []


def knee_cell(searches: Any) -> str:
    """The highest knee of a configuration's searches; "≥ " before it when that search was client-bound (the rate
    above it was judged on a client that fell behind its schedule: the engine's knee is higher)."""
    from kvray.document.blocks import fmt_num

    if not len(searches):
        return fmt_num(None, 2)
    top = searches.loc[searches["knee_rps"].astype(float).idxmax()]
    flag = top.get("knee_client_bound")  # absent in rows written before the flag, None/NaN where not a search
    bound = flag is not None and flag == flag and bool(flag)
    return ("≥ " if bound else "") + fmt_num(top["knee_rps"], 2)


def section(exp: Experiment, page: Page) -> list[Block]:
    """Per configuration (backend · hardware · model · SLO) the highest goodput and the load it came at, the knee
    and saturation rate of any search, fig11/fig12, then exp5's cells; none without serving rows."""
    from kvray.analysis.views import as_number
    from kvray.document import Block
    from kvray.document.blocks import fmt_num
    from kvray.figures.serving import search_rows, serving_rows

    cells = page.dataset.view.cells
    rows = serving_rows(cells)
    if not len(rows):
        return []
    searches = search_rows(cells)
    keys = ["backend", "hardware", "model", "slo"]
    table = []
    for config, part in rows.groupby([rows[k].astype(object).fillna("—").astype(str) for k in keys], sort=True):
        good = part["goodput_rps"].astype(float)
        best = part.loc[good.idxmax()] if good.notna().any() and good.max() > 0 else None  # None: SLO never met
        mine = searches[(searches[keys[:3]].astype(str) == list(config[:3])).all(axis=1)] if len(searches) else searches
        at = (
            ("no SLO given" if config[3] == "—" else "SLO met at no load")
            if best is None
            else (
                f"{int(best['users'])} users"
                if best["load"] == "closed"
                else f"{float(best['offered_rps']):.3g} req/s {best['load']}"
            )
        )
        behind = int(part["client_behind"].fillna(False).astype(bool).sum()) if "client_behind" in part else 0
        table.append(
            [
                *config[:3],
                fmt_num((None if config[3] == "—" else 0.0) if best is None else best["goodput_rps"], 2),
                at,
                "—"
                if best is None or as_number(best["slo_attainment"]) is None
                else f"{float(best['slo_attainment']):.1%}",
                knee_cell(mine),
                fmt_num(mine["saturation_rps"].max() if len(mine) else None, 2),
                fmt_num(part["achieved_rps"].astype(float).max(), 2),
                config[3],
                str(len(part)),
                str(int(part["requests_steady"].sum())),
                str(behind),
            ]
        )
    blocks = [
        Block("h2", exp.title),
        Block(
            "table",
            headers=[
                "backend",
                "hardware",
                "model",
                "max goodput req/s",
                "at",
                "SLO met",
                "knee req/s",
                "saturation req/s",
                "max achieved req/s",
                "SLO",
                "rows",
                "steady requests",
                "client behind",
            ],
            rows=table,
        ),
        Block(
            "p",
            "Goodput: achieved requests/s × the fraction of steady-state requests meeting every SLO "
            "threshold (ramp-up and drain excluded; docs/metrics.md, Serving load). Knee: the highest "
            "offered rate a saturation search found sustainable; saturation: the highest achieved "
            "rate any of its probes measured. Rows whose client fell behind its schedule did not "
            "offer the rate they name.",
        ),
    ]
    blocks += figure_blocks(exp, page)
    return blocks + every_cell_blocks(exp, page)


EXPERIMENT = Experiment.of_module(
    globals(), "Serving — goodput under SLOs", figures=("fig11_latency_vs_throughput", "fig12_pareto")
)
