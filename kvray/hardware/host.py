"""This machine's CPU as a simulator device: peak fp32 FLOP/s and memory bandwidth **measured** here, never tabled.

The GPU table (kvray/hardware/gpus.py) holds datasheet figures. A CPU has no datasheet figure the roofline could
use honestly (turbo, SMT, AVX frequency offsets, the threads an engine binds), so ``measure_host`` times two
micro-benchmarks in this process and builds a ``GpuSpec`` named ``HOST_NAME`` from them:

    fp32 FLOP/s  torch.mm of two n × n fp32 matrices (2 n³ FLOPs each) with ``threads`` intra-op threads — the
                 thread count vLLM's CPU build binds (VLLM_CPU_OMP_THREADS_BIND: every CPU of this process);
                 the best of ``repeats`` timed runs after one warm-up (perf_counter)
    bandwidth    torch copy_ of a ``copy_mib`` MiB fp32 tensor into another: read + write = 2 × its bytes per
                 copy; best of ``repeats`` (a buffer far above the last-level cache, so DRAM, not cache)

Best-of-N, because on a shared machine every interruption only makes a run slower: the fastest run is the one
closest to what the hardware can do. The figures are a property of this host at the time measured, stored with
the calibration they were fitted against (kvray/analysis/calibrate.py) so a prediction divides by the same peaks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec

HOST_NAME = "cpu-host"  # the simulator's name for this machine's CPU; rows say hardware "cpu"
CPU_HARDWARE_NAMES = ("cpu",)  # what a CPU row's hardware column holds (kvray/runner/run.py)


@dataclass(frozen=True)
class HostPeaks:
    """What ``measure_host`` measured, and how (so a reader can tell it from a datasheet figure)."""

    fp32_gflops: float  # best run, 10^9 FLOP/s
    bandwidth_gbps: float  # best run, 10^9 bytes/s, read + write counted
    threads: int
    matmul_n: int
    copy_mib: int
    repeats: int
    memory_gib: float  # total RAM (psutil), what a pool could fill at most
    method: str = "measured: torch.mm fp32 best-of-N, torch copy_ best-of-N (kvray/hardware/host.py)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostPeaks:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as exc:
            raise KvrayInputError(f"not a host peaks record: {d!r}") from exc

    def spec(self) -> GpuSpec:
        """The measured figures as the simulator's device: fp32 for every dtype (no tensor cores on this path)."""
        tflops = self.fp32_gflops / 1e3
        return GpuSpec(HOST_NAME, self.memory_gib, self.bandwidth_gbps, tflops, None, tflops, "")


def measure_host(threads: int | None = None, matmul_n: int = 1024, copy_mib: int = 256, repeats: int = 5) -> HostPeaks:
    """Time the two micro-benchmarks (module docstring). ``threads`` defaults to this process's CPUs."""
    import psutil
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
        torch.mm(a, b)  # warm-up: first-call allocation and BLAS dispatch
        best_mm = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
        src = torch.ones(copy_mib * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm-up: fault the destination's pages in
        best_copy = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return HostPeaks(
        fp32_gflops=2 * matmul_n**3 / best_mm / 1e9,
        bandwidth_gbps=2 * src.numel() * 4 / best_copy / 1e9,
        threads=threads,
        matmul_n=matmul_n,
        copy_mib=copy_mib,
        repeats=repeats,
        memory_gib=psutil.virtual_memory().total / 2**30,
    )


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def is_cpu_hardware(name: str) -> bool:
    return name.strip().lower() in CPU_HARDWARE_NAMES
