"""Rows 'measured' on an H100 that are the simulator's own predictions at a known truth: the injected schedule
calibration and validation tests must recover."""

from __future__ import annotations

from typing import Any

from kvray.backends.sim import SimBackend
from kvray.runner.run import run_cell
from kvray.spec import Cell, make_options

H100_NVML = "NVIDIA H100 80GB HBM3"


def simulated_as_measured(model: str, workload: Any, backend: str = "hf-paged", **options: Any) -> Any:
    """The sim backend's CellResult for ``workload`` on an H100 with ``options`` (the truth), relabelled as a
    measured ``backend`` row (simulated False, the H100's NVML name). An hf-paged row is simulated as that engine
    attends — one masked attention over the flattened batch (kvray/sim/passes.py) — unless ``attention`` says."""
    if backend == "hf-paged" and options.get("layout") == "paged":
        options.setdefault("attention", "masked")
    cell = Cell(
        model=model, backend=backend, workload=workload, hardware="H100-SXM", warmup=0, options=make_options(**options)
    )
    result = run_cell(SimBackend(), cell)
    result.simulated, result.hardware = False, {"name": H100_NVML}
    return result
