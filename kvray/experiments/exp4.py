"""exp4 — static vs paged KV, in-process vs server: exp1's workload on each of ``--backends`` (default hf,
hf-paged, vllm; or openai / ollama servers). fig8 compares memory, throughput, tail latency and KV reserved vs
used per backend; fig9 draws the KV timeline of each backend that records one (kvray/figures/server.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.experiments.base import Experiment, Flags
from kvray.experiments.options import (
    BackendsOpt,
    ConcurrencyListOpt,
    GenOpt,
    PromptToksOpt,
    ServerFlags,
    server_common,
)

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job


def exp4_job(common: Common, prompt_toks: int = 512, gen_toks: int = 64, concurrency: list[int] | None = None) -> Job:
    from kvray.plan.experiments import uniform_job

    return uniform_job("exp4", common, prompt_toks, gen_toks, concurrency or [1, 4, 16, 64])


def build(
    flags: Flags,
    backends: BackendsOpt = ["hf", "hf-paged", "vllm"],  # noqa: B006 - typer reads a list default, never mutates it
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: ConcurrencyListOpt = [1, 4, 16, 64],  # noqa: B006 - typer reads a list default, never mutates it
    servers: ServerFlags = ServerFlags(),
) -> tuple[Job, list[str]]:
    """Exp4, static vs paged KV: the same workload on hf, hf-paged and vLLM (or servers) — fig8, fig9."""
    common = server_common(flags, backends, servers, default_backends=("hf", "hf-paged", "vllm"))
    return exp4_job(common, prompt_toks, gen_toks, concurrency), []


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """fig8 and fig9 when the folder holds exp4 cells or KV timelines: unlike fig1–fig7 they concern only paged
    engines and servers, so a folder without them gets no "missing data" figures."""
    from kvray.figures.server import has_server_data, server_figures

    return server_figures(dataset, out_dir) if has_server_data(dataset.records) else []


EXPERIMENT = Experiment.of_module(
    globals(),
    "Exp4 — static vs paged KV, in-process vs server",
    figures=("fig8_backend_compare", "fig9_kv_timeline"),
    table_sort=("backend", "concurrency", "prompt_toks"),
)
