"""gpu_check.py's ``validate`` stage: the simulator calibrated on hf-paged and validated on held-out cells, one go.

On the check's first model, on one loaded hf-paged backend:

1. **calibration cells** (what jobs/calibrate_hf_paged.yaml prescribes, scaled to the budget): bursts at two
   output lengths up to the batch a serving load reaches, and one closed loop — a steady serving window;
2. ``kvray calibrate`` on them (kvray/analysis/calibrate.py; on a CPU smoke run against this machine's measured
   peaks, as ``--cpu-host`` does);
3. **held-out cells**, nothing of which the fit saw: another prompt / output length as a burst and a closed loop,
   and Poisson loads at half and at 1.2 × the calibration closed loop's achieved rate (below and above what it
   sustained);
4. ``kvray validate`` of the held-out folder with that calibration: per cell and metric the error, the median per
   metric into check.json (``stages.validate``) and the figure beside the datasets.

Each part writes its own dataset folder under the check's (validate-calibration/, validate-heldout/), so the
check's main dataset holds the other stages' rows only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def calibration_cells(a: Any) -> list[Any]:
    from kvray.bench.cell import bench_cell

    prompt, gens = (16, (4, 8)) if a.smoke else (128, (16, 48))
    conc = (1, 4) if a.smoke else (1, 8, 32, 64)
    common = {"dtype": a.dtype, "device": a.device, "backend": "hf-paged", "weights": "random", "warmup": a.warmup}
    cells = [
        bench_cell(a.models[0], prompt_toks=prompt, gen_toks=n, concurrency=c, repeats=a.repeats, **common)
        for n in gens
        for c in conc
    ]
    users = 4 if a.smoke else 24
    closed = {"kind": "closed", "users": users, "requests": 4 * users}
    cells.append(bench_cell(a.models[0], prompt_toks=prompt, gen_toks=gens[0], load=closed, repeats=1, **common))
    return cells


def held_out_cells(a: Any, closed_rps: float | None) -> list[Any]:
    from kvray.bench.cell import bench_cell

    prompt, gen = (24, 6) if a.smoke else (256, 24)
    common = {"dtype": a.dtype, "device": a.device, "backend": "hf-paged", "weights": "random", "warmup": a.warmup}
    users = 3 if a.smoke else 16
    cells = [
        bench_cell(
            a.models[0], prompt_toks=prompt, gen_toks=gen, concurrency=4 if a.smoke else 16, repeats=a.repeats, **common
        ),
        bench_cell(
            a.models[0],
            prompt_toks=prompt,
            gen_toks=gen,
            repeats=1,
            load={"kind": "closed", "users": users, "requests": 4 * users},
            **common,
        ),
    ]
    if closed_rps:
        requests = 12 if a.smoke else 48
        for k, factor in enumerate((0.5, 1.2)):
            load = {"kind": "poisson", "rate": round(factor * closed_rps, 3), "requests": requests, "seed": 10 + k}
            cells.append(bench_cell(a.models[0], prompt_toks=prompt, gen_toks=gen, repeats=1, load=load, **common))
    return cells


def stage_validate(check: Any, backend: Any, open_: Any) -> None:
    """Calibrate, measure held-out cells, validate (module docstring). ``open_()``: may new work start?"""
    from kvray.analysis.calibrate import calibrate
    from kvray.analysis.validate import validate
    from kvray.data.writer import DatasetWriter
    from kvray.figures.validation import draw_validation
    from kvray.runner.run import run_cell

    a, summary = check.args, check.stages["validate"]
    cal_dir, held_dir = check.out / "validate-calibration", check.out / "validate-heldout"

    def measure(folder: Path, cells: list[Any]) -> list[dict[str, Any]]:
        writer, rows = DatasetWriter(folder, tables=False), []
        for cell in cells:
            if not open_():
                check.not_run["validate"].append(cell.label())
                continue
            t0 = time.monotonic()
            result = run_cell(backend, cell)
            writer.append(result)
            rows.append(result.to_row())
            m = result.metrics or {}
            print(
                f"  {cell.label()[:60]:60s} {result.status:7s} TTFT p50 {1e3 * m.get('ttft_s_p50', float('nan')):8.2f}"
                f" ms  TPOT p50 {1e3 * m.get('tpot_s_p50', float('nan')):7.2f} ms  ({time.monotonic() - t0:.1f} s)",
                flush=True,
            )
        writer.flush()
        return rows

    cal_rows = measure(cal_dir, calibration_cells(a))
    host = None
    if not a.device.startswith("cuda"):  # CPU rows: fitted against this machine's measured peaks (--cpu-host)
        from kvray.hardware.host import measure_host

        host = measure_host(matmul_n=256 if a.smoke else 1024, copy_mib=32 if a.smoke else 256)
    cal_path = check.out / "validate-calibration.json"
    fits, _ = calibrate(cal_dir, out=cal_path, host=host)
    summary["fits"] = [f.to_entry(str(cal_dir)) for f in fits]
    for f in fits:
        print(
            f"  fit {f.gpu} {f.layout}: η_compute {f.eta_compute:.3g}, η_memory {f.eta_memory:.3g}, CPU "
            f"{f.step_overhead_s * 1e3:.3g} ms/step + {f.request_step_s * 1e3:.3g} ms/running request; "
            f"identified {[k for k, v in f.identified.items() if v]}",
            flush=True,
        )
    closed = [r for r in cal_rows if r.get("load") == "closed" and r["status"] == "ok"]
    rate = float(closed[0]["achieved_rps"]) if closed else None
    measure(held_dir, held_out_cells(a, rate))
    result = validate(held_dir, cal_path)
    record = result.to_dict()
    (check.out / "validate-heldout.json").write_text(json.dumps(record, indent=1))
    draw_validation(
        result.rows, check.out, "Simulator vs hf-paged, held out", f"{a.models[0]} {a.dtype}", name="validation"
    )
    summary.update(
        cells=result.cells,
        skipped=result.skipped,
        median_abs_rel_error=result.median_abs_rel_error(),
        worst_abs_rel_error=result.worst_abs_rel_error(),
        closed_loop_rps=rate,
    )
    print(
        "  held-out median |error|: " + ", ".join(f"{m} {e:.1%}" for m, e in result.median_abs_rel_error().items()),
        flush=True,
    )
