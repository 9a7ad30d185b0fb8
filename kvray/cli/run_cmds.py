"""Commands that run sweeps on Ray: ``run`` (a job file), ``exp1``–``exp4`` (the seed's experiments as jobs)
and ``launch`` (a job on a remote cluster). Each ends with figures and the report unless ``--no-plots``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kvray.cli import render
from kvray.cli.options import (
    AddressOpt,
    ApiKeyEnvOpt,
    BackendsOpt,
    BaseUrlOpt,
    ClusterOpt,
    ExperimentFlags,
    GenOpt,
    HostOpt,
    NoPlotsOpt,
    PromptToksOpt,
    VllmPythonOpt,
    experiment_command,
    server_options,
)
from kvray.errors import KvrayInputError

if TYPE_CHECKING:
    from kvray.plan.experiments import Common
    from kvray.plan.job import Job
    from kvray.sweep.submit import RunSettings


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
        render.line(f"figures in {shown}/figures; report {shown}/{paths.markdown.name} and {paths.html.name}",
                    soft_wrap=True)  # fmt: skip
        return
    render.line(
        f"figures in {paths.markdown.parent / 'figures'}; report {paths.markdown} and {paths.html}", soft_wrap=True
    )


def run(
    job_file: Annotated[str, typer.Argument(help="job file, e.g. jobs/quickstart.yaml")],
    address: AddressOpt = "local",
    cluster: ClusterOpt = None,
    output: Annotated[
        str | None,
        typer.Option("--output", help="results folder or s3://bucket/prefix, gs://… (default results/<job name>)"),
    ] = None,
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
    from kvray.plan.job import load_job
    from kvray.sweep.submit import RunSettings

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
    """The job through kvray/sweep/submit.py (here or on a remote cluster), then its counts, figures, report."""
    from kvray.data.store import read_results
    from kvray.sweep import SweepError, status_counts
    from kvray.sweep.remote import RemoteJobError
    from kvray.sweep.submit import submit_job

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
        sys.stderr.write(f"kvray: interrupted: {rows} rows kept in {shown}; resume with: "
                         f"kvray run {job_file} --output {shown}\n")  # fmt: skip
        return 130
    if record.remote_status is not None:
        render.line(f"remote job {record.remote_status}: {len(record.files)} files → {shown}")
    counts = status_counts(record.output_dir, job)
    failed = [r for r in read_results(record.output_dir, traces=False) if r["status"] in ("error", "oom")][:5]
    render.run_summary(job.name, counts, record.run, shown, failed)
    if not no_plots:
        make_all_after_run(record.output_dir, shown=settings.sync_to)
    return 1 if counts.get("error") else 0


def launch(
    job: Annotated[str, typer.Option("--job", help="job file to run on the cluster")],
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="Ray cluster-launcher file: brought up (idempotent) first")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="dashboard URL of an existing cluster, http://HOST:8265")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="local results folder or s3://… (default results/<job name>)")
    ] = None,
    down: Annotated[bool, typer.Option("--down", help="tear the --cluster down afterwards")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="give up (and stop the job) after this long")
    ] = 3600.0,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip figures and report at the end")] = False,
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
) -> int:
    """Run JOB on a Ray cluster through the Jobs API and bring its dataset back here (``kvray run --address
    http://…`` with the remote-only flags)."""
    from kvray.data.location import is_uri, output_folder
    from kvray.data.status import default_output_dir
    from kvray.plan.job import load_job
    from kvray.sweep.remote import RemoteJobError
    from kvray.sweep.submit import RunSettings, is_dashboard_url, submit_job

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


# --- exp1–exp4: a job built from flags, then the same path as `kvray run` (or a remote cluster) ---------


def run_experiment(job: Job, flags: ExperimentFlags, notes: list[str] | None = None) -> None:
    """Dry run: the cells and their predicted memory. Otherwise: the job on Ray here or on a remote cluster
    (kvray/sweep/submit.py chooses), a line of counts, then figures and report."""
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
    from kvray.sweep import status_counts
    from kvray.sweep.launch import RemoteJobError
    from kvray.sweep.submit import submit_job

    settings = flags.run_settings()
    remote = flags.output_dir if is_uri(flags.output_dir) else None
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
        if not flags.no_plots:
            make_all_after_run(out, shown=remote)


def require_server_flags(common: Common) -> None:
    """Names the missing *flag* (--base-url, --host) of a server backend; the options' form is each backend's
    own check when the job validates."""
    for name, option, flag in (("openai", "base_url", "--base-url"), ("ollama", "host", "--host")):
        if name in common.backends and option not in common.options:
            raise KvrayInputError(f"--backends {name} needs {flag}")


Exp1ConcurrencyOpt = Annotated[
    list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 2 4 8 (default)")
]
Exp4ConcurrencyOpt = Annotated[
    list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 4 16 64 (default)")
]
Exp4BackendsOpt = Annotated[
    list[str] | None, typer.Option("--backends", "--backend", help="hf hf-paged vllm (default) | openai | ollama")
]


@experiment_command
def exp1(
    flags: ExperimentFlags,
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: Exp1ConcurrencyOpt = None,
    backend: BackendsOpt = None,
) -> None:
    """Exp1, concurrency sweep: peak memory, KV and throughput as concurrent requests grow (fig1, fig2)."""
    from kvray.plan.experiments import exp1_job

    run_experiment(exp1_job(flags.common(backend), prompt_toks, gen_toks, concurrency), flags)


@experiment_command
def exp2(
    flags: ExperimentFlags,
    seqlens: Annotated[
        list[int] | None, typer.Option("--seqlens", help="prompt lengths: 128 512 1024 2048 4096 (default)")
    ] = None,
    gen_toks: GenOpt = 64,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="requests per cell")] = 1,
    backend: BackendsOpt = None,
) -> None:
    """Exp2, sequence-length sweep: latency (log-log exponent) and memory as prompts grow (fig3, fig4)."""
    from kvray.plan.experiments import exp2_job

    job, notes = exp2_job(flags.common(backend), seqlens, gen_toks, concurrency)
    run_experiment(job, flags, notes)


