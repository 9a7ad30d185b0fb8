"""KV what-ifs the plan answers beside its search (docs/simulator.md "KV what-ifs" states the physics, worked):

**CPU offload of evicted prefix blocks.** A prefix the GPU pool still holds is a hit for free; one it evicted is
either recomputed (its prefill: ``prefill_s_per_token`` × tokens, compute-bound) or, with offload, copied back
from host memory over the GPU's host link (``transfer_s_per_token`` = KV bytes per token per GPU ÷ link
bandwidth). Offload changes nothing while the prefixes' working set fits the GPU pool, so it **pays above a
working set W = the KV pool's tokens** — and only if a transfer is faster than a recompute, up to W plus what
host memory holds (``HostMemory``: ``--host-memory-gib`` per GPU over ``--host-link``, PCIe or a Grace Hopper's
NVLink-C2C).

**Disaggregated prefill and decode.** Separate pools: every request's prompt KV (prompt × KV bytes per token of
the whole model) crosses from a prefill GPU group to a decode group, adding its transfer time to TTFT; the
prefill pool is sized by its busy time, ⌈R × prefill(P) ÷ ρ⌉ groups at utilisation ρ (0.8: queueing headroom),
the decode pool by the largest decode batch B whose TPOT meets the SLO: ⌈R ÷ (B ÷ (G × TPOT(B)))⌉ groups. Priced
at the co-located best's $/GPU-hour, the split is compared with that best: (prefill + decode groups) × TP × price
against replicas × TP × price.

fp8 KV (the pool ×2 per byte, the KV part of each decode step's bytes halved) and prefix caching are candidates
of the search itself (``--kv-dtype``, ``--prefix-caching``): the simulator runs them, fp8's dequantisation as
its step's ``kv_dequant_s_per_gb`` term (0 unless a calibration entry sets it: docs/simulator.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvray.capacity.search import Replica
from kvray.capacity.traffic import Traffic
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, get_gpu
from kvray.model.geometry import ModelGeometry
from kvray.model.kvmath import kv_bytes_per_token
from kvray.model.parallel import shard_geometry
from kvray.sim.simulate import Costing, Prediction, efficiency_for, predict_cell

# GPU ↔ host link per direction, GB/s. PCI-SIG: Gen4 16 GT/s, Gen5 32 GT/s per lane, × 16 lanes, 128b/130b
# encoding → 31.5 and 63.0 GB/s each way. Every board in kvray's table sits on PCIe x16 to its host (SXM boards
# too: NVLink joins GPUs, not the CPU); a Grace Hopper's NVLink-C2C (450 GB/s each way) would be its own row.
PCIE_GEN4_X16_GBPS = 16 * 16 * 128 / 130 / 8
PCIE_GEN5_X16_GBPS = 32 * 16 * 128 / 130 / 8
HOST_LINK_GBPS = {
    "H100-SXM": PCIE_GEN5_X16_GBPS,
    "H100-PCIe": PCIE_GEN5_X16_GBPS,
    "H100-NVL": PCIE_GEN5_X16_GBPS,
    "H200": PCIE_GEN5_X16_GBPS,
    "H200-NVL": PCIE_GEN5_X16_GBPS,
}
# A Grace Hopper superchip's CPU–GPU link: NVIDIA GH200 datasheet, "NVLink-C2C: 900GB/s" bidirectional, so 450
# GB/s each way — 7× a PCIe Gen5 x16 link.
NVLINK_C2C_GBPS = 450.0
HOST_LINKS = ("pcie", "nvlink-c2c")  # --host-link: the board's PCIe generation, or NVLink-C2C
PREFILL_UTILISATION = 0.8
DEFAULT_HOST_KV_GIB = 256.0  # host memory given to offloaded KV per GPU: a what-if's assumption, printed with it


@dataclass(frozen=True)
class HostMemory:
    """What CPU offload may use per GPU: host memory given to KV (GiB) and the link to it (``HOST_LINKS``)."""

    kv_gib: float = DEFAULT_HOST_KV_GIB
    link: str = "pcie"

    def __post_init__(self) -> None:
        if not (self.kv_gib > 0 and math.isfinite(self.kv_gib)):
            raise KvrayInputError(f"--host-memory-gib must be a positive number of GiB, got {self.kv_gib:g}")
        if self.link not in HOST_LINKS:
            raise KvrayInputError(f"--host-link: unknown link {self.link!r} (known: {', '.join(HOST_LINKS)})")

    def link_gbps(self, gpu: GpuSpec) -> tuple[str, float]:
        """(name, GB/s one way) of this GPU's link to host memory."""
        if self.link == "nvlink-c2c":
            return "NVLink-C2C", NVLINK_C2C_GBPS
        gbps = host_link_gbps(gpu)
        return ("PCIe Gen5 x16" if gbps == PCIE_GEN5_X16_GBPS else "PCIe Gen4 x16"), gbps


