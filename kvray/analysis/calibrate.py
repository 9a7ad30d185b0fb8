"""Fit the simulator's step-time model to measured cells: η_compute, η_memory, a per-layer launch floor and the
engine's CPU costs (per step, per running request per step, per admission, per finish), per GPU and layout.

Every observation (kvray/analysis/observations.py: a burst's TTFT and TPOT, a serving window's steady TPOT) is a
weighted sum of costed steps. With θ = (1/η_compute, 1/η_memory, layer overhead s, step_overhead_s,
request_step_s, admit_s, finish_s), each step's time (kvray/sim/costs.py ``StepRoofs``, costed as the simulator
costs it — one GPU's shard under tensor parallelism, plus its all-reduces) is

    max over the step's GPU pieces of (θ₁, θ₂, θ₃) · piece  +  (θ₄ … θ₇) · (1, running, admitted, finished)
    + all-reduce seconds

— linear in θ once every step is assigned its piece. The fit minimises Σ log²(pred/measured) (a factor too high
costs what the same factor too low costs): a coarse grid over the GPU roofs picks a start (others start from each
roof alone and from the CPU terms alone), then assignment and a Gauss–Newton step (a non-negative least squares,
numpy.linalg.lstsq over the active sets, of the residuals linearised at the current prediction) alternate until the
loss stops falling.

**Identification.** A roof no step is assigned to, or a parameter whose column the data cannot tell apart from the
columns before it (in the order of ``PARAMETERS``: the matrix rank does not grow when it joins — a zero column, or
e.g. the cost per finish when every row generates the same number of tokens, since it is then the cost per running
request scaled), is reported *not identified* and keeps its default (η 0.7 / 0.9, overheads 0); the others are
fitted again without it. Results go to the calibration file that kvray.sim.simulate reads.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kvray.analysis.observations import BACKEND_LAYOUTS, Observation, layout_of, observations_from_rows
from kvray.data.reader import load_dataset
from kvray.data.writer import write_json_atomic
from kvray.errors import KvrayInputError
from kvray.sim.costs import CPU_TERMS, DEFAULT_ETA_COMPUTE, DEFAULT_ETA_MEMORY, calibration_path, load_calibration

__all__ = [
    "BACKEND_LAYOUTS",
    "Fit",
    "Observation",
    "calibrate",
    "calibrate_rows",
    "fit_group",
    "layout_of",
    "observations_from_rows",
]

ETA_GRID = np.geomspace(0.02, 2.0, 24)
OVERHEAD_GRID = np.concatenate([[0.0], np.geomspace(1e-7, 1e-2, 16)])
ROOFS = ("compute", "memory", "overhead")
PARAMETERS = ("compute", "memory", *CPU_TERMS, "overhead")  # the order identification admits them in
DEFAULTS = np.array([1 / DEFAULT_ETA_COMPUTE, 1 / DEFAULT_ETA_MEMORY, 0.0, 0.0, 0.0, 0.0, 0.0])
KINDS = ("ttft", "tpot", "steady")
# Unidentified parameters go back to their defaults when that costs at most this much RMS relative error; else an
# η roof the data leaves unassigned keeps the value that keeps it out of the way (a default would bind).
REFIT_TOLERANCE = 0.01
VISIBLE = 0.01  # a parameter that makes less than this share of every observation's time is not seen by the data
NAMES = ("compute", "memory", "overhead", *CPU_TERMS)  # θ's entries, in order


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
    identified: dict[str, bool]  # per parameter: compute, memory, overhead and the CPU terms
    median_abs_rel_error_before: dict[str, float]  # with the defaults, per kind
    median_abs_rel_error_after: dict[str, float]
    skipped: dict[str, int] = field(default_factory=dict)
    host_peaks: dict[str, Any] | None = None  # a CPU fit: the measured peaks η is relative to (hardware/host.py)
    step_overhead_s: float = 0.0
    request_step_s: float = 0.0
    admit_s: float = 0.0
    finish_s: float = 0.0
    steady_observations: int = 0

    def to_entry(self, source: str) -> dict[str, Any]:
        entry = asdict(self)
        entry.update(source=source, fitted_at=datetime.now(UTC).isoformat(timespec="seconds"))
        return entry


class _Problem:
    """All steps of a group's observations, flattened for vectorised evaluation; θ has 7 entries (module doc)."""

    def __init__(self, obs: list[Observation]):
        self.obs = obs
        self.p = np.concatenate([o.pieces for o in obs])  # (steps, pieces, 3)
        self.c = np.concatenate([o.cpu for o in obs])  # (steps, 4)
        self.w = np.concatenate([o.weights for o in obs])
        self.idx = np.concatenate([np.full(len(o.weights), i) for i, o in enumerate(obs)])
        self.t = np.array([o.measured_s for o in obs])
        self.fixed = self._sum(np.concatenate([o.fixed_s for o in obs]))  # per observation
        self.cpu = np.stack([self._sum(self.c[:, k]) for k in range(4)], axis=1)  # (obs, 4)

    def _sum(self, per_step: np.ndarray) -> np.ndarray:
        return np.bincount(self.idx, weights=self.w * per_step, minlength=len(self.obs))

    @property
    def steps(self) -> int:
        return len(self.w)

    def predict(self, theta: np.ndarray) -> np.ndarray:
        return self._sum((self.p @ theta[:3]).max(axis=1)) + self.cpu @ theta[3:] + self.fixed

    def loss(self, theta: np.ndarray) -> float:
        """Σ log²(predicted / measured): a factor too high costs what the same factor too low costs (a squared
        relative error would cap an underestimate at 1 and let one fast outlier pull every prediction to 0)."""
        pred = self.predict(theta)
        if np.any(pred <= 0):
            return math.inf
        return float(np.sum(np.log(pred / self.t) ** 2))

    def assignment(self, theta: np.ndarray) -> np.ndarray:
        """Per step, the piece that sets its GPU time."""
        return np.argmax(self.p @ theta[:3], axis=1)

    def alone(self, roof: int) -> np.ndarray:
        """Per step, the piece of ``roof`` alone (pieces 0, 1, 2: the whole pass's compute, memory, overhead)."""
        return np.full(self.steps, roof)

    def features(self, assign: np.ndarray) -> np.ndarray:
        """Per observation, the coefficients of θ: Σ weight × the assigned piece's (3), then the CPU terms (4)."""
        chosen = self.p[np.arange(self.steps), assign]  # (steps, 3)
        return np.concatenate([np.stack([self._sum(chosen[:, k]) for k in range(3)], axis=1), self.cpu], axis=1)

    def active(self, assign: np.ndarray) -> list[int]:
        """The roofs (0 compute, 1 memory, 2 overhead) some assigned piece uses, and every CPU term."""
        chosen = self.p[np.arange(self.steps), assign]
        return [k for k in range(3) if np.any(chosen[:, k] > 0)] + [3, 4, 5, 6]


