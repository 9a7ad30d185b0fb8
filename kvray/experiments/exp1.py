"""exp1 — concurrency sweep: N equal requests of ``--prompt-toks`` for each N in ``--concurrency``.

Memory (peak, KV measured and predicted) and throughput as concurrent requests grow: fig1, fig2; the findings
memory per extra request, the OOM boundary and the throughput plateau.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from kvray.experiments.base import Experiment, Flags
from kvray.experiments.options import BackendsOpt, GenOpt, PromptToksOpt
from kvray.experiments.sections import view_drawn

if TYPE_CHECKING:
    from kvray.analysis.findings import FindingRule
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job

ConcurrencyOpt = Annotated[
    list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 2 4 8 (default)")
]


def exp1_job(common: Common, prompt_toks: int = 512, gen_toks: int = 64, concurrency: list[int] | None = None) -> Job:
    from kvray.plan.experiments import experiment_job, positive
    from kvray.plan.job import Grid

    concurrency = sorted(set(concurrency or [1, 2, 4, 8]))
    positive("--concurrency", concurrency)
    positive("--prompt-toks", [prompt_toks])
    positive("--gen-toks", [gen_toks])
    grid = Grid(gen_toks=(gen_toks,), prompt_toks=(prompt_toks,), concurrency=tuple(concurrency))
    return experiment_job("exp1", common, [grid]).validate()


def build(
    flags: Flags,
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: ConcurrencyOpt = None,
    backend: BackendsOpt = None,
) -> tuple[Job, list[str]]:
    """Exp1, concurrency sweep: peak memory, KV and throughput as concurrent requests grow (fig1, fig2)."""
    return exp1_job(flags.common(backend), prompt_toks, gen_toks, concurrency), []


def findings() -> tuple[FindingRule, ...]:
    from kvray.analysis.evidence import throughput_plateaus
    from kvray.analysis.findings import FindingRule, memory_slopes, oom_rule

    return (
        FindingRule("memory_slope", "Memory per extra concurrent request", memory_slopes),
        oom_rule("exp1", "concurrency"),
        FindingRule("throughput_plateau", "Throughput plateau", throughput_plateaus),
    )


EXPERIMENT = Experiment.of_module(
    globals(), "Exp1 — concurrency sweep", **view_drawn("fig1_mem_vs_concurrency", "fig2_tps_vs_concurrency")
)