def host_link_gbps(gpu: GpuSpec) -> float:
    """GB/s one way between this GPU and its host (PCIe Gen5 x16 on Hopper boards, Gen4 x16 on the rest)."""
    return HOST_LINK_GBPS.get(gpu.name, PCIE_GEN4_X16_GBPS)


@dataclass
class OffloadVerdict:
    kv_bytes_per_token_per_gpu: float
    prefill_s_per_token: float  # recomputing a prefix, per token (a prefill of the prefix alone)
    transfer_s_per_token: float  # copying it back from host memory, per token
    host_link_gbps: float
    working_set_threshold_tokens: int  # W: the GPU pool's tokens
    host_capacity_tokens: int
    working_set_tokens: int  # the traffic's distinct prefix tokens (0 without shared prefixes)
    pays: bool  # transfer faster than recompute
    verdict: str
    host_link: str = "PCIe"
    host_kv_gib: float = DEFAULT_HOST_KV_GIB

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offload_verdict(
    replica: Replica, traffic: Traffic, pool_tokens: int, *, host: HostMemory = HostMemory()
) -> OffloadVerdict:
    """Whether offloading evicted prefix blocks to host memory beats recomputing them (module docstring)."""
    per_token = kv_bytes_per_token(shard_geometry(replica.g, replica.tp), replica.kv_dtype, "paged")
    prefix = max(traffic.prefix_toks, 512)
    prefill_per_token = _predict(replica, 1, prefix, 1).ttft_s / prefix
    link_name, link = host.link_gbps(replica.gpu)
    transfer_per_token = per_token / (link * 1e9)
    host_kv_gib = host.kv_gib
    host_tokens = int(host_kv_gib * 2**30 / per_token)
    working = traffic.groups * traffic.prefix_toks
    pays = transfer_per_token < prefill_per_token
    ratio = prefill_per_token / transfer_per_token
    if pays:
        text = (
            f"offload pays above working set W = {pool_tokens:,} tokens (the GPU pool): a host hit costs "
            f"{transfer_per_token * 1e6:.2f} µs/token over {link_name} ({link:.1f} GB/s) vs {prefill_per_token * 1e6:.2f} µs/token to "
            f"recompute ({ratio:.1f}× faster), up to {pool_tokens + host_tokens:,} tokens with {host_kv_gib:g} GiB of host KV"
        )
    else:
        text = (
            f"offload does not pay: a host hit ({transfer_per_token * 1e6:.2f} µs/token over {link_name}, "
            f"{link:.1f} GB/s) is "
            f"slower than recomputing ({prefill_per_token * 1e6:.2f} µs/token)"
        )
    if working:
        text += (
            f"; this traffic's prefixes hold {working:,} tokens ({'above' if working > pool_tokens else 'within'} W)"
        )
    return OffloadVerdict(
        per_token,
        prefill_per_token,
        transfer_per_token,
        link,
        pool_tokens,
        host_tokens,
        working,
        pays,
        text,
        link_name,
        host_kv_gib,
    )


@dataclass
class Disaggregation:
    kv_transfer_bytes_per_request: float  # the mean prompt's KV, whole model
    link: str
    link_gbps: float
    ttft_added_s: float
    prefill_s: float  # one mean prompt's prefill on one group
    prefill_groups: int
    decode_batch: int  # the largest decode batch within the TPOT SLO
    decode_rps_per_group: float
    decode_groups: int
    gpus: int
    # priced at the co-located best's $/GPU-hour (``price``): set by ``best_what_ifs``
    cost_per_hour: float | None = None
    cost_per_mtok_output: float | None = None
    colocated_gpus: int | None = None
    colocated_cost_per_hour: float | None = None
    ttft_alone_ms: float = 0.0  # a mean prompt's prefill on its own group + the KV transfer (no queueing)
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def price(self, usd_per_gpu_hour: float, rate_rps: float, mean_gen_toks: float, colocated: Deployment) -> None:
        """Its cost at ``usd_per_gpu_hour`` and the comparison with the co-located ``colocated`` deployment."""
        self.cost_per_hour = self.gpus * usd_per_gpu_hour
        self.cost_per_mtok_output = self.cost_per_hour / (rate_rps * mean_gen_toks * 3600) * 1e6
        self.colocated_gpus = colocated.replicas * colocated.tp
        self.colocated_cost_per_hour = colocated.cost_per_hour
        change = (self.cost_per_hour / colocated.cost_per_hour - 1) * 100
        word = "more" if change > 0.05 else "less" if change < -0.05 else "the same"
        gpus = f"{self.colocated_gpus} GPU{'s' if self.colocated_gpus != 1 else ''}"
        self.verdict = (
            f"{self.prefill_groups} prefill + {self.decode_groups} decode group"
            f"{'s' if self.prefill_groups + self.decode_groups != 1 else ''} of TP{colocated.tp} = {self.gpus} GPUs, "
            f"${self.cost_per_hour:.2f}/h — "
            + (f"{abs(change):.0f} % {word} than" if word != "the same" else "the same as")
            + f" co-located ({gpus}, ${colocated.cost_per_hour:.2f}/h)"
        )


