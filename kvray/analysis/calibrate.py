"""Fit the simulator's efficiencies to measured cells: η_compute, η_memory (and a per-layer overhead) per GPU.

Every measured TTFT is one prefill pass and every measured TPOT the mean of the decode steps, so with
x = 1/η_compute, y = 1/η_memory and z = layer overhead (s) each prediction is the simulator's own pass time
(kvray.sim.simulate ``PassRoofs``, costed the way the simulator costs it — one GPU's shard under tensor
parallelism, plus its all-reduces):

    pred = mean over passes of (max over the pass's pieces of (x, y, z) · piece + all-reduce seconds)

where the pieces are the roofline of the whole pass (x · FLOPs/peak, y · bytes/bandwidth, z · layers) and the
rest of the pass on one roof followed by its decode attention on the other; each is linear in (x, y, z), so the prediction is too once
each pass is assigned its piece. The fit minimises the squared relative error Σ (pred/measured − 1)²: a
coarse grid picks a start, then assignment and a non-negative least squares (numpy.linalg.lstsq over the
active sets) alternate until the assignment stops changing. A roof that no pass hits is not identified by the
data and keeps its default, unless that makes the fit worse.

Tensor parallelism: a row's passes are costed on one rank's geometry (kvray.model.parallel ``shard_geometry``)
at its ``tensor_parallel`` degree with the all-reduces the simulator adds (they do not depend on η); an hf
row spread layer-wise over its GPUs is costed as one GPU (kvray.analysis.views ``sharded_tensor_parallel``).

Rows used: status ok, measured (not simulated, unless asked), on a GPU of kvray/hardware/gpus.py (or, with
``host`` — ``kvray calibrate --cpu-host`` — CPU rows against this machine's measured peaks, kvray/hardware/host.py),
backend with a known KV layout (hf → "hf"; hf-paged, vllm, openai → "paged"), requests started together (queue ≈ 0, so
TTFT is the prefill alone), TTFT on the engine's clock (``ttft_basis`` "engine": a server's client-side TTFT
holds HTTP, tokenisation and queueing, which no roof explains, so vllm / openai / ollama rows are skipped; a CPU
row against ``host`` gives its TPOT alone instead: streamed tokens leave one engine step apart, whatever the
client's clock, and the CPU build of vLLM has no engine-clock twin to calibrate from).
Results go to the calibration file that kvray.sim.simulate reads.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvray.analysis.views import sharded_tensor_parallel
from kvray.errors import KvrayInputError
from kvray.hardware.gpus import GpuSpec, match_gpu
from kvray.hardware.host import is_cpu_hardware
from kvray.model.kvmath import normalize_dtype
from kvray.model.parallel import shard_geometry
from kvray.sim.simulate import (
    DEFAULT_ETA_COMPUTE,
    DEFAULT_ETA_MEMORY,
    batch_passes,
    batch_requests,
    calibration_path,
    load_calibration,
    step_roofs,
)

# The flat rows do not carry cell options, so sim rows (only with include_simulated) count as "hf".
BACKEND_LAYOUTS = {"hf": "hf", "hf-paged": "paged", "vllm": "paged", "openai": "paged", "sim": "hf"}
QUEUE_TOLERANCE = 0.05  # a row whose requests queued more than this fraction of TTFT is not one batch
ETA_GRID = np.geomspace(0.02, 2.0, 24)
OVERHEAD_GRID = np.concatenate([[0.0], np.geomspace(1e-7, 1e-2, 16)])
ROOFS = ("compute", "memory", "overhead")


@dataclass
class Observation:
    """One measured latency and the passes it spans: each pass's pieces at η = 1 (kvray.sim.simulate
    ``PassRoofs.pieces``: (compute, memory, overhead) coefficients) and its η-free all-reduce seconds."""

    row: int
    kind: str  # "ttft" | "tpot"
    measured_s: float
    pieces: np.ndarray  # (passes, pieces, 3)
    fixed_s: np.ndarray  # (passes,)


@dataclass
class Fit:
    gpu: str
    layout: str
    eta_compute: float
    eta_memory: float
    layer_overhead_s: float
    rows: int
    ttft_observations: int
    tpot_observations: int
    identified: dict[str, bool]
    median_abs_rel_error_before: dict[str, float]  # with default η, per kind
    median_abs_rel_error_after: dict[str, float]
    skipped: dict[str, int] = field(default_factory=dict)
    host_peaks: dict[str, Any] | None = None  # a CPU fit: the measured peaks η is relative to (hardware/host.py)

    def to_entry(self, source: str) -> dict[str, Any]:
        entry = asdict(self)
        entry.update(source=source, fitted_at=datetime.now(UTC).isoformat(timespec="seconds"))
        return entry


def layout_of(backend: str) -> str | None:
    return BACKEND_LAYOUTS.get(backend)


def ttft_basis_of(row: dict[str, Any]) -> str | None:
    """The row's ``ttft_basis``; for a dataset written before the column existed, what its backend declares."""
    basis = row.get("ttft_basis")
    if isinstance(basis, str) and basis:
        return basis
    from kvray.backends import backend_class

    try:
        return backend_class(str(row.get("backend"))).ttft_basis
    except KvrayInputError:
        return None


