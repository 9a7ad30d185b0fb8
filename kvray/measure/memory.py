"""Peak memory around a cell's measured runs, and what counts as running out of it.

``MemoryTracker`` records a baseline (weights loaded, warmup done) on entry and peaks on exit:
  CUDA  torch's allocator peaks (``reset_peak_memory_stats`` → ``max_memory_allocated/reserved``) plus the
        device's used memory as NVML sees it (all processes, CUDA context included), sampled every ~10 ms
  CPU   the process's peak RSS. On Linux the kernel keeps it exactly (VmHWM in /proc/self/status, reset by
        writing "5" to /proc/self/clear_refs), so nothing is sampled; elsewhere RSS is sampled every ~10 ms
``ServerMemoryTracker`` measures a server's process tree instead (a backend that starts one, such as vLLM): the
tree's RSS and, on a GPU, the memory NVML attributes to those processes — through NVML alone, so kvray's own
process, which holds no tensors, creates no CUDA context on the server's GPU.
Sampling runs in a daemon thread (``kvray.measure.sampler.PeakSampler``), so a generate loop in the main
thread is never blocked by it. The kernel's high-water mark is preferred on CPU because it misses no spike
and costs nothing: a 10 ms sampling thread competing for the GIL measurably slowed a CPU generate loop
(docs/benchmarks.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from kvray.hardware.devices import nvml_handle, nvml_handle_without_cuda, nvml_process_used_bytes
from kvray.measure.sampler import PeakSampler

SAMPLE_INTERVAL_S = 0.01
SERVER_SAMPLE_INTERVAL_S = 0.05  # a server tree is walked with psutil and NVML: every 50 ms is plenty

# Messages of allocation failures that are not typed as OOM errors (CPU allocators, NCCL, cuBLAS).
_OOM_PATTERNS = (
    "can't allocate memory",
    "out of memory",
    "cannot allocate memory",
    "failed to allocate",
)


def is_oom_error(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError (CUDA), MemoryError and the CPU allocator's RuntimeError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(p in text for p in _OOM_PATTERNS)
    return False


def attempted_bytes(exc: BaseException) -> int | None:
    """The allocation size an OOM message names ("tried to allocate 1.50 GiB" / "… 123456 bytes")."""
    text = str(exc)
    m = re.search(r"allocate (?:memory: you tried to allocate )?([\d.]+)\s*(bytes|[KMGT]i?B)", text)
    if not m:
        return None
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    scale.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12})
    return int(float(m.group(1)) * scale.get(m.group(2), 1))


def free_memory(device: str = "cpu") -> None:
    """Give back what a failed run left behind, so the next cell starts clean."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _status_bytes(field: str) -> int | None:
    """A "kB" line of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 2**20  # the reset really happened


class MemoryTracker:
    """``with MemoryTracker("cuda:0") as mem: …``; then ``mem.figures()`` gives the memory columns."""

    def __init__(self, device: str = "cpu", interval_s: float = SAMPLE_INTERVAL_S):
        self.device = device
        self.interval_s = interval_s
        self.is_cuda = device.startswith("cuda")
        self._sampler: PeakSampler | None = None
        self._read: Any = None  # the sampled quantity: NVML device used, or process RSS
        self._hwm = False  # CPU peak from the kernel's high-water mark instead of sampling
        self._baseline_sample = 0
        self._peak_sample = 0
        self._baseline_allocated: int | None = None
        self._peak_allocated: int | None = None
        self._peak_reserved: int | None = None

    def __enter__(self) -> MemoryTracker:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline_allocated = torch.cuda.memory_allocated(self.device)
            try:
                import pynvml

                handle = nvml_handle(self.device)
                self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except Exception:  # no NVML: the allocator figures still stand
                self._read = None
        elif reset_rss_peak():
            self._hwm = True
            self._baseline_sample = self._peak_sample = _status_bytes("VmRSS") or 0
        else:
            import psutil

            process = psutil.Process()
            self._read = lambda: int(process.memory_info().rss)
        if self._read is not None:
            self._baseline_sample = self._peak_sample = self._read()
            self._sampler = PeakSampler(self._read, self.interval_s, "kvray-memory", initial=self._peak_sample)
            self._sampler.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sampler is not None:  # stops the thread and takes one last reading
            self._sampler.__exit__(exc_type, exc, tb)
            self._peak_sample = max(self._peak_sample, self._sampler.peak)
        if self._hwm:
            self._peak_sample = max(self._peak_sample, _status_bytes("VmHWM") or 0)
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self._peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self._peak_reserved = torch.cuda.max_memory_reserved(self.device)

    def figures(self) -> dict[str, int | None]:
        """The tracker's memory columns (documented in docs/metrics.md)."""
        if self.is_cuda:
            nvml = self._read is not None
            return {
                "baseline_bytes": self._baseline_allocated,
                "peak_allocated_bytes": self._peak_allocated,
                "peak_reserved_bytes": self._peak_reserved,
                "nvml_baseline_used_bytes": self._baseline_sample if nvml else None,
                "nvml_peak_used_bytes": self._peak_sample if nvml else None,
                "rss_peak_bytes": None,
            }
        return {
            "baseline_bytes": self._baseline_sample,
            "peak_allocated_bytes": None,
            "peak_reserved_bytes": None,
            "nvml_baseline_used_bytes": None,
            "nvml_peak_used_bytes": None,
            "rss_peak_bytes": self._peak_sample,
        }


