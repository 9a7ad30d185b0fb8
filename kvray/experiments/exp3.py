"""exp3 — mixed lengths: ``--n-short`` short requests alone, then the same short requests beside ``--n-long``
long ones in one batch; the short requests' TTFT/E2E show what the long ones cost them (fig5, the mixed-penalty
finding, and a table of the short requests alone vs mixed).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.errors import KvrayInputError
from kvray.experiments.base import Experiment, Flags, Page
from kvray.experiments.options import BackendsOpt, GenOpt
from kvray.experiments.sections import cells_blocks, figure_blocks, view_drawn

if TYPE_CHECKING:
    from kvray.analysis.findings import FindingRule
    from kvray.analysis.views import View
    from kvray.document import Block
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job


def exp3_job(
    common: Common, short: int = 128, long: int = 4096, gen_toks: int = 64, n_short: int = 3, n_long: int = 1
) -> tuple[Job, list[str]]:
    """Short requests alone (uniform) and the same short requests batched with long ones (mixed).

    A ``long`` the model cannot hold becomes the longest prompt it can (with a note): the seed's
    ``--long 4096`` on a 2048-position OPT still measures "long beside short". Beyond twice the model's
    positions it is a mistake (``--long 999999``), an error naming the largest possible prompt."""
    from kvray.plan.experiments import experiment_job, max_positions, positive
    from kvray.plan.job import Grid

    positive("--short", [short])
    positive("--long", [long])
    positive("--gen-toks", [gen_toks])
    positive("--n-short", [n_short])
    positive("--n-long", [n_long])
    limit = max_positions(common.model)
    notes = []
    longest = limit - gen_toks + 1
    if long > 2 * limit:  # not the seed's 4096 on a 2048-position model: a length no clamp should hide
        raise KvrayInputError(
            f"--long {long} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions "
            f"(largest possible prompt: {longest})"
        )
    if long + gen_toks - 1 > limit:
        notes.append(
            f"--long {long} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions: "
            f"using --long {longest}, the longest prompt it holds"
        )
        long = longest
    if short + gen_toks - 1 > limit:
        raise KvrayInputError(
            f"--short {short} + {gen_toks} generated tokens exceed {common.model}'s {limit} positions"
        )
    if long <= short:
        raise KvrayInputError(f"--long ({long}) must be longer than --short ({short})")
    grids = [
        Grid(gen_toks=(gen_toks,), prompt_toks=(short,), concurrency=(n_short,)),
        Grid(gen_toks=(gen_toks,), mixed=(tuple([short] * n_short + [long] * n_long),)),
    ]
    return experiment_job("exp3", common, grids).validate(), notes


def build(
    flags: Flags,
    short: Annotated[int, typer.Option("--short", help="prompt tokens of the short requests")] = 128,
    long: Annotated[int, typer.Option("--long", help="prompt tokens of the long request(s)")] = 4096,
    gen_toks: GenOpt = 64,
    n_short: Annotated[int, typer.Option("--n-short", help="short requests per batch")] = 3,
    n_long: Annotated[int, typer.Option("--n-long", help="long requests in the mixed batch")] = 1,
    backend: BackendsOpt = ["hf"],  # noqa: B006 - typer reads a list default, never mutates it
) -> tuple[Job, list[str]]:
    """Exp3, mixed lengths: short requests alone vs batched with long ones — the tail-latency penalty (fig5)."""
    return exp3_job(flags.common(backend), short, long, gen_toks, n_short, n_long)


def _mixed_stat(p: Any, stat: str) -> tuple[str, str]:
    """(label, statistic) of a mixed-table row: "TTFT p99", or "TTFT max of 6 (too few for p99)" and the
    maximum where the short requests cannot hold that percentile (kvray.measure.metrics.min_samples)."""
    from kvray.measure.metrics import min_samples

    metric, pct = stat.rsplit("_p", 1)
    n = min(int(p.alone.get("requests", 0)), int(p.mixed.get("requests", 0)))
    name = metric.removesuffix("_s").upper()
    if n >= min_samples(float(pct)):
        return f"{name} p{pct}", stat
    return f"{name} max of {n} (too few for p{pct})", f"{metric}_max"


def mixed_table(view: View) -> Block | None:
    """Per mixed batch and statistic: the short requests alone, batched with long ones, and the ratio."""
    from kvray.analysis.views import MIXED_STATS, mixed_pairs
    from kvray.document import Block
    from kvray.document.blocks import fmt_ms

    pairs = mixed_pairs(view)
    if not pairs:
        return None
    rows = []
    for p in pairs:
        for label, stat in (_mixed_stat(p, s) for s in MIXED_STATS):
            ratio = p.ratio(stat)
            rows.append(
                [
                    p.series,
                    f"{p.n_short} × {p.short_toks} + {p.n_long} × {p.long_toks}",
                    label,
                    fmt_ms(p.alone.get(stat, math.nan)),
                    fmt_ms(p.mixed.get(stat, math.nan)),
                    f"×{ratio:.2f}" if ratio == ratio else "—",
                    f"{int(p.alone.get('requests', 0))} / {int(p.mixed.get('requests', 0))}",
                ]
            )
    return Block(
        "table",
        headers=["series", "mixed batch", "short requests'", "alone ms", "mixed ms", "ratio", "n alone / mixed"],
        rows=rows,
    )


def section(exp: Experiment, page: Page) -> list[Block]:
    """The default section, with the short requests alone vs mixed between the cells and the figure."""
    from kvray.analysis.views import experiment_rows
    from kvray.document import Block

    blocks = cells_blocks(exp, page)
    view = page.dataset.view
    if len(experiment_rows(view, exp.name)) and (table := mixed_table(view)) is not None:
        blocks += [Block("h3", "Short requests: alone vs batched with long ones"), table]
    return blocks + figure_blocks(exp, page)


def findings() -> tuple[FindingRule, ...]:
    from kvray.analysis.evidence import mixed_penalties
    from kvray.analysis.findings import FindingRule

    return (FindingRule("mixed_penalty", "Tail-latency penalty of short requests in mixed batches", mixed_penalties),)


EXPERIMENT = Experiment.of_module(
    globals(), "Exp3 — mixed lengths (tail latency)", **view_drawn("fig5_mixed_lengths_latency")
)