def _prompts(row: dict[str, Any]) -> list[int]:
    text = str(row.get("prompt_toks_list") or "")
    prompts = [int(p) for p in text.split(",") if p.strip()]
    return prompts or [int(row["prompt_toks"])] * int(row["concurrency"])


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def observations_from_rows(rows: list[dict[str, Any]], include_simulated: bool = False,
                           host: GpuSpec | None = None) -> tuple[
    dict[tuple[str, str], list[Observation]], dict[str, int]
]:  # fmt: skip
    """Group usable rows' observations by (GPU name, layout); count the skipped rows by reason.

    ``host``: CPU rows are fitted against it (its name, e.g. "cpu-host"); on the client's clock, TPOT only."""
    from kvray.model.resolve import resolve_geometry

    groups: dict[tuple[str, str], list[Observation]] = {}
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    geometries: dict[str, Any] = {}
    for index, row in enumerate(rows):
        if row.get("status") != "ok":
            skip("status not ok")
            continue
        if bool(row.get("simulated")) and not include_simulated:
            skip("simulated")
            continue
        gpu = match_gpu(str(row.get("hardware") or ""))
        on_host = gpu is None and host is not None and is_cpu_hardware(str(row.get("hardware") or ""))
        gpu = host if on_host else gpu
        if gpu is None:
            skip("hardware not in the GPU table")
            continue
        tpot_only = ttft_basis_of(row) != "engine"  # a server's TTFT holds HTTP, tokenisation and queueing
        if tpot_only and not on_host:
            skip("TTFT not on the engine's clock (ttft_basis)")
            continue
        layout = layout_of(str(row.get("backend")))
        if layout is None:
            skip("backend without a known KV layout")
            continue
        ttft = _finite(row.get("ttft_s_p50"))
        if ttft is None:
            skip("no TTFT")
            continue
        if str(row.get("load") or "burst") not in ("burst", "nan"):  # an open or closed loop is no single batch
            skip("not a burst (open or closed loop)")
            continue
        queue = _finite(row.get("queue_s_max")) or 0.0
        # TTFT must be the prefill alone; TPOT alone only needs the batch to decode together: a request started
        # within a twentieth of the decode span shares nearly every step with the others
        span = ttft if not tpot_only else (_finite(row.get("tpot_s_p50")) or 0.0) * (int(row["gen_toks"]) - 1)
        if queue > QUEUE_TOLERANCE * span:
            skip("requests queued (more than one batch)")
            continue
        model = str(row.get("model"))
        if model not in geometries:
            try:
                geometries[model] = resolve_geometry(model)
            except Exception:
                geometries[model] = None
        g = geometries[model]
        if g is None:
            skip("model geometry unknown")
            continue
        try:
            dtype = normalize_dtype(str(row.get("dtype") or "bf16"))
            kv_dtype = normalize_dtype(str(row.get("kv_dtype") or dtype))
        except KvrayInputError:
            skip("unknown dtype")
            continue
        try:
            tp = sharded_tensor_parallel(row)
            shard = shard_geometry(g, tp)
        except KvrayInputError:
            skip("tensor_parallel not valid for the model")
            continue
        prompts = _prompts(row)
        gen = int(row["gen_toks"])
        gens = [gen] * len(prompts)
        roofs = [step_roofs(p, shard, gpu, dtype, tp, requests=work)
                 for p, work in zip(batch_passes(shard, prompts, gens, dtype, kv_dtype, layout),
                                    batch_requests(prompts, gens, layout), strict=True)]  # fmt: skip
        pieces = np.array([r.pieces() for r in roofs])
        fixed = np.array([r.allreduce_s for r in roofs])
        tpot = _finite(row.get("tpot_s_p50"))
        if tpot_only and (tpot is None or gen < 2):
            skip("TTFT not on the engine's clock (ttft_basis) and no TPOT")
            continue
        obs = groups.setdefault((gpu.name, layout), [])
        if not tpot_only:
            obs.append(Observation(index, "ttft", ttft, pieces[:1], fixed[:1]))
        if tpot is not None and gen > 1:
            obs.append(Observation(index, "tpot", tpot, pieces[1:], fixed[1:]))
    return groups, skipped