@experiment_command
def exp3(
    flags: ExperimentFlags,
    short: Annotated[int, typer.Option("--short", help="prompt tokens of the short requests")] = 128,
    long: Annotated[int, typer.Option("--long", help="prompt tokens of the long request(s)")] = 4096,
    gen_toks: GenOpt = 64,
    n_short: Annotated[int, typer.Option("--n-short", help="short requests per batch")] = 3,
    n_long: Annotated[int, typer.Option("--n-long", help="long requests in the mixed batch")] = 1,
    backend: BackendsOpt = None,
) -> None:
    """Exp3, mixed lengths: short requests alone vs batched with long ones — the tail-latency penalty (fig5)."""
    from kvray.plan.experiments import exp3_job

    job, notes = exp3_job(flags.common(backend), short, long, gen_toks, n_short, n_long)
    run_experiment(job, flags, notes)


@experiment_command
def exp4(
    flags: ExperimentFlags,
    backends: Exp4BackendsOpt = None,
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    concurrency: Exp4ConcurrencyOpt = None,
    vllm_python: VllmPythonOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    host: HostOpt = None,
) -> None:
    """Exp4, static vs paged KV: the same workload on hf, hf-paged and vLLM (or servers) — fig8, fig9."""
    from kvray.plan.experiments import exp4_job

    server_flags = server_options(vllm_python, base_url, api_key_env, host)
    common = flags.common(backends, default_backends=("hf", "hf-paged", "vllm"), extra_options=server_flags)
    require_server_flags(common)
    run_experiment(exp4_job(common, prompt_toks, gen_toks, concurrency), flags)


@experiment_command
def exp6(
    flags: ExperimentFlags,
    backends: Annotated[list[str] | None, typer.Option("--backends", "--backend", help="vllm hf-paged (default) | sim")] = None,
    prefix_toks: Annotated[list[int] | None, typer.Option("--prefix-toks", help="shared prefixes: 128 256 384 512 (default)")] = None,
    prompt_toks: Annotated[int, typer.Option("--prompt-toks", help="total prompt tokens of the shared-prefix cells")] = 544,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="requests per shared-prefix cell")] = 16,
    gen_toks: GenOpt = 16,
    conversations: Annotated[int, typer.Option("--conversations", help="multi-turn chats, interleaved")] = 4,
    turns: Annotated[int, typer.Option("--turns", help="turns per chat")] = 6,
    user_toks: Annotated[int, typer.Option("--user-toks", help="tokens of each new user message")] = 100,
    turn_gen_toks: Annotated[int, typer.Option("--turn-gen-toks", help="tokens of each answer")] = 30,
    pressure_concurrency: Annotated[list[int] | None, typer.Option("--pressure-concurrency", help="KV-pressure cells: 4 8 16 (default)")] = None,
    pressure_gen_toks: Annotated[int, typer.Option("--pressure-gen-toks", help="generated tokens of a pressure request")] = 400,
    kv_pool_mib: Annotated[int, typer.Option("--kv-pool-mib", help="the KV pool of vllm / hf-paged (small: pressure)")] = 24,
    vllm_python: VllmPythonOpt = None,
) -> None:  # fmt: skip
    """Exp6, KV reuse and pressure: shared prefixes, multi-turn chats and a small pool that preempts — hit rate
    predicted vs measured, TTFT vs shared fraction, per-turn hits, the fill point (docs/kv_reuse.md)."""
    from kvray.plan.experiments import exp6_grid, exp6_job

    if kv_pool_mib < 1:
        raise KvrayInputError(f"--kv-pool-mib must be >= 1, got {kv_pool_mib}")
    server_flags = [*server_options(vllm_python, None, None, None), f"kv_cache_memory_bytes={kv_pool_mib * 2**20}"]
    common = flags.common(backends, default_backends=("vllm", "hf-paged"), extra_options=server_flags)
    grid = exp6_grid(prefix_toks or [128, 256, 384, 512], prompt_toks, concurrency, gen_toks, conversations, turns,
                     user_toks, turn_gen_toks, [4, 8, 16] if pressure_concurrency is None else pressure_concurrency,
                     32, pressure_gen_toks)  # fmt: skip
    run_experiment(exp6_job(common, grid), flags)


