"""exp7 — tensor-parallel scaling: the same workload at TP 1, 2, 4, 8 on each GPU type.

What it answers: how TTFT and TPOT fall with the TP degree, how throughput per GPU falls with it, how many KV
tokens each GPU holds (KV heads split, replicated past the KV-head count, MLA's latent whole), and where TP stops
paying (kvray/figures/parallelism.py: one figure per model). On the sim backend it runs in seconds and needs no
GPU; on vllm it measures, each TP=N cell on a worker holding N GPUs of one node (kvray/sweep/placement.py).
Degrees the model's heads do not allow (vLLM refuses them) are dropped with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvray.experiments.base import Experiment
from kvray.experiments.tp_sweep import tp_sweep_build

if TYPE_CHECKING:
    from kvray.analysis.dataset import Dataset
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job

EXP7_TP = (1, 2, 4, 8)
EXP7_GPUS = ("H100-SXM", "A100-80GB-SXM")  # sim's default hardware for exp7: NVLink 4 vs NVLink 3


EXP7_SUMMARY = (
    "Exp7, tensor parallelism: TTFT, TPOT, throughput per GPU and KV per GPU at --tp 1 2 4 8 (default), measured "
    "vs predicted, and where TP stops paying. With only sim and no --hardware: H100-SXM and A100-80GB-SXM."
)
build = tp_sweep_build(
    "exp7",
    EXP7_SUMMARY,
    default_prompt_toks=1024,
    default_gen_toks=128,
    default_concurrency=(1, 8, 32),
    default_tp=EXP7_TP,
    sim_gpus=EXP7_GPUS,
)


def exp7_job(common: Common, concurrency: list[int] | None = None) -> tuple[Job, list[str]]:
    """(the Job, notes) of ``kvray exp7`` at its defaults (1024-token prompts, 128 generated) for ``common``:
    ``common.tensor_parallel`` degrees (TP 1/2/4/8 when left at [1]) × ``concurrency`` (1 8 32) on each GPU type;
    the sim backend alone defaults to H100-SXM and A100-80GB-SXM, paged layout (vLLM's continuous batching)."""
    from kvray.plan.experiments import tp_sweep_job

    concurrency = concurrency or [1, 8, 32]
    return tp_sweep_job("exp7", common, 1024, 128, concurrency, default_tp=EXP7_TP, sim_gpus=EXP7_GPUS)


def draw(dataset: Dataset, out_dir: Path) -> list[Any]:
    """One TP-scaling figure per model when the folder holds exp7 or TP > 1 cells, else none."""
    from kvray.figures.parallelism import has_tp_data, tp_figures

    return tp_figures(dataset, out_dir) if has_tp_data(dataset.records) else []


# one figure per model, named after it
EXPERIMENT = Experiment.of_module(globals(), "Exp7 — tensor-parallel scaling", figures=("exp7_tp_scaling_*",))
