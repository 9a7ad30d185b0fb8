"""The device a backend runs on: a ``--device`` string resolved, its NVML handle, and its identity for a row.

Shared by every backend that puts work on this machine (hf, hf-paged, vllm) and by the memory tracker, so
they all agree on what "auto" means and name a GPU the same way. torch and pynvml are imported inside the
functions: a CPU-only or server-only run never pays for them.
"""

from __future__ import annotations

import contextlib
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


def device_info(device: str) -> dict[str, Any]:
    """{"name", "memory_bytes", "driver", …} of a CUDA device (NVML when present), or the CPU's."""
    import platform

    import psutil

    if not device.startswith("cuda"):
        return {
            "name": "cpu",
            "memory_bytes": int(psutil.virtual_memory().total),
            "cpu_count": psutil.cpu_count(),
            "processor": platform.processor() or platform.machine(),
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
        name = pynvml.nvmlDeviceGetName(handle)
        info["name"] = name.decode() if isinstance(name, bytes) else str(name)
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        info["memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:
        pass
    return info
