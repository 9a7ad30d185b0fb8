"""Run a job somewhere and bring its dataset home: the one path under ``kvray run``, ``kvray launch`` and the
exp commands, chosen by where the user pointed it.

``--address local|auto|ray://…|inprocess`` runs the sweep from this process (``run_job``);
``--address http://HOST:8265`` or ``--cluster FILE.yaml`` ships the job as a file through the Ray Jobs API
(``launch``) and brings the dataset back. Either way the dataset ends in one local folder (or the object
storage the remote job wrote to), so what comes after (counts, figures, report) does not care where the cells
ran. Both ways return a RunRecord.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvray.data.location import is_uri
from kvray.data.manifest import last_run
from kvray.data.status import default_output_dir
from kvray.errors import KvrayInputError
from kvray.launch.remote import RAY_CLIENT_PORT

if TYPE_CHECKING:
    from kvray.plan.job import Job
    from kvray.sweep.driver import RunRecord

# What --address takes, the same for run and the exp commands (launch: only the last).
ADDRESS_FORMS = "local | auto | ray://HOST:PORT | inprocess | http(s)://HOST:8265"


def is_dashboard_url(address: str | None) -> bool:
    """An address that means the Ray Jobs API of a remote cluster (its dashboard), not a Ray to join."""
    return bool(address) and str(address).startswith(("http://", "https://"))


@dataclass(frozen=True)
class RunSettings:
    """Where and how a job runs, apart from the job itself: the run flags of ``run``, ``launch`` and the exp
    commands."""

    output_dir: str | Path | None = None  # None: results/<job name>; a URI only for a remote job (launch)
    address: str = "local"  # ADDRESS_FORMS
    cluster: str | None = None  # a Ray cluster-launcher file: brought up, the job submitted there
    check_oom: bool = True  # refuse cells predicted not to fit
    progress: bool = True  # the live progress table (local runs only)
    sync_to: str | None = None  # the object-storage URI ``output_dir`` stages for (kvray.data.location)
    resume: bool = True  # local: skip cells already in the folder; False refuses a folder holding them
    dashboard: bool = False  # local: start Ray's dashboard on 127.0.0.1
    # remote (Jobs API) only:
    down: bool = False  # tear the --cluster down afterwards
    timeout_s: float = 3600.0  # give up on the job (and stop it) after this long
    provision: bool = True  # add kvray's missing dependencies to the job's environment
    ray_client_port: int = RAY_CLIENT_PORT  # the head's Ray Client port, which brings the dataset home
    shared_output: bool = False  # output_dir is on a filesystem the cluster shares: the job writes there

    @property
    def remote(self) -> bool:
        """True when the job goes through the Jobs API: a cluster file or a dashboard URL."""
        return bool(self.cluster) or is_dashboard_url(self.address)


def submit_job(
    job: Job,
    settings: RunSettings,
    *,
    job_file: str | Path | None = None,
    log: Callable[[str], object] = sys.stdout.write,
    notice: Callable[[str], object] | None = None,
) -> RunRecord:
    """Run ``job`` here (on Ray, or in this process) or remotely through the Jobs API, as ``settings`` say; the
    dataset ends in ``settings.output_dir`` (default ``results/<job name>``) either way. ``job_file``: the file
    the job was read from, shipped as it is to a remote cluster (else the job is written out as one). ``log``
    receives the remote job's log text as it arrives; ``notice`` a local run's one-line notes."""
    from kvray.sweep.driver import RunRecord, run_job

    if not settings.remote:
        if is_uri(settings.output_dir):
            raise KvrayInputError(
                f"{settings.output_dir}: a run here writes a local folder (stage a URI with "
                "kvray.data.location.output_folder and pass it as sync_to)"
            )
        return run_job(
            job,
            settings.output_dir,
            address=settings.address,
            resume=settings.resume,
            check_oom=settings.check_oom,
            progress=settings.progress,
            dashboard=settings.dashboard,
            notice=notice,
            sync_to=settings.sync_to,
        )
    import tempfile

    from kvray.launch.jobs_api import launch

    out = str(settings.output_dir or default_output_dir(job))
    extra = [] if settings.check_oom else ["--no-check-oom"]  # launch adds --no-plots itself
    address = None if settings.cluster else settings.address
    with tempfile.TemporaryDirectory(prefix="kvray-job-") as tmp:
        if job_file is None:
            from kvray.plan.experiments import write_job_file

            job_file = write_job_file(job, tmp)
        status, files = launch(
            str(job_file),
            out,
            address=address,
            cluster=settings.cluster,
            down=settings.down,
            extra_args=extra,
            timeout_s=settings.timeout_s,
            log=log,
            provision=settings.provision,
            ray_client_port=settings.ray_client_port,
            shared_output=settings.shared_output,
        )
    if is_uri(out):
        return RunRecord(out, {}, remote_status=status, files=tuple(files))
    return RunRecord(Path(out), last_run(out), remote_status=status, files=tuple(files))