def _nonneg_lstsq(
    features: np.ndarray,
    t: np.ndarray,
    active: list[int],
    fixed: np.ndarray | None = None,
    goal: np.ndarray | None = None,
) -> np.ndarray | None:
    """min Σ((f·θ + fixed)/t − goal)² (goal 1: the relative error) with θ ≥ 0 over the ``active`` columns (the
    rest 0), by an active-set search: small subsets, then the columns with a nonzero coefficient, dropping the most
    negative until none is."""
    design = features / t[:, None]
    target = (np.ones(len(t)) if goal is None else goal) - (fixed / t if fixed is not None else 0.0)
    cols = [k for k in active if np.any(design[:, k] != 0)]
    best, best_res = None, math.inf
    for size in range(1, min(len(cols), 3) + 1):  # small subsets: an exact fit by few terms beats a blend
        for subset in itertools.combinations(cols, size):
            cand = _solve(design, target, list(subset))
            if cand is not None and (res := float(np.sum((design @ cand - target) ** 2))) < best_res - 1e-15:
                best, best_res = cand, res
    while cols:  # then the largest set that stays non-negative
        cand = _solve(design, target, cols)
        if cand is not None:
            if (res := float(np.sum((design @ cand - target) ** 2))) < best_res - 1e-15:
                best = cand
            break
        sol, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
        cols.pop(int(np.argmin(sol)))
    return best


