"""Commands that run sweeps on Ray: ``run`` (a job file), one command per registered experiment (``exp1`` …,
kvray/experiments/: a job built from its flags) and ``launch`` (a job on a remote cluster). Each ends with
figures and the report unless ``--no-plots``."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvray.cli import render
from kvray.cli.options import (
    AddressOpt,
    ClusterOpt,
    ExperimentFlags,
    JobOutputOpt,
    NoPlotsOpt,
    experiment_command,
    flag_groups,
)
from kvray.errors import KvrayInputError
from kvray.experiments import experiments

if TYPE_CHECKING:
    from kvray.experiments import Experiment
    from kvray.launch.submit import RunSettings
    from kvray.plan.job import Job


def make_all_after_run(output_dir: str | Path, shown: str | None = None) -> None:
    """Figures and report at the end of a run; a failure here never loses the run's data. ``shown``: the
    folder as the user named it (an object-storage URI whose staging folder ``output_dir`` is)."""
    where = shown or str(output_dir)
    try:
        from kvray.report import make_all

        paths = make_all(output_dir)
    except Exception as exc:  # the dataset is written: say what failed and how to retry
        render.warning(f"figures/report failed ({type(exc).__name__}: {exc}); retry with `kvray report {where}`")
        return
    render.findings(paths.findings)
    if shown:
        render.line(
            f"figures in {shown}/figures; report {shown}/{paths.markdown.name} and {paths.html.name}", soft_wrap=True
        )
        return
    render.line(
        f"figures in {paths.markdown.parent / 'figures'}; report {paths.markdown} and {paths.html}", soft_wrap=True
    )


def run(
    job_file: Annotated[str, typer.Argument(help="job file, e.g. jobs/quickstart.yaml")],
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    output: JobOutputOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume", help="skip cells already in the folder (default); --no-resume refuses it"),
    ] = True,
    dashboard: Annotated[bool, typer.Option("--dashboard", help="start Ray's dashboard on 127.0.0.1")] = False,
    check_oom: Annotated[
        bool, typer.Option("--check-oom/--no-check-oom", help="refuse cells predicted not to fit (default)")
    ] = True,
    no_plots: NoPlotsOpt = False,
) -> int:
    """Run JOB_FILE's sweep on Ray: a worker per GPU (or CPU) holding its model, rows streaming into one dataset."""
    from dataclasses import replace

    from kvray.data.location import is_uri, output_folder
    from kvray.data.status import default_output_dir
    from kvray.launch.submit import RunSettings
    from kvray.plan.job import load_job

    job = load_job(job_file)  # a bad file is one line, before Ray starts
    settings = RunSettings(address=address, cluster=cluster, check_oom=check_oom, resume=resume, dashboard=dashboard)
    if settings.remote and dashboard:
        raise KvrayInputError("--dashboard starts Ray's dashboard here; a remote cluster's is its http://HOST:8265")
    remote = output if is_uri(output) else None
    # An object-storage --output is staged here: downloaded first (a bad URI or bucket is one line, before
    # Ray), uploaded by the collector as parts are flushed and by this block's end, Ctrl-C included.
    with output_folder(output or default_output_dir(job)) as where:
        settings = replace(settings, output_dir=where, sync_to=remote)
        return _run_into(job, job_file, settings, remote or str(where), no_plots)


def _run_into(job: Job, job_file: str, settings: RunSettings, shown: str, no_plots: bool) -> int:
    """The job through kvray/launch/submit.py (here or on a remote cluster), then its counts, figures, report."""
    from kvray.data.reader import read_results
    from kvray.launch.remote import RemoteJobError
    from kvray.launch.submit import submit_job
    from kvray.sweep import SweepError, status_counts

    try:
        record = submit_job(job, settings, job_file=job_file, log=sys.stdout.write, notice=render.note)
    except SweepError as exc:
        sys.stderr.write(f"kvray: sweep stopped: {exc}\n")
        return 1
    except RemoteJobError as exc:  # its status, exit code and last log lines, never a local traceback
        sys.stderr.write(f"kvray: {exc}\n")
        return 1
    except KeyboardInterrupt:
        assert settings.output_dir is not None
        rows = len(read_results(settings.output_dir, traces=False))
        sys.stderr.write(
            f"kvray: interrupted: {rows} rows kept in {shown}; resume with: kvray run {job_file} --output {shown}\n"
        )
        return 130
    if record.remote_status is not None:
        render.line(f"remote job {record.remote_status}: {len(record.files)} files → {shown}")
    counts = status_counts(record.output_dir, job)
    failed = [r for r in read_results(record.output_dir, traces=False) if r["status"] in ("error", "oom")][:5]
    render.run_summary(job.name, counts, record.run, shown, failed)
    if not no_plots:
        make_all_after_run(record.output_dir, shown=settings.sync_to)
    return 1 if counts.get("error") else 0


