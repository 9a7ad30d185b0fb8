"""The device a backend runs on: a ``--device`` string resolved, its NVML handle, and its identity for a row.

Shared by every backend that puts work on this machine (hf, hf-paged, vllm) and by the memory tracker, so
they all agree on what "auto" means and name a GPU the same way. torch and pynvml are imported inside the
functions: a CPU-only or server-only run never pays for them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from typing import Any

from kvray.errors import KvrayInputError


def resolve_device(device: str) -> str:
    """ "auto" → "cuda:0" when CUDA is usable, else "cpu"; "cuda" → "cuda:0"; anything else is an input error."""
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise KvrayInputError(f"unknown device {device!r} (known: auto, cpu, cuda, cuda:N)")
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    index = int(device[5:]) if ":" in device else 0
    if not torch.cuda.is_available():
        raise KvrayInputError(f"device {device!r} requested but CUDA is not available here")
    if index >= torch.cuda.device_count():
        raise KvrayInputError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return f"cuda:{index}"


def nvml_handle(device: str) -> Any:
    """NVML handle of a torch CUDA device, matched by UUID (torch and NVML indices may disagree)."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    index = torch.device(device).index or 0
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        with contextlib.suppress(Exception):  # an older driver or a MIG slice: fall back to the index
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_handle_without_cuda(device: str) -> Any:
    """NVML handle of ``cuda:N`` found through CUDA_VISIBLE_DEVICES alone, without torch — so this process creates
    no CUDA context, which a backend whose GPU work happens in a server process must not do.

    CUDA_VISIBLE_DEVICES entries may be NVML indices or UUIDs; without it ``cuda:N`` is NVML index N (NVML
    orders by PCI bus, as CUDA does with CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    import pynvml

    pynvml.nvmlInit()
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[index] if index < len(visible) else str(index)
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


def nvml_process_used_bytes(pids: Collection[int]) -> int | None:
    """GPU memory NVML attributes to ``pids`` (``nvmlDeviceGetComputeRunningProcesses``), summed over every device.

    None when NVML lists none of them with a known figure: no GPU work yet, a driver that hides per-process
    usage, or a container whose pid namespace differs from the one NVML reports in. NVML must be initialised.
    """
    import pynvml

    total, seen = 0, False
    for i in range(pynvml.nvmlDeviceGetCount()):
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
            used = getattr(proc, "usedGpuMemory", None)
            if proc.pid in pids and used is not None:
                total, seen = total + int(used), True
    return total if seen else None


def _nvml_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def device_info(device: str, cuda_context: bool = True) -> dict[str, Any]:
    """{"name", "memory_bytes", "driver", …} of a CUDA device (NVML when present), or the CPU's.

    ``cuda_context=False`` reads NVML alone (no torch, no CUDA context here): for a device that a server
    process uses.
    """
    import platform

    import psutil

    if not device.startswith("cuda"):
        return {
            "name": "cpu",
            "memory_bytes": int(psutil.virtual_memory().total),
            "cpu_count": psutil.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        }
    if not cuda_context:
        import pynvml

        handle = nvml_handle_without_cuda(device)
        return {
            "name": _nvml_text(pynvml.nvmlDeviceGetName(handle)),
            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": _nvml_text(pynvml.nvmlSystemGetDriverVersion()),
            "device": device,
            "source": "nvml",
        }
    import torch

    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    info: dict[str, Any] = {
        "name": torch.cuda.get_device_name(index),
        "memory_bytes": int(props.total_memory),
        "driver": None,
        "cuda": torch.version.cuda,
        "capability": f"{props.major}.{props.minor}",
        "device": device,
    }
    try:
        import pynvml

        handle = nvml_handle(device)
        info["name"] = _nvml_text(pynvml.nvmlDeviceGetName(handle))
        info["driver"] = _nvml_text(pynvml.nvmlSystemGetDriverVersion())
        info["memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:
        pass
    return info
