"""The pipeline's stages, lowest first: a module may import its own stage or an earlier one, never a later one.

Data flows up this list at run time (a job is planned, cells are measured by backends, rows land in the
dataset, the sweep drives it on Ray, analysis and figures read the dataset, the CLI sits on top); imports
point the other way, down. ``tests/test_layering.py`` reads every ``import`` in kvray/ (lazy ones
included) and fails on a cycle or on an import of a later stage. Written once, here, so the test and a
reader agree.
"""

from __future__ import annotations

# Each stage is a top-level module or subpackage of kvray; ``kvray`` itself (the package __init__, which
# re-exports the Python API lazily) and this file are outside the order.
STAGES: tuple[tuple[str, str], ...] = (
    ("errors", "one-line input errors"),
    ("units", "byte and text formatting shared by every stage"),
    ("hardware", "the GPU table and this machine's environment"),
    ("model", "geometry from config.json, KV arithmetic, OOM risk"),
    ("traces", "request traces read, cut and described: their KV footprint predicted from the trace alone"),
    ("sim", "the roofline predictor"),
    ("spec", "what one measurement is: RequestSpec, Workload, Cell"),
    ("measure", "what a measurement records, metrics, memory trackers, samplers"),
    ("data", "the dataset on disk"),
    ("servers", "server processes, /metrics, servable model dirs"),
    ("backends", "the backend contract and one module per backend"),
    ("plan", "job files, experiments and the planner: a Job's cells"),
    ("runner", "one cell in this process: run_cell, the saturation search, the cell's telemetry, routed replicas"),
    ("bench", "`kvray bench`'s cell: built from flags, checked whole, measured through the runner"),
    ("sweep", "Ray: scheduler, worker pool, driver, collector"),
    ("launch", "a job run elsewhere: Jobs API, cluster launcher, preflight, the dataset brought home"),
    ("analysis", "the Dataset (a results folder read once), views, findings, calibration"),
    ("capacity", "the capacity planner: cheapest GPU × TP × replicas × KV choices within SLOs, prices, Pareto"),
    ("figures", "every figure, from a Dataset or its View"),
    ("document", "the report's blocks and their Markdown / HTML renderers (report, sections, compare)"),
    # after figures so a section can draw its experiment's, before the report so it composes from the registry
    ("experiments", "one module per experiment (job from flags, options, figures, section, findings); registry"),
    ("report", "report.md and report.html: composes the registry's sections, draws through the figures"),
    ("cli", "the Typer command line"),
)

STAGE_NAMES: tuple[str, ...] = tuple(name for name, _ in STAGES)
UNSTAGED = ("kvray", "kvray.layers")


def stage_of(module: str) -> int | None:
    """Index of ``module``'s stage (``kvray.sweep.driver`` → the index of ``sweep``), None when unstaged."""
    if module in UNSTAGED or not module.startswith("kvray."):
        return None
    top = module.split(".")[1]
    return STAGE_NAMES.index(top) if top in STAGE_NAMES else None