def _solve(design: np.ndarray, target: np.ndarray, cols: list[int]) -> np.ndarray | None:
    sol, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
    if np.any(sol <= 0):
        return None
    theta = np.zeros(design.shape[1])
    theta[cols] = sol
    return theta


def _descend(problem: _Problem, theta: np.ndarray, free: list[int]) -> tuple[np.ndarray, float]:
    """Alternate roof assignment and a Gauss–Newton step of the log loss (a non-negative least squares of the
    residuals linearised at the current prediction p₀: log p ≈ log p₀ + (p − p₀) / p₀) from ``theta`` until the loss
    stops falling; a step that overshoots is halved. Only the ``free`` parameters move; the others keep their value."""
    loss = problem.loss(theta)
    for _ in range(50):
        assign = problem.assignment(theta)
        active = [k for k in problem.active(assign) if k in free]
        feats = problem.features(assign)
        held = [k for k in range(7) if k not in active]
        fixed = problem.fixed + feats[:, held] @ theta[held]
        p0 = problem.predict(theta)
        p0 = np.where(p0 > 0, p0, problem.t)
        candidate = _nonneg_lstsq(feats, p0, active, fixed, 1.0 - np.log(p0 / problem.t))
        if candidate is None:
            break
        for k in range(7):  # an inactive roof keeps its value: it still bounds the steps from below
            if k not in active or (k < 2 and candidate[k] <= 0):  # and 1/η is never 0: a dropped η stays too
                candidate[k] = theta[k]
        new_loss = problem.loss(candidate)
        for _ in range(4):
            if new_loss < loss - 1e-15:
                break
            candidate = (candidate + theta) / 2
            new_loss = problem.loss(candidate)
        if new_loss >= loss - 1e-15:
            break
        theta, loss = candidate, new_loss
    return theta, loss


def _fit(problem: _Problem, free: list[int], held: np.ndarray = DEFAULTS) -> tuple[np.ndarray, float]:
    """The best of several descents over the ``free`` parameters (the rest at their ``held`` values)."""

    def start(theta: np.ndarray) -> np.ndarray:
        out = held.copy()
        out[free] = theta[free]
        return out

    grid = itertools.product(1 / ETA_GRID, 1 / ETA_GRID, OVERHEAD_GRID)
    starts = [min((start(np.array([*point, 0.0, 0.0, 0.0, 0.0])) for point in grid), key=problem.loss)]
    # The alternation below is a local search: a grid point between roofs can settle on the wrong one (a flat
    # 12 ms step read as a slow memory roof). So it also starts from each roof alone, the others out of the way,
    # and from the CPU terms alone with the roofs out of the way.
    out_of_way = np.array([1 / ETA_GRID[-1], 1 / ETA_GRID[-1], 0.0, 0.0, 0.0, 0.0, 0.0])
    for k in [0, 1, 2, None]:
        cols = [c for c in ([k] if k is not None else [3, 4, 5, 6]) if c in free]
        feats = problem.features(problem.alone(k if k is not None else 0))
        base = problem.fixed + (feats[:, :3] @ out_of_way[:3] if k is None else 0.0)
        alone = _nonneg_lstsq(feats, problem.t, cols, base) if cols else None
        if alone is not None:
            theta = out_of_way.copy()
            theta[cols] = alone[cols]
            starts.append(start(theta))
    descents = [_descend(problem, s, free) for s in starts]
    best = min(loss for _, loss in descents)  # ties (an exact fit found twice) go to the grid's start
    return next((t, loss) for t, loss in descents if loss <= best * (1 + 1e-9) + 1e-15)


