"""The hf backend under a TP>1 cell: it never claims tensor parallelism (transformers has none; on GPUs it places
whole layers over the worker's GPUs, one computing at a time), and the row says which it did."""

from __future__ import annotations

from kvray.backends.hf import HFBackend
from kvray.runner.run import run_cell
from kvray.spec import Cell, Workload


def test_a_tp2_cell_on_cpu_runs_and_its_row_says_it_was_not_tensor_parallel():
    cell = Cell(
        model="kvray/tiny-llama",
        workload=Workload.uniform(1, 8, 3),
        dtype="fp32",
        device="cpu",
        warmup=0,
        repeats=1,
        tensor_parallel=2,
    )
    backend = HFBackend()
    try:
        result = run_cell(backend, cell)
    finally:
        backend.close()
    assert result.status == "ok", result.reason
    row = result.to_row()
    assert row["tensor_parallel"] == 2
    assert (
        row["parallelism"] == "tensor_parallel 2 requested; hf ran on one cpu device (no split): not tensor parallelism"
    )
