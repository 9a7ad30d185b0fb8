"""Telemetry around a cell's measured repeats: GPUs through NVML, the CPU side through psutil and RAPL, on the
traces' clock — and the energy the measured window used.

``TelemetrySampler`` (a ``PeriodicSampler``) reads, every ``interval_s`` on its own thread:
  gpu:N   per GPU the worker uses, through NVML (nvidia-ml-py, imported only here and only when a GPU is named):
          gpu_util_pct (percent of the last sample period in which any kernel ran — NVML's figure, not SM
          occupancy), mem_util_pct (percent of it in which device memory was read or written), mem_used_bytes
          (the whole device), power_w, energy_j (``nvmlDeviceGetTotalEnergyConsumption``, mJ since driver load,
          here as joules since the window opened), sm_clock_mhz, mem_clock_mhz, temp_c, throttle_mask (NVML's
          clock-event reasons bitmask). A field the GPU does not support is dropped after its first failure.
  cpu     the processes ``pids()`` names and their children: cpu_pct (100 = one core busy, from cpu_times
          deltas) and rss_bytes; rapl_energy_j (package energy since the window opened) where
          /sys/class/powercap exposes readable intel-rapl package domains — otherwise ``rapl_reason`` says why.
Engine gauges are not read here: a backend already samples them on its own run's clock (a server's /metrics
through kvray/servers/prometheus.py, hf-paged's cache) and ``engine_rows`` turns those points into rows.

Times: samples are stamped with ``time.perf_counter()``. ``mark(repeat)`` is called just before each repeat
runs; ``timeline(t0s)`` assigns each sample to the repeat whose mark precedes it and expresses it in seconds
since that repeat's t0 — the backend's own t0 (``BackendRun.t0_s``, the origin of its traces) when it reports
one, else the mark — so a sample at t_s and a token at t_s happened at the same moment.

``figures`` gives the cell's energy columns (docs/metrics.md, "Energy and telemetry"): a reading or NaN with a
reason, never an estimate. A worker with several GPUs (a tensor-parallel group: ``group_devices``) is metered on
every one of them: ``energy_j`` and ``gpu_mem_peak_bytes`` are the group's totals, ``energy_j_per_gpu`` and
``gpu_mem_peak_bytes_per_gpu_max`` the per-GPU figures beside them, ``telemetry_gpus`` how many GPUs were read.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.devices import nvml_handle, nvml_handle_without_cuda
from kvray.measure.sampler import PeriodicSampler

OPTION = "telemetry_interval_s"  # the cell option that sets the interval (0 turns telemetry off)
DEFAULT_INTERVAL_S = 0.1
TREE_REFRESH_S = 1.0  # the process tree is walked (all of /proc) at most this often; its members every sample
POWERCAP = Path("/sys/class/powercap")
TIME_KEYS = ("repeat", "t_s", "sent_s", "rtt_s")  # keys of an engine point that are not gauges

# NVML clock-event reasons that slow the clocks below what the load asks for (power cap, thermal, hardware
# slowdown, power brake); idle, application-clock and display settings and sync boost are not throttling.
THROTTLE_BITS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                 0x80: "hw_power_brake"}  # fmt: skip

ENERGY_COLUMNS = ("energy_j", "energy_j_per_gpu", "j_per_output_tok", "j_per_request", "power_avg_w",
                  "power_peak_w", "tok_per_s_per_w", "gpu_util_mean", "cpu_util_mean", "throttled",
                  "gpu_mem_peak_bytes", "gpu_mem_peak_bytes_per_gpu_max", "telemetry_gpus", "telemetry_samples",
                  "telemetry_interval_s")  # fmt: skip
ENERGY_TEXT_COLUMNS = ("energy_basis", "energy_reason", "gpu_telemetry_reason", "throttle_reasons", "telemetry_scope")


def interval_from_options(options: Mapping[str, Any]) -> float:
    """The cell's ``telemetry_interval_s`` (default 0.1 s; 0 = off), or one KvrayInputError line."""
    raw = options.get(OPTION, DEFAULT_INTERVAL_S)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise KvrayInputError(f"{OPTION} must be a number of seconds (0 turns telemetry off), got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or 0 < value < 0.01:
        raise KvrayInputError(f"{OPTION} must be 0 (off) or at least 0.01 s, got {raw!r}")
    return value


def group_devices(device: str, gpus: int = 1) -> tuple[str, ...]:
    """The CUDA devices a worker's cell runs on: ``gpus`` of them from ``device`` on (a TP=N cell's worker holds N
    GPUs, visible to it as cuda:0 … cuda:N−1: vLLM's ranks and hf's layer-wise placement use them all); none off
    CUDA."""
    if not device.startswith("cuda"):
        return ()
    first = int(device.split(":")[1]) if ":" in device else 0
    return tuple(f"cuda:{first + i}" for i in range(max(gpus, 1)))


@dataclass
class TelemetrySources:
    """What a backend's telemetry reads (``BackendBase.telemetry_sources``)."""

    gpus: tuple[str, ...] = ()  # "cuda:N" devices the worker's work runs on: all of its TP group's
    pids: Callable[[], Sequence[int]] = field(default=lambda: [os.getpid()])  # roots of the CPU process tree
    cuda_context: bool = True  # False: find NVML handles without torch (a server's GPU: no context here)
    scope: str = "kvray process"  # the CPU rows' words for which processes they describe


# ------------------------------------------------------------------ readers


class _GpuReader:
    """One GPU through NVML; ``read`` returns {metric: value} of what this GPU supports."""

    def __init__(self, device: str, cuda_context: bool):
        import pynvml

        self.nvml = pynvml
        self.handle = nvml_handle(device) if cuda_context else nvml_handle_without_cuda(device)
        self.source = "gpu:" + (device.split(":")[1] if ":" in device else "0")
        self.unsupported: set[str] = set()
        self.energy0_mj: float | None = None
        n = pynvml
        reasons = (
            getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        self.fields: dict[str, Callable[[], float]] = {
            "gpu_util_pct": lambda: float(n.nvmlDeviceGetUtilizationRates(self.handle).gpu),
            "mem_util_pct": lambda: float(n.nvmlDeviceGetUtilizationRates(self.handle).memory),
            "mem_used_bytes": lambda: float(n.nvmlDeviceGetMemoryInfo(self.handle).used),
            "power_w": lambda: n.nvmlDeviceGetPowerUsage(self.handle) / 1e3,
            "energy_j": self._energy_j,
            "sm_clock_mhz": lambda: float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)),
            "mem_clock_mhz": lambda: float(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_MEM)),
            "temp_c": lambda: float(n.nvmlDeviceGetTemperature(self.handle, n.NVML_TEMPERATURE_GPU)),
            "throttle_mask": lambda: float(reasons(self.handle)),
        }

    def _energy_j(self) -> float:
        mj = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        if self.energy0_mj is None:
            self.energy0_mj = mj
        return (mj - self.energy0_mj) / 1e3

    def read(self) -> dict[str, float]:
        out = {}
        for metric, get in self.fields.items():
            if metric in self.unsupported:
                continue
            try:
                out[metric] = get()
            except self.nvml.NVMLError:  # not supported on this GPU / driver: say so once, stop asking
                self.unsupported.add(metric)
        return out