def identifiable(problem: _Problem, theta: np.ndarray) -> list[int]:
    """The parameters the data identifies at ``theta`` (module docstring): assigned roofs that make at least
    ``VISIBLE`` of some observation's predicted time, and CPU terms, whose column raises the rank of the relative
    design matrix, taken in ``PARAMETERS`` order."""
    assign = problem.assignment(theta)
    raw = problem.features(assign)
    share = raw * theta / np.maximum(problem.predict(theta), 1e-300)[:, None]  # each parameter's part of each time
    feats = raw / problem.t[:, None]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=0), 1e-300)
    active = problem.active(assign)
    kept: list[int] = []
    for name in PARAMETERS:
        k = NAMES.index(name)
        visible = k in active and (k >= 3 or np.max(share[:, k]) >= VISIBLE)  # a CPU term may be identified as 0
        if visible and np.linalg.matrix_rank(feats[:, [*kept, k]], tol=1e-6) > len(kept):
            kept.append(k)
    return sorted(kept)


def fit_group(obs: list[Observation]) -> tuple[np.ndarray, dict[str, bool]]:
    """θ (module docstring) minimising the squared relative error, and which parameters the data identified.
    What it did not identify keeps its default — unless a default η would bind where the data says it does not
    (RMS relative error worse by more than ``REFIT_TOLERANCE``): then that roof keeps the value that leaves it out
    of the way."""
    problem = _Problem(obs)
    everything = list(range(7))
    n = len(problem.t)
    # The launch floor last, and only when it fits materially better: a flat per-layer floor plus a per-request
    # cost mimics a memory roof whose KV grows with the batch, so noise alone would otherwise pick it
    theta, loss = _fit(problem, [0, 1, 3, 4, 5, 6])
    with_floor, floor_loss = _fit(problem, everything)
    if math.sqrt(floor_loss / n) < math.sqrt(loss / n) - REFIT_TOLERANCE / 2:
        theta, loss = with_floor, floor_loss
    free = identifiable(problem, theta)
    if free != [k for k in everything if k != 2 or theta[2] > 0]:
        refit, refit_loss = _fit(problem, free)
        if math.sqrt(refit_loss / n) > math.sqrt(loss / n) + REFIT_TOLERANCE:
            held = DEFAULTS.copy()
            held[:2] = theta[:2]
            refit, refit_loss = _fit(problem, free, held)
        theta = refit
    return theta, {name: k in free for k, name in enumerate(NAMES)}


def _median_errors(obs: list[Observation], theta: np.ndarray) -> dict[str, float]:
    problem = _Problem(obs)
    err = np.abs(problem.predict(theta) / problem.t - 1.0)
    kinds = np.array([o.kind for o in obs])
    return {kind: float(np.median(err[kinds == kind])) for kind in KINDS if np.any(kinds == kind)}


def calibrate_rows(rows: list[dict[str, Any]], include_simulated: bool = False, host: Any = None) -> list[Fit]:
    """``host``: a kvray.hardware.host.HostPeaks — CPU rows are fitted against its measured peaks."""
    groups, skipped = observations_from_rows(rows, include_simulated, host.spec() if host is not None else None)
    fits = []
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
                steady_observations=sum(o.kind == "steady" for o in obs),
                identified=identified,
                median_abs_rel_error_before=_median_errors(obs, DEFAULTS),
                median_abs_rel_error_after=_median_errors(obs, theta),
                skipped=skipped,
                host_peaks=host.to_dict() if host is not None and gpu == host.spec().name else None,
                **{name: float(v) for name, v in zip(CPU_TERMS, theta[3:], strict=True)},
            )
        )
    return fits


def calibrate(
    results_dir: str | Path, out: str | Path | None = None, include_simulated: bool = False, host: Any = None
) -> tuple[list[Fit], Path]:
    """Fit every (GPU, layout) found in a results folder and merge the fits into the calibration file.

    ``host`` (kvray.hardware.host.HostPeaks): also fit CPU rows, as the device ``cpu-host``, against it."""
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
        entries = data["entries"].setdefault(fit.gpu, {})
        entry = fit.to_entry(str(Path(results_dir).resolve()))
        kept = (entries.get(fit.layout) or {}).get("kv_dequant_s_per_gb")  # set by hand: no fit of it yet
        entries[fit.layout] = entry if kept is None else {**entry, "kv_dequant_s_per_gb": kept}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return fits, path
