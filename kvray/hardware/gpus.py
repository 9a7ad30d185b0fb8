"""Published GPU figures (dense, no 2:4 sparsity) and forgiving name matching against NVML names.

Sources are listed per row in docs/gpus.md. ``memory_gib`` is the total the driver reports (nvidia-smi's
``memory.total``, NVML's total: MiB / 1024) where public nvidia-smi output gives it, because that, not the
marketed "24 GB", is what a process can fill: an L4 with ECC on (the datacenter default) reports 23,034 MiB,
6.3 % under its marketed 24 GiB. Rows without such a figure keep the marketed capacity read as GiB, which
sits a little above what the driver reports. Bandwidth is GB/s (10^9 bytes/s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvray.errors import KvrayInputError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    bandwidth_gbps: float  # 10^9 bytes per second
    bf16_tflops: float  # dense tensor-core, also fp16 (fp32 accumulate on GeForce parts)
    fp8_tflops: float | None  # dense, None where the card has no fp8 tensor cores
    fp32_tflops: float  # CUDA-core fp32: what PyTorch uses for fp32 matmuls (TF32 is off by default)
    ray_accelerator_type: str  # the accelerator_type Ray derives from the NVML name
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def tdp_w(self) -> float | None:
        """The board's maximum power (TDP / TGP, watts) from its datasheet (TDP_W), None when not tabled."""
        return TDP_W.get(self.name)

    @property
    def interconnect(self) -> str:
        """The GPU-to-GPU link tensor parallelism uses within a node (INTERCONNECT): "NVLink 4", "PCIe Gen4"…"""
        return INTERCONNECT[self.name][0]

    @property
    def interconnect_gbps(self) -> float:
        """Per-GPU link bandwidth as datasheets state it: both directions summed, GB/s (INTERCONNECT)."""
        return INTERCONNECT[self.name][1]

    @property
    def link_gbps_per_direction(self) -> float:
        """What one GPU can send (and, at once, receive) per second: half the datasheet's bidirectional total.
        A ring all-reduce is limited by this (kvray.sim.simulate.allreduce_s)."""
        return self.interconnect_gbps / 2

    def tflops(self, dtype: str) -> float:
        """Dense peak for matmuls in ``dtype`` ("fp32", "fp16", "bf16", "fp8")."""
        if dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        if dtype == "fp32":
            return self.fp32_tflops
        return self.bf16_tflops


# name, memory GiB (driver-reported MiB / 1024 where known; 40, 80 and 24 are exact there too: A100s report
# 40,960 and 81,920 MiB, an RTX 3090 24,576 MiB), bandwidth GB/s, bf16, fp8, fp32 TFLOP/s (dense), Ray type,
# NVML-name aliases.
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("A100-40GB-SXM", 40, 1555, 312, None, 19.5, "A100", ("a100 sxm4 40gb", "a100 40gb", "a100")),
        GpuSpec("A100-80GB-SXM", 80, 2039, 312, None, 19.5, "A100", ("a100 sxm4 80gb", "a100 80gb sxm")),
        GpuSpec("A100-80GB-PCIe", 80, 1935, 312, None, 19.5, "A100", ("a100 80gb pcie", "a100 pcie 80gb")),
        GpuSpec(
            "H100-SXM", 81559 / 1024, 3350, 989, 1979, 67, "H100", ("h100 80gb hbm3", "h100 sxm5", "h100 sxm", "h100")
        ),
        GpuSpec("H100-PCIe", 80, 2000, 756, 1513, 51, "H100", ("h100 pcie",)),
        GpuSpec("H100-NVL", 94, 3900, 835, 1671, 60, "H100", ("h100 nvl",)),
        GpuSpec("H200", 143771 / 1024, 4800, 989, 1979, 67, "H200", ("h200 sxm", "h200")),
        GpuSpec("H200-NVL", 141, 4800, 835, 1671, 60, "H200", ("h200 nvl",)),
        GpuSpec("L4", 23034 / 1024, 300, 121, 242.5, 30.3, "L4", ("l4",)),
        GpuSpec("L40S", 46068 / 1024, 864, 362, 733, 91.6, "L40S", ("l40s",)),
        GpuSpec(
            "RTX-4090", 24564 / 1024, 1008, 165, 330, 82.6, "GeForce-RTX-4090", ("geforce rtx 4090", "rtx 4090", "4090")
        ),
        GpuSpec("RTX-3090", 24, 936, 71, None, 35.6, "GeForce-RTX-3090", ("geforce rtx 3090", "rtx 3090", "3090")),
    )
}