def tree_rss_bytes(pids: Sequence[int]) -> int | None:
    """Resident memory of these processes together (None when none of them exists any more)."""
    import psutil

    total, seen = 0, False
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
            seen = True
        except psutil.Error:
            continue
    return total if seen else None


class ServerMemoryTracker:
    """``with ServerMemoryTracker(server.pids, "cuda:0") as mem: …`` — a server process tree's memory.

    Baselines on entry, peaks sampled every ``interval_s`` until exit, of
      server_rss_*         the tree's RSS (psutil over ``pids()``, read again each time: workers come and go)
      server_gpu_*         on a GPU, the memory NVML attributes to the tree's processes (per process, summed)
      nvml_*_used_bytes    on a GPU, the server's device as a whole (every process on it)
    and figures() puts the server's own numbers in the common columns too (baseline_bytes, rss_peak_bytes), so a
    row whose ``memory_scope`` names the server describes the server. No torch: nothing here touches CUDA.
    """

    is_cuda = False  # no allocator of this process to read: the runner derives no activation peak from it

    def __init__(
        self, pids: Callable[[], Sequence[int]], device: str = "cpu", interval_s: float = SERVER_SAMPLE_INTERVAL_S
    ):
        self.pids = pids
        self.device = device
        self.interval_s = interval_s
        self._reads: dict[str, Callable[[], int | None]] = {"server_rss": lambda: tree_rss_bytes(self.pids())}
        self._baselines: dict[str, int | None] = {}
        self._samplers: dict[str, PeakSampler] = {}

    def __enter__(self) -> ServerMemoryTracker:
        if self.device.startswith("cuda"):
            try:
                import pynvml

                handle = nvml_handle_without_cuda(self.device)
                self._reads["server_gpu"] = lambda: nvml_process_used_bytes(set(self.pids()))
                self._reads["nvml"] = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except Exception:  # no NVML here: the tree's RSS still stands
                pass
        for key, read in self._reads.items():
            try:
                self._baselines[key] = read()
            except Exception:
                self._baselines[key] = None
            sampler = PeakSampler(read, self.interval_s, f"kvray-{key}", initial=self._baselines[key] or 0)
            self._samplers[key] = sampler.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sampler in self._samplers.values():
            sampler.__exit__(exc_type, exc, tb)

    def _peak(self, key: str) -> int | None:
        sampler = self._samplers.get(key)
        return (sampler.peak or None) if sampler is not None else None

    def figures(self) -> dict[str, int | None]:
        """The common memory columns, describing the server, plus the server_* columns (docs/metrics.md)."""
        on_gpu = "server_gpu" in self._samplers
        return {
            "baseline_bytes": self._baselines.get("server_gpu" if on_gpu else "server_rss"),
            "peak_allocated_bytes": None,
            "peak_reserved_bytes": None,
            "nvml_baseline_used_bytes": self._baselines.get("nvml"),
            "nvml_peak_used_bytes": self._peak("nvml"),
            "rss_peak_bytes": self._peak("server_rss"),
            "server_rss_baseline_bytes": self._baselines.get("server_rss"),
            "server_rss_peak_bytes": self._peak("server_rss"),
            "server_gpu_baseline_bytes": self._baselines.get("server_gpu"),
            "server_gpu_peak_bytes": self._peak("server_gpu"),
        }
