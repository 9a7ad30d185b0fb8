"""Run a job here or on a remote cluster, chosen by where the user pointed it: one call for the exp commands.

``kvray exp1 … --address local|auto|ray://…`` runs the sweep from this process (``run_job``);
``--address http://HOST:8265`` or ``--cluster FILE.yaml`` ships the job as a file through the Ray Jobs API
(``launch``) and brings the dataset back. Either way the dataset ends in one local folder, so what comes
after (counts, figures, report) does not care where the cells ran.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvray.plan.job import Job


@dataclass(frozen=True)
class RunSettings:
    """Where and how a job runs, apart from the job itself (the exp commands' run flags)."""

    output_dir: str | Path | None = None  # None: results/<job name>
    address: str = "local"  # local | auto | ray://host:port | http(s)://HOST:8265 (Jobs API)
    cluster: str | None = None  # a Ray cluster-launcher file: brought up, the job submitted there
    check_oom: bool = True  # refuse cells predicted not to fit
    progress: bool = True  # the live progress table (local runs only)
    sync_to: str | None = None  # the object-storage URI ``output_dir`` stages for (kvray.data.location)

    @property
    def remote(self) -> bool:
        """True when the job goes through the Jobs API: a cluster file or a dashboard URL."""
        return bool(self.cluster) or self.address.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Submitted:
    """Where the dataset is now, and the Jobs API's final status when the job ran remotely."""

    output_dir: Path
    remote_status: str | None = None


def submit_job(job: Job, settings: RunSettings, log: Callable[[str], object] = sys.stdout.write) -> Submitted:
    """Run ``job`` locally on Ray or remotely through the Jobs API, as ``settings`` say; the dataset ends in
    ``settings.output_dir`` (default ``results/<job name>``) either way. ``log`` receives the remote job's
    log text as it arrives."""
    from kvray.sweep import default_output_dir, run_job

    out = Path(settings.output_dir) if settings.output_dir else None
    if not settings.remote:
        done = run_job(job, out, address=settings.address, check_oom=settings.check_oom, progress=settings.progress,
                       sync_to=settings.sync_to)  # fmt: skip
        return Submitted(Path(done))
    import tempfile

    from kvray.plan.experiments import write_job_file
    from kvray.sweep.launch import launch

    out = out or default_output_dir(job)
    extra = [] if settings.check_oom else ["--no-check-oom"]  # launch adds --no-plots itself
    address = None if settings.cluster else settings.address
    with tempfile.TemporaryDirectory(prefix="kvray-exp-") as tmp:
        job_file = str(write_job_file(job, tmp))
        status, _ = launch(job_file, str(out), address=address, cluster=settings.cluster, extra_args=extra, log=log)
    return Submitted(out, status)
