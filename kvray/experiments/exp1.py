"""exp1 — concurrency sweep: N equal requests of ``--prompt-toks`` for each N in ``--concurrency``.

Memory (peak, KV measured and predicted) and throughput as concurrent requests grow: fig1, fig2; the findings
memory per extra request, the OOM boundary and the throughput plateau.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvray.experiments.base import Experiment, Flags
from kvray.experiments.options import BackendsOpt, ConcurrencyListOpt, GenOpt, PromptToksOpt
from kvray.experiments.sections import view_drawn

if TYPE_CHECKING:
    from kvray.analysis.findings import FindingRule
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job


def exp1_job(common: Common, prompt_toks: int = 512, gen_toks: int = 64, concurrency: list[int] | None = None) -> Job:
    from kvray.plan.experiments import uniform_job

    return uniform_job("exp1", common, prompt_toks, gen_toks, concurrency or [1, 2, 4, 8])


def build(
    flags: Flags,
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: ConcurrencyListOpt = [1, 2, 4, 8],  # noqa: B006 - typer reads a list default, never mutates it
    backend: BackendsOpt = ["hf"],  # noqa: B006 - typer reads a list default, never mutates it
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
