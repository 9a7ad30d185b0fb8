"""Before `kvray launch` submits a job: what the cluster's Python and GPUs are, against what the job needs.

A team cluster usually has Ray and torch and lacks some of kvray's lighter dependencies (typer, rich, pyarrow);
submitted blind, the job dies on its first import and the user learns nothing about what to install. So the
launcher first runs a probe (a tiny Ray job, in the cluster's own Python, with none of kvray's environment)
that reports its Python version, the version of each of kvray's dependencies, and its GPUs by accelerator
type. Then, before anything is submitted:

  * a Python older than kvray supports, or a missing heavy dependency (torch, transformers: their builds must
    match the cluster's CUDA, so kvray never installs them into a job) — one line, exit 2;
  * missing or too-old light dependencies — added to the job's runtime environment (``pip``), pinned to the
    versions this machine runs; ``--no-provision`` makes that one line naming them and how to install them;
  * a GPU type the job asks for and the cluster lacks, or a TP degree no node holds — refused, as a local
    run refuses it (kvray/sweep/placement.py).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.env import library_versions
from kvray.plan.job import Job
from kvray.sweep.placement import check_hardware
from kvray.sweep.ray_env import Cluster

# kvray's dependencies (pyproject.toml) as distribution names, and those a job may never install itself.
DEPENDENCIES = ("typer", "rich", "pyyaml", "numpy", "pandas", "pyarrow", "matplotlib", "psutil", "nvidia-ml-py",
                "httpx", "tokenizers", "torch", "transformers", "ray")  # fmt: skip
HEAVY = ("torch", "transformers", "ray")
MIN_PYTHON = (3, 11)
MARK = "KVRAY-PREFLIGHT "

PROBE = """
import importlib.metadata as md, json, sys
out = {"python": list(sys.version_info[:3]), "packages": {}}
for dist in DISTS:
    try:
        out["packages"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["packages"][dist] = None
try:
    import ray
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            types = [k.split(":", 1)[1] for k in r if k.startswith("accelerator_type:")]
            nodes.append([n.get("NodeManagerAddress", "?"), types[0] if types else None, r.get("GPU", 0.0),
                          r.get("CPU", 0.0)])
    out["nodes"] = nodes
except Exception as exc:
    out["ray_error"] = repr(exc)[:300]
print("MARK" + json.dumps(out), flush=True)
"""


@dataclass
class ClusterReport:
    """What the probe found on the cluster."""

    python: tuple[int, ...]
    packages: dict[str, str | None]
    nodes: list[tuple[str, str | None, float, float]] = field(default_factory=list)  # address, type, GPUs, CPUs
    ray_error: str | None = None

    @classmethod
    def from_logs(cls, logs: str) -> ClusterReport:
        line = next((ln for ln in reversed(logs.splitlines()) if ln.startswith(MARK)), None)
        if line is None:
            tail = " | ".join(logs.strip().splitlines()[-3:]) or "no output"
            raise KvrayInputError(f"the cluster's preflight probe printed no report ({tail[:300]})")
        raw = json.loads(line[len(MARK) :])
        nodes = [(str(a), t, float(g), float(c)) for a, t, g, c in raw.get("nodes", [])]
        return cls(tuple(raw["python"]), raw["packages"], nodes, raw.get("ray_error"))

    def cluster(self) -> Cluster:
        """The cluster's resources as the planner and placement checks take them."""
        by_type: dict[str, float] = {}
        for _, gpu_type, gpus, _ in self.nodes:
            if gpu_type:
                by_type[gpu_type] = by_type.get(gpu_type, 0.0) + gpus
        return Cluster(
            cpus=sum(n[3] for n in self.nodes),
            gpus=sum(n[2] for n in self.nodes),
            gpus_by_type=by_type,
            nodes=tuple((f"{a}", t, g) for a, t, g, _ in self.nodes if g > 0),
        )

    def describe(self) -> str:
        gpus = ", ".join(f"{n:g}× {t}" for t, n in sorted(self.cluster().gpus_by_type.items())) or (
            f"{self.cluster().gpus:g} GPUs of no declared type" if self.cluster().gpus else "no GPUs"
        )
        return f"Python {'.'.join(map(str, self.python))}, {len(self.nodes)} node(s), {gpus}"


def local_versions() -> dict[str, str | None]:
    """This machine's version of each dependency (what a provisioned job is pinned to)."""
    return library_versions(DEPENDENCIES)


def minimums() -> dict[str, Any]:
    """kvray's declared requirement per dependency (``packaging`` SpecifierSets), from its own metadata."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    specs: dict[str, Any] = {}
    try:
        for text in md.requires("kvray") or []:
            req = Requirement(text)
            if not req.marker:
                specs[req.name.lower()] = req.specifier
    except md.PackageNotFoundError:
        pass
    return specs


def unmet(report: ClusterReport) -> dict[str, str | None]:
    """Dependencies the cluster lacks or has in a version kvray does not accept: name → its version (None)."""
    specs = minimums()
    bad: dict[str, str | None] = {}
    for dist in DEPENDENCIES:
        version = report.packages.get(dist)
        spec = specs.get(dist)
        if version is None or (spec is not None and not spec.contains(version, prereleases=True)):
            bad[dist] = version
    return bad


def pip_packages(report: ClusterReport, job: Job, provision: bool) -> list[str]:
    """The pip packages the job's runtime environment must add (empty: none), or KvrayInputError (one line)
    when the cluster cannot run the job: an old Python, a missing heavy dependency, a GPU type it lacks."""
    if report.python[:2] < MIN_PYTHON:
        raise KvrayInputError(
            f"the cluster runs Python {'.'.join(map(str, report.python))}; kvray needs "
            f"{'.'.join(map(str, MIN_PYTHON))} or newer there"
        )
    if report.ray_error:
        raise KvrayInputError(f"the cluster's probe could not join its Ray: {report.ray_error}")
    from kvray.plan.planner import plan_cells

    cluster = report.cluster()
    check_hardware(plan_cells(job, sorted(cluster.gpus_by_type)), cluster)
    bad = unmet(report)
    heavy = [d for d in HEAVY if d in bad]
    if heavy:
        have = ", ".join(f"{d} {bad[d] or 'missing'}" for d in heavy)
        raise KvrayInputError(
            f"the cluster's Python lacks what kvray cannot install for it ({have}): install a build that matches "
            "the cluster's CUDA there (pip install torch transformers), then launch again"
        )
    mine = local_versions()
    pins = [f"{d}=={mine[d]}" if mine.get(d) else d for d in bad]
    if pins and not provision:
        have = ", ".join(f"{d} {bad[d] or 'missing'}" for d in bad)
        raise KvrayInputError(
            f"the cluster's Python lacks kvray's dependencies ({have}): install them there (pip install "
            f"{' '.join(pins)}) or launch without --no-provision to add them to the job's environment"
        )
    return pins


def probe(client: Any, timeout_s: float = 180.0) -> ClusterReport:
    """Run the probe as a Ray job in the cluster's own Python and read its report."""
    from ray.job_submission import JobStatus

    script = PROBE.replace("DISTS", repr(DEPENDENCIES)).replace("MARK", MARK)
    job_id = submit_when_agent_ready(
        client,
        entrypoint=f"python -c {shlex.quote(script)}",
        runtime_env={"env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}},
        metadata={"kvray_preflight": "1"},
    )
    deadline = time.monotonic() + timeout_s
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise KvrayInputError(f"the cluster's preflight probe did not finish within {timeout_s:.0f} s")
        time.sleep(0.5)
    return ClusterReport.from_logs(client.get_job_logs(job_id))


def submit_when_agent_ready(client: Any, wait_s: float = 90.0, **kwargs: Any) -> str:
    """Submit, retrying while the head's job agent is still starting.

    A freshly started (or busy) head answers 500 "No available agent to submit job" until its
    dashboard agent registers; Ray itself says "please try again later", so we do, for a while.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return str(client.submit_job(**kwargs))
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)