def _descendants(pid: int) -> list[int] | None:
    """``pid``'s descendants from /proc/PID/task/TID/children (Linux): reads only this tree, where psutil's
    ``children`` reads the parent of every process on the machine — a millisecond per walk beside 64 workers.
    None when the kernel does not offer the file."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue  # gone
        except OSError:
            return None
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except FileNotFoundError:
                if os.path.isdir(f"/proc/{current}/task/{tid}"):
                    return None  # the thread is there, its children file is not: the kernel lacks it
                continue  # the thread ended meanwhile
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class _CpuReader:
    """CPU % and RSS of a process tree; the tree is re-walked every TREE_REFRESH_S (children come and go)."""

    def __init__(self, pids: Callable[[], Sequence[int]]):
        self.pids = pids
        self.procs: dict[int, Any] = {}
        self.cpu_s: dict[int, float] = {}
        self.walked_at = -math.inf
        self.last_t: float | None = None

    def _walk(self, now: float) -> None:
        """The measured processes and their descendants (a server's workers), found again every TREE_REFRESH_S."""
        import psutil

        procs: dict[int, Any] = {}
        for pid in self.pids():
            try:
                root = self.procs.get(pid) or psutil.Process(pid)
                procs[pid] = root
                children = _descendants(pid)
                if children is None:  # no /proc/PID/task/TID/children: psutil reads every process's parent
                    children = [c.pid for c in root.children(recursive=True)]
                for child in children:
                    with contextlib.suppress(psutil.Error):
                        procs.setdefault(child, self.procs.get(child) or psutil.Process(child))
            except psutil.Error:
                continue
        self.procs, self.walked_at = procs, now

    def read(self, now: float) -> dict[str, float]:
        import psutil

        if now - self.walked_at >= TREE_REFRESH_S:
            self._walk(now)
        rss, busy, cpu_s = 0, 0.0, {}
        for pid, proc in self.procs.items():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
            cpu_s[pid] = times.user + times.system
            busy += cpu_s[pid] - self.cpu_s.get(pid, cpu_s[pid])  # a process new to the tree counts from now
        out = {"rss_bytes": float(rss)}
        if self.last_t is not None and now > self.last_t:
            out["cpu_pct"] = 100.0 * busy / (now - self.last_t)
        self.cpu_s, self.last_t = cpu_s, now
        return out


def rapl_domains(root: Path = POWERCAP) -> tuple[list[tuple[Path, float]], str | None]:
    """([(energy_uj file, max range µJ)] of the package domains, None) or ([], why RAPL cannot be read)."""
    if not root.is_dir():
        return [], f"no {root} (the kernel exposes no powercap interface here: a VM or a non-Linux host)"
    packages = sorted(d for d in root.glob("intel-rapl:*") if d.name.count(":") == 1)
    if not packages:
        return [], f"{root} has no intel-rapl package domains"
    domains = []
    for d in packages:
        try:
            (d / "energy_uj").read_text()
            top = float((d / "max_energy_range_uj").read_text())
        except PermissionError:
            return [], f"{d}/energy_uj is not readable by this user (root only since Linux 5.10)"
        except (OSError, ValueError) as exc:
            return [], f"{d}/energy_uj unreadable: {exc}"
        domains.append((d / "energy_uj", top))
    return domains, None


class _RaplReader:
    """Package energy (all packages summed) in joules since the first read, counter wraps undone."""

    def __init__(self, domains: list[tuple[Path, float]]):
        self.domains = domains
        self.last: list[float] | None = None
        self.total_uj = 0.0

    def read(self) -> dict[str, float]:
        now = [float(path.read_text()) for path, _ in self.domains]
        if self.last is not None:
            for (_, top), a, b in zip(self.domains, self.last, now, strict=True):
                self.total_uj += b - a if b >= a else b + top - a
        self.last = now
        return {"rapl_energy_j": self.total_uj / 1e6}


# ------------------------------------------------------------------ the sampler


class TelemetrySampler(PeriodicSampler):
    """``with TelemetrySampler(sources, 0.1) as tel: for r in …: tel.mark(r); run(r)``; then ``timeline``/``figures``.

    Opening NVML or RAPL never raises: what cannot be read is left out and ``gpu_reason`` / ``rapl_reason``
    say why. Each tick is (perf_counter time, {source: {metric: value}}).
    """

    def __init__(self, sources: TelemetrySources, interval_s: float = DEFAULT_INTERVAL_S):
        super().__init__(interval_s, "kvray-telemetry")
        self.sources = sources
        self.ticks: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.marks: list[tuple[float, int]] = []
        self.gpus: list[_GpuReader] = []
        self.gpu_reason: str | None = None if sources.gpus else "no GPU in this worker"
        for device in sources.gpus:
            try:
                self.gpus.append(_GpuReader(device, sources.cuda_context))
            except Exception as exc:  # no nvidia-ml-py, no driver, a device NVML cannot find
                self.gpu_reason = f"NVML unavailable for {device}: {type(exc).__name__}: {exc}"
                self.gpus = []
                break
        self.cpu = _CpuReader(sources.pids)
        domains, self.rapl_reason = rapl_domains()
        self.rapl = _RaplReader(domains) if domains else None

    def mark(self, repeat: int) -> None:
        """Repeat ``repeat`` starts now: later samples belong to it."""
        self.marks.append((time.perf_counter(), repeat))

    def sample(self) -> None:
        now = time.perf_counter()
        tick: dict[str, dict[str, float]] = {}
        for gpu in self.gpus:
            tick[gpu.source] = gpu.read()
        try:
            tick["cpu"] = self.cpu.read(now)
            if self.rapl is not None:
                tick["cpu"].update(self.rapl.read())
        except Exception:  # a process tree read torn by an exiting process: skip this tick's CPU side
            pass
        self.ticks.append((now, tick))

    # --- what the cell keeps ----------------------------------------------------------------------------

    def timeline(self, t0s: Mapping[int, float]) -> list[tuple[int, float, str, str, float]]:
        """(repeat, t_s, source, metric, value) per sampled value, t_s on each repeat's trace clock."""
        if not self.marks:
            return []
        starts = [t for t, _ in self.marks]
        rows = []
        for t, tick in self.ticks:
            i = max(bisect.bisect_right(starts, t) - 1, 0)  # the entry sample belongs to the first repeat
            repeat = self.marks[i][1]
            t_s = round(t - t0s.get(repeat, starts[i]), 6)
            rows += [
                (repeat, t_s, source, metric, value)
                for source, values in tick.items()
                for metric, value in values.items()
            ]
        return rows

    def _series(self, source: str, metric: str) -> list[tuple[float, float]]:
        return [(t, tick[source][metric]) for t, tick in self.ticks if metric in tick.get(source, {})]

    def _gpu_energy(self) -> tuple[float, str] | str:
        """(joules, basis) over the window from the GPUs' counters (or their power samples), or why not."""
        total, how = 0.0, set()
        for gpu in self.gpus:
            counter = self._series(gpu.source, "energy_j")
            power = self._series(gpu.source, "power_w")
            if len(counter) >= 2:
                total += counter[-1][1] - counter[0][1]
                how.add("NVML total-energy counter")
            elif len(power) >= 2:  # pre-Volta: no counter; the power readings integrated (trapezoid)
                total += sum((t2 - t1) * (p1 + p2) / 2 for (t1, p1), (t2, p2) in pairwise(power))
                how.add(f"NVML power readings integrated (trapezoid, {len(power)} readings)")
            else:
                return f"{gpu.source}: NVML gives neither an energy counter nor power readings"
        names = ", ".join(g.source for g in self.gpus)
        return total, f"{' + '.join(sorted(how))}, whole device ({names}: every process on it)"

    def _gpu_memory(self) -> dict[str, float]:
        """{gpu_mem_peak_bytes: the largest sum over the GPUs of NVML's device memory used at one sample,
        gpu_mem_peak_bytes_per_gpu_max: the largest one GPU reached}; NaN without readings."""
        used = [
            [tick[g.source]["mem_used_bytes"] for g in self.gpus if "mem_used_bytes" in tick.get(g.source, {})]
            for _, tick in self.ticks
        ]
        whole = [sum(u) for u in used if len(u) == len(self.gpus)]
        each = [v for u in used for v in u]
        return {
            "gpu_mem_peak_bytes": max(whole) if whole else float("nan"),
            "gpu_mem_peak_bytes_per_gpu_max": max(each) if each else float("nan"),
        }

    def figures(self, output_toks: int, requests: int) -> dict[str, Any]:
        """The cell's energy columns over the measured window (the first to the last tick)."""
        nan = float("nan")
        out: dict[str, Any] = dict.fromkeys(ENERGY_COLUMNS, nan) | dict.fromkeys(ENERGY_TEXT_COLUMNS)
        out["telemetry_samples"], out["telemetry_interval_s"] = len(self.ticks), self.interval_s
        out["gpu_telemetry_reason"], out["telemetry_scope"] = self.gpu_reason, self.sources.scope
        window_s = self.ticks[-1][0] - self.ticks[0][0] if len(self.ticks) >= 2 else 0.0
        cpu = [v for _, v in self._series("cpu", "cpu_pct")]
        out["cpu_util_mean"] = sum(cpu) / len(cpu) if cpu else nan
        util = [v for g in self.gpus for _, v in self._series(g.source, "gpu_util_pct")]
        out["gpu_util_mean"] = sum(util) / len(util) if util else nan
        masks = [int(v) for g in self.gpus for _, v in self._series(g.source, "throttle_mask")]
        if masks:
            seen = sorted({name for m in masks for bit, name in THROTTLE_BITS.items() if m & bit})
            out["throttled"] = 1.0 if seen else 0.0
            out["throttle_reasons"] = ",".join(seen) or None
        if self.gpus:
            energy = self._gpu_energy()
            peaks = [sum(tick[g.source].get("power_w", 0.0) for g in self.gpus) for _, tick in self.ticks]
            out["power_peak_w"] = max(peaks) if any(peaks) else nan
            out["telemetry_gpus"] = len(self.gpus)
            out.update(self._gpu_memory())
        elif self.rapl is not None:
            series = self._series("cpu", "rapl_energy_j")
            energy = (series[-1][1] - series[0][1], "RAPL package energy (whole CPU package(s): every process)")
            steps = [(e2 - e1) / (t2 - t1) for (t1, e1), (t2, e2) in pairwise(series) if t2 > t1]
            out["power_peak_w"] = max(steps) if steps else nan
        else:
            energy = f"{self.gpu_reason}; CPU package energy not readable: {self.rapl_reason}"
        if isinstance(energy, str) or window_s <= 0:
            out["energy_reason"] = energy if isinstance(energy, str) else "fewer than two telemetry samples"
            return out
        joules, out["energy_basis"] = energy
        out["energy_j"], out["power_avg_w"] = joules, joules / window_s
        out["energy_j_per_gpu"] = joules / len(self.gpus) if self.gpus else nan
        if output_toks and joules > 0:
            out["j_per_output_tok"], out["tok_per_s_per_w"] = joules / output_toks, output_toks / joules
        if requests:
            out["j_per_request"] = joules / requests
        return out


def off_figures(reason: str) -> dict[str, Any]:
    """The energy columns of a cell measured without telemetry: every number NaN, ``energy_reason`` why."""
    out: dict[str, Any] = dict.fromkeys(ENERGY_COLUMNS, float("nan")) | dict.fromkeys(ENERGY_TEXT_COLUMNS)
    out["energy_reason"] = out["gpu_telemetry_reason"] = reason
    return out


def engine_rows(points: Sequence[Mapping[str, Any]], gauges: Sequence[str]) -> list[tuple[int, float, str, str, float]]:
    """(repeat, t_s, "engine", metric, value) for each of ``gauges`` in a backend's own timeline points (already on
    its repeats' trace clock); None and NaN values are left out."""
    rows = []
    for p in points:
        for metric in gauges:
            value = p.get(metric)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                rows.append((int(p.get("repeat", 0)), float(p["t_s"]), "engine", metric, float(value)))
    return rows


def columns(rows: Sequence[tuple[int, float, str, str, float]]) -> dict[str, list[Any]]:
    """Rows as the columnar dict a CellResult carries (``extra["timeline"]``): compact over Ray and on disk."""
    names = ("repeat", "t_s", "source", "metric", "value")
    return {name: [r[i] for r in rows] for i, name in enumerate(names)}