class _Problem:
    """All passes of a group's observations, flattened for vectorised evaluation."""

    def __init__(self, obs: list[Observation]):
        self.obs = obs
        self.p = np.concatenate([o.pieces for o in obs])  # (passes, pieces, 3)
        self.f = np.concatenate([o.fixed_s for o in obs])
        self.idx = np.concatenate([np.full(len(o.fixed_s), i) for i, o in enumerate(obs)])
        self.n = np.array([len(o.fixed_s) for o in obs], dtype=float)
        self.t = np.array([o.measured_s for o in obs])
        self.fixed = np.bincount(self.idx, weights=self.f, minlength=len(obs)) / self.n  # per observation

    @property
    def passes(self) -> int:
        return len(self.f)

    def predict(self, theta: np.ndarray) -> np.ndarray:
        per_pass = (self.p @ theta).max(axis=1)
        return np.bincount(self.idx, weights=per_pass, minlength=len(self.obs)) / self.n + self.fixed

    def loss(self, theta: np.ndarray) -> float:
        return float(np.sum((self.predict(theta) / self.t - 1.0) ** 2))

    def assignment(self, theta: np.ndarray) -> np.ndarray:
        """Per pass, the piece that sets its time."""
        return np.argmax(self.p @ theta, axis=1)

    def alone(self, roof: int) -> np.ndarray:
        """Per pass, the piece of ``roof`` alone (pieces 0, 1, 2: the whole pass's compute, memory, overhead)."""
        return np.full(self.passes, roof)

    def features(self, assign: np.ndarray) -> np.ndarray:
        """Per observation, mean over its passes of the assigned piece's (compute, memory, overhead) coefficients."""
        chosen = self.p[np.arange(self.passes), assign]  # (passes, 3)
        cols = [np.bincount(self.idx, weights=chosen[:, k], minlength=len(self.obs)) / self.n for k in range(3)]
        return np.stack(cols, axis=1)

    def active(self, assign: np.ndarray) -> list[int]:
        """The roofs (0 compute, 1 memory, 2 overhead) some assigned piece uses."""
        chosen = self.p[np.arange(self.passes), assign]
        return [k for k in range(3) if np.any(chosen[:, k] > 0)]


def _nonneg_lstsq(features: np.ndarray, t: np.ndarray, active: list[int], fixed: np.ndarray | None = None
                  ) -> np.ndarray | None:  # fmt: skip
    """min Σ((f·θ + fixed)/t − 1)² with θ ≥ 0 over the ``active`` columns, by trying every subset of them."""
    design = features / t[:, None]
    target = np.ones(len(t)) - (fixed / t if fixed is not None else 0.0)
    best, best_res = None, math.inf
    for r in range(1, len(active) + 1):
        for cols in itertools.combinations(active, r):
            sol, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
            if np.any(sol <= 0):
                continue
            res = float(np.sum((design[:, cols] @ sol - target) ** 2))
            if res < best_res:
                theta = np.zeros(3)
                theta[list(cols)] = sol
                best, best_res = theta, res
    return best


def _descend(problem: _Problem, theta: np.ndarray) -> tuple[np.ndarray, float]:
    """Alternate roof assignment and non-negative least squares from ``theta`` until the loss stops falling."""
    loss = problem.loss(theta)
    for _ in range(50):
        assign = problem.assignment(theta)
        active = problem.active(assign)
        candidate = _nonneg_lstsq(problem.features(assign), problem.t, active, problem.fixed)
        if candidate is None:
            break
        for k in range(3):  # an inactive roof keeps its value: it still bounds the passes from below
            if k not in active or (k < 2 and candidate[k] <= 0):  # and 1/η is never 0: a dropped η stays too
                candidate[k] = theta[k]
        new_loss = problem.loss(candidate)
        if new_loss >= loss - 1e-15:
            break
        theta, loss = candidate, new_loss
    return theta, loss