# Maximum board power in watts, from the datasheets docs/gpus.md lists (the top of a configurable range where a
# datasheet gives one): what the simulator's predicted energy assumes a GPU draws while it works.
TDP_W: dict[str, float] = {
    "A100-40GB-SXM": 400, "A100-80GB-SXM": 400, "A100-80GB-PCIe": 300,  # A100 datasheet: SXM 400 W, PCIe 300 W
    "H100-SXM": 700, "H100-PCIe": 350, "H100-NVL": 400,  # H100 datasheet: up to 700 W; 300–350 W; 350–400 W
    "H200": 700, "H200-NVL": 600,  # H200 datasheet: up to 700 W (SXM), up to 600 W (NVL)
    "L4": 72, "L40S": 350,  # L4 datasheet: 72 W; L40S datasheet: 350 W
    "RTX-4090": 450, "RTX-3090": 350,  # Ada / GA102 whitepapers: total graphics power 450 W and 350 W
}  # fmt: skip


# GPU-to-GPU bandwidth per GPU within one node, as each datasheet states it (bidirectional total, GB/s): what a
# tensor-parallel all-reduce crosses. SXM boards talk over NVLink through NVSwitch; PCIe boards over PCIe (their
# optional 2-way NVLink bridges join pairs only, so an 8-GPU PCIe node's TP group crosses PCIe).
#   A100 datasheet (SXM4): "NVLink: 600 GB/s"; PCIe cards: "PCIe Gen4: 64 GB/s".
#   H100 datasheet: SXM "NVLink: 900GB/s", PCIe "PCIe Gen5: 128GB/s", H100 NVL "NVLink: 600GB/s" (bridge).
#   H200 datasheet: SXM "NVLink: 900GB/s", NVL "2- or 4-way NVIDIA NVLink bridge: 900GB/s".
#   L4 and L40S datasheets: "PCIe Gen4 x16: 64GB/s bidirectional"; GeForce RTX 4090 / 3090: PCIe 4.0 x16,
#   64 GB/s bidirectional (PCI-SIG Gen4: 16 GT/s × 16 lanes, 128b/130b, ≈ 31.5 GB/s each way).
INTERCONNECT: dict[str, tuple[str, float]] = {
    "A100-40GB-SXM": ("NVLink 3", 600), "A100-80GB-SXM": ("NVLink 3", 600), "A100-80GB-PCIe": ("PCIe Gen4", 64),
    "H100-SXM": ("NVLink 4", 900), "H100-PCIe": ("PCIe Gen5", 128), "H100-NVL": ("NVLink 4 bridge", 600),
    "H200": ("NVLink 4", 900), "H200-NVL": ("NVLink 4 bridge", 900),
    "L4": ("PCIe Gen4", 64), "L40S": ("PCIe Gen4", 64), "RTX-4090": ("PCIe Gen4", 64), "RTX-3090": ("PCIe Gen4", 64),
}  # fmt: skip


def _norm(text: str) -> str:
    text = text.lower().replace("nvidia", " ").replace("-", " ").replace("_", " ")
    return re.sub(r"\s+", " ", text).strip()


def match_gpu(name: str) -> GpuSpec | None:
    """The spec for a table name ("H100-SXM"), a Ray type ("H100") or an NVML name; None if unknown."""
    norm = _norm(name)
    for spec in GPUS.values():
        if norm == _norm(spec.name):
            return spec
    # Longest alias first so "h100 pcie" beats "h100" and "a100 80gb pcie" beats "a100".
    candidates = [(alias, spec) for spec in GPUS.values() for alias in spec.aliases]
    for alias, spec in sorted(candidates, key=lambda c: -len(c[0])):
        if alias == norm or re.search(rf"(^| ){re.escape(alias)}( |$)", norm):
            return spec
    # NVML spells A100 names "A100-SXM4-80GB": all the words of an alias present, in any order.
    for alias, spec in sorted(candidates, key=lambda c: -len(c[0])):
        if len(alias.split()) > 1 and set(alias.split()) <= set(norm.split()):
            return spec
    return None


def get_gpu(name: str) -> GpuSpec:
    spec = match_gpu(name)
    if spec is None:
        raise KvrayInputError(f"unknown GPU {name!r} (known: {', '.join(GPUS)})")
    return spec