@dataclass(frozen=True)
class KubeRayFlags:
    """``launch --kuberay --emit FILE``: a KubeRay RayJob manifest written instead of a run, and where it runs."""

    kuberay: Annotated[
        bool, typer.Option("--kuberay", help="write a KubeRay RayJob manifest (--emit FILE) instead of running")
    ] = False
    namespace: Annotated[str, typer.Option("--namespace", help="--kuberay: the Kubernetes namespace")] = "default"
    image: Annotated[str | None, typer.Option("--image", help="--kuberay: the Ray image with kvray installed")] = None
    emit_to: Annotated[
        str | None, typer.Option("--emit", help="--kuberay: the manifest file to write (- for stdout)")
    ] = None


@flag_groups
def launch(
    job: Annotated[str, typer.Option("--job", help="job file to run on the cluster")],
    cluster: ClusterOpt = None,
    address: Annotated[
        str | None, typer.Option("--address", help="dashboard URL of an existing cluster, http://HOST:8265")
    ] = None,
    output: JobOutputOpt = None,
    down: Annotated[bool, typer.Option("--down", help="tear the --cluster down afterwards")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="give up (and stop the job) after this long")
    ] = 3600.0,
    no_plots: NoPlotsOpt = False,
    no_provision: Annotated[
        bool,
        typer.Option("--no-provision", help="don't add kvray's missing dependencies to the job; say what to install"),
    ] = False,
    ray_client_port: Annotated[
        int, typer.Option("--ray-client-port", help="the head's Ray Client port, which brings the dataset home")
    ] = 10001,
    shared_output: Annotated[
        bool,
        typer.Option("--shared-output", help="--output is on a filesystem the cluster shares: the job writes there"),
    ] = False,
    kuberay: KubeRayFlags = KubeRayFlags(),
) -> int:
    """Run JOB on a Ray cluster through the Jobs API and bring its dataset back here (``kvray run --address
    http://…`` with the remote-only flags); with --kuberay, write the RayJob that runs it on Kubernetes."""
    if kuberay.kuberay or kuberay.emit_to:
        return _emit_kuberay(job, output, kuberay, timeout_s=timeout_s, elsewhere=bool(cluster or address))
    from kvray.data.location import is_uri, output_folder
    from kvray.data.status import default_output_dir
    from kvray.launch.remote import RemoteJobError
    from kvray.launch.submit import RunSettings, is_dashboard_url, submit_job
    from kvray.plan.job import load_job

    spec = load_job(job)  # a bad job file is one line, before any cluster is touched
    if bool(address) == bool(cluster):
        raise KvrayInputError("give exactly one of --address http://HOST:8265 or --cluster FILE.yaml")
    if address and not is_dashboard_url(address):
        raise KvrayInputError(f"--address must be the dashboard's http(s)://HOST:8265 URL, got {address!r}")
    out = output or str(default_output_dir(spec))
    if is_uri(out):  # the job writes there itself: a bad URI or bucket is one line before any cluster is touched
        with output_folder(out, upload=False):
            pass
    settings = RunSettings(
        output_dir=out,
        address=address or "local",
        cluster=cluster,
        down=down,
        timeout_s=timeout_s,
        provision=not no_provision,
        ray_client_port=ray_client_port,
        shared_output=shared_output,
    )
    try:
        record = submit_job(spec, settings, job_file=job, log=sys.stdout.write)
    except RemoteJobError as exc:
        sys.stderr.write(f"kvray: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    status = record.remote_status or ""
    if is_uri(out):
        render.line(f"job {status}: the dataset is in {out}")
        if not no_plots:
            with output_folder(out, must_exist=True) as staged:  # figures and report go up beside the data
                make_all_after_run(staged, shown=out)
        return 0 if status.endswith("SUCCEEDED") else 1
    render.line(f"job {status}: {len(record.files)} files in {out}")
    if not no_plots:
        make_all_after_run(out)
    return 0 if status.endswith("SUCCEEDED") else 1


def _emit_kuberay(job: str, output: str | None, flags: KubeRayFlags, *, timeout_s: float, elsewhere: bool) -> int:
    """``launch --kuberay --emit FILE``: the manifests only (kvray/launch/kuberay.py); nothing is contacted."""
    from kvray.launch.kuberay import DEFAULT_IMAGE, RayJobSettings, emit

    emit_to = flags.emit_to
    if not (flags.kuberay and emit_to):
        raise KvrayInputError("--kuberay and --emit FILE go together: the RayJob manifest is written to FILE")
    if elsewhere:
        raise KvrayInputError("--kuberay writes a manifest for kubectl: leave out --cluster and --address")
    image = flags.image or DEFAULT_IMAGE
    emit(job, output, emit_to, RayJobSettings(namespace=flags.namespace, image=image, timeout_s=timeout_s))
    if emit_to != "-":
        render.line(f"RayJob written to {emit_to}: kubectl apply -f {emit_to}; the dataset goes to {output}")
    return 0


# --- exp1 … expN: a job built from flags (kvray/experiments/), then the same path as `kvray run` -----------


def run_experiment(job: Job, flags: ExperimentFlags, notes: list[str] | None = None) -> None:
    """Dry run: the cells and their predicted memory. Otherwise: the job on Ray here or on a remote cluster
    (kvray/launch/submit.py chooses), a line of counts, then figures and report."""
    flags.output_folder  # noqa: B018 — --output and its old name naming two folders: one line, before anything
    for text in notes or []:
        render.note(text)
    if flags.dry_run:
        from kvray.plan.experiments import dry_run_rows

        rows = dry_run_rows(job)
        if flags.as_json:
            render.print_json({"job": job.name, "cells": rows})
        else:
            render.dry_run(job.name, rows)
        return
    if flags.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import contextlib
    from dataclasses import replace

    from kvray.data.location import is_uri, output_folder
    from kvray.launch.jobs_api import RemoteJobError
    from kvray.launch.submit import submit_job
    from kvray.sweep import status_counts

    settings = flags.run_settings()
    remote = flags.output_folder if is_uri(flags.output_folder) else None
    staging = output_folder(remote) if remote else contextlib.nullcontext(None)
    with staging as staged:  # an object-storage --output: staged here, uploaded as `kvray run` does
        if staged is not None:
            settings = replace(settings, output_dir=staged, sync_to=remote)
        try:
            submitted = submit_job(job, settings, log=sys.stdout.write)
        except RemoteJobError as exc:  # the job's status, exit code and last log lines, never a local traceback
            sys.stderr.write(f"kvray: {exc}\n")
            raise typer.Exit(1) from None
        out = submitted.output_dir
        if submitted.remote_status is not None:
            render.line(f"remote job {submitted.remote_status} → {remote or out}")
        render.experiment_summary(job.name, status_counts(out, job), remote or out)
        render.stragglers(submitted.run)
        if not flags.no_plots:
            make_all_after_run(out, shown=remote)


def experiment_commands() -> list[tuple[str, Callable[..., None]]]:
    """(name, Typer command) of every registered experiment (kvray/experiments/), in registry order: its own
    options are its ``build``'s parameters, beside ExperimentFlags'."""
    return [(exp.name, _command(exp)) for exp in experiments()]


def _options_signature(build: Callable[..., Any]) -> inspect.Signature:
    """``build``'s parameters with their annotations evaluated (the Typer options), its return left out: an
    experiment names its Job type only for type checkers, so the CLI need not import the planner to start."""
    params = list(inspect.signature(build).parameters.values())
    namespace = build.__globals__
    own = [
        p.replace(annotation=eval(p.annotation, namespace) if isinstance(p.annotation, str) else p.annotation)
        for p in params[1:]
    ]
    return inspect.Signature([params[0].replace(annotation=inspect.Parameter.empty), *own])


def _command(exp: Experiment) -> Callable[..., None]:
    def command(flags: ExperimentFlags, **options: Any) -> None:
        job, notes = exp.build(flags, **options)
        run_experiment(job, flags, notes)

    command.__signature__ = _options_signature(exp.build)  # type: ignore[attr-defined]
    command.__name__ = command.__qualname__ = exp.name
    command.__doc__ = exp.summary
    return experiment_command(command)
