"""exp2 — sequence-length sweep: ``--concurrency`` requests of each prompt length in ``--seqlens``.

Latency (its log-log exponent) and memory as prompts grow: fig3, fig4; the findings latency exponent and OOM
boundary. A prompt length the model cannot hold (prompt + generated tokens beyond its positions) is dropped
with a note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from kvray.errors import KvrayInputError
from kvray.experiments.base import Experiment, Flags
from kvray.experiments.options import BackendsOpt, GenOpt
from kvray.experiments.sections import view_drawn

if TYPE_CHECKING:
    from kvray.analysis.findings import FindingRule
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job

SeqlensOpt = Annotated[
    list[int] | None, typer.Option("--seqlens", help="prompt lengths: 128 512 1024 2048 4096 (default)")
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", "-c", help="requests per cell")]


def exp2_job(
    common: Common, seqlens: list[int] | None = None, gen_toks: int = 64, concurrency: int = 1
) -> tuple[Job, list[str]]:
    """The job and notes (prompt lengths dropped because the model cannot hold them)."""
    from kvray.plan.experiments import experiment_job, max_positions, positive
    from kvray.plan.job import Grid

    seqlens = sorted(set(seqlens or [128, 512, 1024, 2048, 4096]))
    positive("--seqlens", seqlens)
    positive("--gen-toks", [gen_toks])
    positive("--concurrency", [concurrency])
    limit = max_positions(common.model)
    fits = [s for s in seqlens if s + gen_toks - 1 <= limit]
    notes = []
    dropped = [s for s in seqlens if s not in fits]
    if dropped:
        notes.append(
            f"dropped --seqlens {' '.join(map(str, dropped))}: prompt + {gen_toks} generated tokens exceed "
            f"{common.model}'s {limit} positions"
        )
    if not fits:
        raise KvrayInputError(
            f"no --seqlens value fits {common.model}'s {limit} positions with {gen_toks} "
            f"generated tokens (largest possible prompt: {limit - gen_toks + 1})"
        )
    grid = Grid(gen_toks=(gen_toks,), prompt_toks=tuple(fits), concurrency=(concurrency,))
    return experiment_job("exp2", common, [grid]).validate(), notes


def build(
    flags: Flags,
    seqlens: SeqlensOpt = None,
    gen_toks: GenOpt = 64,
    concurrency: ConcurrencyOpt = 1,
    backend: BackendsOpt = ["hf"],  # noqa: B006 - typer reads a list default, never mutates it
) -> tuple[Job, list[str]]:
    """Exp2, sequence-length sweep: latency (log-log exponent) and memory as prompts grow (fig3, fig4)."""
    return exp2_job(flags.common(backend), seqlens, gen_toks, concurrency)


def findings() -> tuple[FindingRule, ...]:
    from kvray.analysis.evidence import latency_exponents
    from kvray.analysis.findings import FindingRule, oom_rule

    return (
        oom_rule("exp2", "prompt length"),
        FindingRule("latency_exponent", "Latency vs sequence length (log-log fit)", latency_exponents),
    )


EXPERIMENT = Experiment.of_module(
    globals(),
    "Exp2 — sequence-length sweep",
    **view_drawn("fig3_latency_vs_seqlen", "fig4_mem_vs_seqlen"),
    table_sort=("prompt_toks", "concurrency"),
)