def fit_group(obs: list[Observation]) -> tuple[np.ndarray, dict[str, bool]]:
    """θ = (1/η_compute, 1/η_memory, layer overhead s) minimising the squared relative error."""
    problem = _Problem(obs)
    grid = itertools.product(1 / ETA_GRID, 1 / ETA_GRID, OVERHEAD_GRID)
    starts = [min((np.array(g) for g in grid), key=problem.loss)]
    # The alternation below is a local search: a grid point between roofs can settle on the wrong one (a flat
    # 12 ms step read as a slow memory roof). So it also starts from each roof alone, the others out of the way.
    for k in range(3):
        alone = _nonneg_lstsq(problem.features(problem.alone(k)), problem.t, [k], problem.fixed)
        if alone is not None:
            out_of_way = np.array([1 / ETA_GRID[-1], 1 / ETA_GRID[-1], 0.0])
            out_of_way[k] = alone[k]
            starts.append(out_of_way)
    descents = [_descend(problem, start) for start in starts]
    best = min(loss for _, loss in descents)  # ties (an exact fit found twice) go to the grid's start
    theta, loss = next((t, loss) for t, loss in descents if loss <= best * (1 + 1e-9) + 1e-15)
    active = problem.active(problem.assignment(theta))
    identified = {roof: k in active for k, roof in enumerate(ROOFS)}
    defaults = (1 / DEFAULT_ETA_COMPUTE, 1 / DEFAULT_ETA_MEMORY, 0.0)
    for k, roof in enumerate(ROOFS):
        if not identified[roof]:
            trial = theta.copy()
            trial[k] = defaults[k]
            if problem.loss(trial) <= loss * (1 + 1e-9) + 1e-15:
                theta = trial
    return theta, identified


def _median_errors(obs: list[Observation], theta: np.ndarray) -> dict[str, float]:
    problem = _Problem(obs)
    err = np.abs(problem.predict(theta) / problem.t - 1.0)
    kinds = np.array([o.kind for o in obs])
    return {kind: float(np.median(err[kinds == kind])) for kind in ("ttft", "tpot") if np.any(kinds == kind)}


def calibrate_rows(rows: list[dict[str, Any]], include_simulated: bool = False, host: Any = None) -> list[Fit]:
    """``host``: a kvray.hardware.host.HostPeaks — CPU rows are fitted against its measured peaks."""
    groups, skipped = observations_from_rows(rows, include_simulated, host.spec() if host is not None else None)
    fits = []
    default_theta = np.array([1 / DEFAULT_ETA_COMPUTE, 1 / DEFAULT_ETA_MEMORY, 0.0])
    for (gpu, layout), obs in sorted(groups.items()):
        theta, identified = fit_group(obs)
        fits.append(
            Fit(
                gpu=gpu,
                layout=layout,
                eta_compute=float(1 / theta[0]),
                eta_memory=float(1 / theta[1]),
                layer_overhead_s=float(theta[2]),
                rows=len({o.row for o in obs}),
                ttft_observations=sum(o.kind == "ttft" for o in obs),
                tpot_observations=sum(o.kind == "tpot" for o in obs),
                identified=identified,
                median_abs_rel_error_before=_median_errors(obs, default_theta),
                median_abs_rel_error_after=_median_errors(obs, theta),
                skipped=skipped,
                host_peaks=host.to_dict() if host is not None and gpu == host.spec().name else None,
            )
        )
    return fits


def calibrate(results_dir: str | Path, out: str | Path | None = None, include_simulated: bool = False,
              host: Any = None) -> tuple[list[Fit], Path]:  # fmt: skip
    """Fit every (GPU, layout) found in a results folder and merge the fits into the calibration file.

    ``host`` (kvray.hardware.host.HostPeaks): also fit CPU rows, as the device ``cpu-host``, against it."""
    from kvray.data.store import load_dataset, write_json_atomic

    cells, _, _ = load_dataset(results_dir)
    rows = cells.to_dict("records") if len(cells) else []
    fits = calibrate_rows(rows, include_simulated, host)
    if not fits:
        _, skipped = observations_from_rows(rows, include_simulated, host.spec() if host is not None else None)
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "no rows"
        raise KvrayInputError(f"nothing to calibrate in {results_dir}: no usable measured rows ({why})")
    path = Path(out).expanduser() if out is not None else calibration_path()
    data = load_calibration(path)
    data["version"] = 1
    for fit in fits:
        data["entries"].setdefault(fit.gpu, {})[fit.layout] = fit.to_entry(str(Path(results_dir).resolve()))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return fits, path
