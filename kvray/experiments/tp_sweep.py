"""The command of a tensor-parallel sweep (exp7, exp9): concurrency × the TP degrees the model allows on each GPU
type, sim by default. The two experiments sweep the same way and differ in their defaults, figures and sections,
so their ``build`` is made here, once, from those defaults (kvray/plan/experiments.py ``tp_sweep_job``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvray.experiments.options import BackendsOpt, ConcurrencyListOpt, GenOpt, PromptToksOpt

if TYPE_CHECKING:
    from kvray.experiments.base import Flags
    from kvray.plan.job import Job


def tp_sweep_build(
    experiment: str,
    summary: str,
    *,
    default_prompt_toks: int,
    default_gen_toks: int,
    default_concurrency: Sequence[int],
    default_tp: Sequence[int],
    sim_gpus: Sequence[str],
) -> Callable[..., tuple[Job, list[str]]]:
    """``build`` of a TP sweep: its flags (--backends, --prompt-toks, --gen-toks, -c) default to these values,
    ``summary`` is its command's help; TP degrees come from --tp (``default_tp`` when left at 1)."""

    def build(
        flags: Flags,
        backends: BackendsOpt = ["sim"],  # noqa: B006 - typer reads a list default, never mutates it
        prompt_toks: PromptToksOpt = default_prompt_toks,
        gen_toks: GenOpt = default_gen_toks,
        concurrency: ConcurrencyListOpt = list(default_concurrency),  # noqa: B006 - typer reads it, never mutates it
    ) -> tuple[Job, list[str]]:
        from kvray.plan.experiments import tp_sweep_job

        common = flags.common(backends, default_backends=("sim",))
        return tp_sweep_job(
            experiment, common, prompt_toks, gen_toks, concurrency, default_tp=default_tp, sim_gpus=sim_gpus
        )

    build.__doc__ = summary
    return build