@experiment_command
def exp5(
    flags: ExperimentFlags,
    backends: Annotated[list[str] | None, typer.Option("--backends", "--backend", help="sim (default) | hf hf-paged vllm openai ollama synthetic")] = None,
    users: Annotated[list[int] | None, typer.Option("--users", "-c", help="closed-loop users: 1 4 16 64 (default); 0: no closed loop")] = None,
    requests_per_user: Annotated[int, typer.Option("--requests-per-user", help="requests each closed-loop user sends (>= 3)")] = 8,
    open_load: Annotated[str, typer.Option("--open-load", help="poisson (default) | gamma | constant | none")] = "poisson",
    rates: Annotated[list[str] | None, typer.Option("--rates", "--rate", help="open-loop requests/s: auto (default: a saturation search) or 1 2 4 …")] = None,
    requests: Annotated[int, typer.Option("--requests", help="requests per open-loop rate (a search probe sends at least this many)")] = 100,
    burstiness: Annotated[float, typer.Option("--burstiness", help="gamma loads: 1 = poisson, > 1 burstier")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="seed of the arrivals and drawn lengths")] = 0,
    slo: Annotated[str, typer.Option("--slo", help="SLO thresholds in ms: ttft_ms, tpot_ms, itl_ms, e2e_ms")] = "ttft_ms=500,tpot_ms=50",
    prompt_toks: PromptToksOpt = 512,
    gen_toks: GenOpt = 64,
    prompt_dist: Annotated[str | None, typer.Option("--prompt-dist", help="prompt lengths drawn: lognormal:median=256,sigma=0.8,max=2048 | sharegpt …")] = None,
    gen_dist: Annotated[str | None, typer.Option("--gen-dist", help="output lengths drawn, same form")] = None,
    vllm_python: VllmPythonOpt = None,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    host: HostOpt = None,
) -> None:  # fmt: skip
    """Exp5, serving load: closed-loop users and open-loop rates (auto: up to saturation) under SLOs — latency vs
    throughput, goodput, the knee (fig11, fig12). With only sim and no --hardware: H100-SXM, A100-80GB-SXM and L4."""
    from kvray.plan.experiments import exp5_job
    from kvray.plan.loads import parse_dist, parse_slo

    server_flags = server_options(vllm_python, base_url, api_key_env, host)
    common = flags.common(backends, default_backends=("sim",), extra_options=server_flags)
    require_server_flags(common)
    values = [v.strip() for item in rates or ["auto"] for v in item.split(",") if v.strip()]
    rate_list: list[float] | str = "auto"
    if values != ["auto"]:
        try:
            rate_list = [float(v) for v in values]
        except ValueError:
            raise KvrayInputError(f"--rates: expected requests/s or auto, got {' '.join(values)}") from None
    job = exp5_job(
        common,
        parse_dist(prompt_dist, "--prompt-dist") if prompt_dist else prompt_toks,
        parse_dist(gen_dist, "--gen-dist") if gen_dist else gen_toks,
        [u for u in users if u != 0] if users is not None else None, requests_per_user,
        None if open_load == "none" else open_load, rate_list, requests, parse_slo(slo, "--slo"), seed, burstiness,
    )  # fmt: skip
    run_experiment(job, flags)


@experiment_command
def exp7(
    flags: ExperimentFlags,
    backends: Annotated[list[str] | None, typer.Option("--backends", "--backend", help="sim (default) | vllm | hf")] = None,
    prompt_toks: PromptToksOpt = 1024,
    gen_toks: GenOpt = 128,
    concurrency: Annotated[list[int] | None, typer.Option("--concurrency", "-c", help="concurrent requests: 1 8 32 (default)")] = None,
) -> None:  # fmt: skip
    """Exp7, tensor parallelism: TTFT, TPOT, throughput per GPU and KV per GPU at --tp 1 2 4 8 (default), measured
    vs predicted, and where TP stops paying. With only sim and no --hardware: H100-SXM and A100-80GB-SXM."""
    from kvray.plan.parallelism import exp7_job

    job, notes = exp7_job(flags.common(backends, default_backends=("sim",)), prompt_toks, gen_toks, concurrency)
    run_experiment(job, flags, notes)