def _predict(replica: Replica, concurrency: int, prompt_toks: int, gen_toks: int) -> Prediction:
    """The simulator's prediction of one cell on ``replica`` (paged KV, as the engines these plans assume)."""
    r = replica
    costing = Costing(dtype=r.dtype, kv_dtype=r.kv_dtype, layout="paged", eff=r.eff, tp=r.tp)
    return predict_cell(r.g, r.gpu, concurrency, prompt_toks, gen_toks, costing=costing)


def disaggregation(
    replica: Replica,
    traffic: Traffic,
    rate_rps: float,
    tpot_ms: float | None,
    *,
    pool_tokens: int,
    link_gbps: float | None = None,
    max_batch: int = 256,
) -> Disaggregation:
    """Separate prefill and decode pools of ``tp``-GPU groups of ``gpu`` (module docstring). ``link_gbps``: the
    one-way bandwidth between the pools (default the GPU's own GPU-to-GPU link: both pools in one node)."""
    p, n = max(1, round(traffic.mean_prompt_toks)), max(2, round(traffic.mean_gen_toks))
    kv_bytes = p * kv_bytes_per_token(replica.g, replica.kv_dtype, "paged")
    link = link_gbps if link_gbps is not None else replica.gpu.link_gbps_per_direction
    added = kv_bytes / (link * 1e9)
    prefill_s = _predict(replica, 1, p, 1).ttft_s
    prefill_groups = max(1, math.ceil(rate_rps * prefill_s / PREFILL_UTILISATION))
    cap = max(1, min(max_batch, pool_tokens // (p + n)))

    def tpot_ms_at(b: int) -> float:
        return _predict(replica, b, p, n).tpot_s * 1e3

    limit = tpot_ms if tpot_ms is not None else math.inf
    lo, hi = 1, cap
    if tpot_ms_at(hi) <= limit:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tpot_ms_at(mid) <= limit else (lo, mid)
    decode_rps = lo / (n * tpot_ms_at(lo) / 1e3)
    decode_groups = max(1, math.ceil(rate_rps / decode_rps))
    name = "given link" if link_gbps is not None else replica.gpu.interconnect
    ttft_alone_ms = (prefill_s + added) * 1e3
    return Disaggregation(
        kv_bytes,
        name,
        link,
        added,
        prefill_s,
        prefill_groups,
        lo,
        decode_rps,
        decode_groups,
        (prefill_groups + decode_groups) * replica.tp,
        ttft_alone_ms=ttft_alone_ms,
    )


@dataclass(frozen=True)
class Deployment:
    """The plan's best (co-located) deployment, as the what-ifs need it."""

    gpu: str
    tp: int
    kv_dtype: str
    pool_tokens: int
    replicas: int
    cost_per_hour: float
    usd_per_gpu_hour: float
    dtype: str = "bf16"


def best_what_ifs(
    g: ModelGeometry,
    best: Deployment,
    traffic: Traffic,
    rate_rps: float,
    slo: Mapping[str, float],
    *,
    calibration: str | Path | None = None,
    host: HostMemory = HostMemory(),
) -> dict[str, Any]:
    """CPU offload's verdict and a disaggregated prefill/decode split of the best deployment's GPU and TP, priced
    and compared with it; behind a router, every policy's predicted prefix-cache hit rate."""
    spec = get_gpu(best.gpu)
    eff = efficiency_for(spec, "paged", calibration)
    replica = Replica(g, spec, tp=best.tp, dtype=best.dtype, kv_dtype=best.kv_dtype, eff=eff)
    offload = offload_verdict(replica, traffic, best.pool_tokens, host=host)
    split = disaggregation(replica, traffic, rate_rps, slo.get("tpot_ms"), pool_tokens=best.pool_tokens)
    split.price(best.usd_per_gpu_hour, rate_rps, traffic.mean_gen_toks, best)
    out: dict[str, Any] = {"offload": offload.to_dict(), "disaggregation": split.to_dict()}
    if traffic.has_prefixes and best.replicas:
        from kvray.capacity.routing import predict_every_policy

        sample = traffic.requests(rate_rps, min(1000, 64 * best.replicas))
        out["routing_hit_rate_predicted"] = {
            "replicas": best.replicas,
            "requests": len(sample),
            **predict_every_policy(sample, best.replicas),
        }
    return out
