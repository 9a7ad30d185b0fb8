"""The prepared GPU check: one script, one process per model, under 8 minutes on an H100/H200, no Ray.

    python3 benchmarks/gpu_check.py                 # on the GPU machine: writes under $OUT (or results/)
    python3 benchmarks/gpu_check.py --smoke         # the same path on a CPU with a tiny model, in seconds

What it measures (issue #12): `kvray bench`'s code path (HF backend, random bf16 weights, the runner's memory
tracker, OOM pre-check) over opt-1.3b and a Llama-3-8B geometry, concurrency 1–32 × prompt 512/2048, 64
generated tokens; each model is loaded once and its cells run small to large. Then `kvray calibrate` on the
prompt-512 half and the roofline's error on the prompt-2048 half (predicted with the fitted η, compared with
measured TTFT/TPOT p50). Energy (issue #16): every cell's telemetry reads NVML on the GPU — power, utilisation,
``nvmlDeviceGetTotalEnergyConsumption`` — and the table prints joules per output token; the script also reads
that counter around the whole measuring phase as a cross-check (the cells' energy is part of it). Prints one
compact table; the dataset (cells/traces parquet, calibration JSON,
check.json) lands in ``--out``. A time budget stops starting new cells so the script ends in time; cells
not run are listed, never silently dropped.

Needs only python3 with torch, transformers, pandas, pyarrow, psutil, nvidia-ml-py, typer, rich, numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kvray from this checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["facebook/opt-1.3b", "meta-llama/Meta-Llama-3-8B"])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--prompts", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--gen-toks", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting cells after this (default 7 min)")
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, small settings: tests the path")
    ap.add_argument("--assume-gpu", default=None, help="GPU table entry for rows whose hardware is not one (smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.models, args.device, args.dtype = ["kvray/tiny-llama"], "cpu", "fp32"
        args.concurrency, args.prompts, args.gen_toks, args.repeats = [1, 2, 4], [16, 64], 4, 1
        args.assume_gpu = args.assume_gpu or "H100-SXM"  # exercises calibrate + predict; the η it fits is meaningless
    return args


def cells_for(model: str, args: argparse.Namespace) -> list:
    from kvray.bench.cell import bench_cell

    return [
        bench_cell(model, prompt_toks=p, gen_toks=args.gen_toks, concurrency=c, dtype=args.dtype,
                   device=args.device, weights="random", warmup=args.warmup, repeats=args.repeats)
        for p in sorted(args.prompts) for c in sorted(args.concurrency)
    ]  # fmt: skip


def measure(args: argparse.Namespace, out: Path) -> tuple[list, list[str]]:
    """Every cell that fits the budget, one backend (one model load) per model; rows written as they finish."""
    from kvray.backends import get_backend
    from kvray.bench.runner import run_cell
    from kvray.data.store import DatasetWriter

    writer = DatasetWriter(out)
    started = time.monotonic()
    results, not_run = [], []
    for model in args.models:
        backend = get_backend("hf")
        try:
            for cell in cells_for(model, args):
                if time.monotonic() - started > args.budget_s:
                    not_run.append(cell.label())
                    continue
                t0 = time.monotonic()
                result = run_cell(backend, cell)
                writer.append(result)
                results.append(result)
                m = result.metrics
                print(f"  {cell.label():60s} {result.status:8s} TTFT p50 {m.get('ttft_s_p50', float('nan')) * 1e3:8.1f} ms"
                      f"  TPOT p50 {m.get('tpot_s_p50', float('nan')) * 1e3:7.2f} ms  ({time.monotonic() - t0:.1f} s)",
                      flush=True)  # fmt: skip
        finally:
            backend.close()
    return results, not_run


def roofline_error(rows: list[dict], calib_prompt: int, cal_path: Path, assume_gpu: str | None) -> list[dict]:
    """Calibrate on ``calib_prompt`` rows, predict the others with the fitted η: relative error per cell."""
    from kvray.analysis.calibrate import calibrate_rows
    from kvray.hardware.gpus import match_gpu
    from kvray.model.resolve import resolve_geometry
    from kvray.sim.simulate import Efficiency, predict_cell

    ok = [r for r in rows if r["status"] == "ok"]
    if assume_gpu:
        ok = [{**r, "hardware": r["hardware"] if match_gpu(str(r["hardware"])) else assume_gpu} for r in ok]
    fits = calibrate_rows([r for r in ok if r["prompt_toks"] == calib_prompt])
    cal_path.write_text(json.dumps([vars(f) for f in fits], indent=2, default=str))
    by_gpu = {f.gpu: f for f in fits}
    out = []
    for r in ok:
        if r["prompt_toks"] == calib_prompt:
            continue
        spec = match_gpu(str(r["hardware"]))
        fit = by_gpu.get(spec.name) if spec else None
        if spec is None or fit is None:
            continue
        eff = Efficiency(fit.eta_compute, fit.eta_memory, fit.layer_overhead_s, source="gpu_check fit")
        p = predict_cell(resolve_geometry(r["model"]), spec, int(r["concurrency"]), int(r["prompt_toks"]),
                         int(r["gen_toks"]), dtype=r["dtype"], eff=eff)  # fmt: skip
        out.append({
            "model": r["model"], "concurrency": r["concurrency"], "prompt_toks": r["prompt_toks"],
            "ttft_err": p.ttft_s / r["ttft_s_p50"] - 1, "tpot_err": p.tpot_s / r["tpot_s_p50"] - 1,
        })  # fmt: skip
    return out


def nvml_energy_mj(device: str) -> float | None:
    """The GPU's total-energy counter (mJ since driver load), or None without NVML / a GPU / the counter."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        from kvray.hardware.devices import nvml_handle

        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(nvml_handle(device)))
    except Exception:
        return None


def energy_lines(rows: list[dict], whole_j: float | None) -> list[str]:
    """What the energy columns say: the basis, the cells' total against the whole-run counter, or why not."""
    measured = [r for r in rows if isinstance(r.get("energy_j"), int | float) and r["energy_j"] == r["energy_j"]]
    if not measured:
        reasons = sorted({str(r.get("energy_reason")) for r in rows})
        return [f"energy: not measured — {'; '.join(reasons)}"]
    total = sum(r["energy_j"] for r in measured)
    out = [f"energy: {len(measured)} cells, {total:.1f} J in their measured windows ({measured[0]['energy_basis']})"]
    if whole_j is not None:
        out.append(f"  NVML counter over the whole measuring phase (loads, warmups, gaps included): {whole_j:.1f} J")
    return out


def main() -> int:
    args = parse_args()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    out = Path(args.out) / ("gpu-check-smoke" if args.smoke else "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    print(f"kvray GPU check — torch {torch.__version__}, {gpu}, device {args.device}, {args.dtype} → {out}")
    started = time.monotonic()
    energy0 = nvml_energy_mj(args.device)
    results, not_run = measure(args, out)
    energy1 = nvml_energy_mj(args.device)
    whole_j = (energy1 - energy0) / 1e3 if energy0 is not None and energy1 is not None else None
    rows = [r.to_row() for r in results]
    errors = (
        roofline_error(rows, min(args.prompts), out / "calibration.json", args.assume_gpu)
        if len(args.prompts) > 1
        else []
    )

    GIB = 2**30
    print(f"\n{'model':28s} {'c':>3s} {'P':>5s} {'status':8s} {'TTFT p50':>9s} {'TPOT p50':>9s} {'tok/s':>7s} "
          f"{'peak GiB':>8s} {'KV meas':>8s} {'KV err':>7s} {'J/tok':>7s} {'W avg':>6s} {'n':>4s}")  # fmt: skip
    for r in rows:

        def num(key: str, scale: float, fmt: str, row: dict = r) -> str:
            v = row.get(key)
            return fmt.format(v * scale) if row["status"] == "ok" and isinstance(v, int | float) and v == v else "—"

        print(f"{r['model'][-28:]:28s} {r['concurrency']:>3d} {r['prompt_toks']:>5d} {r['status']:8s} "
              f"{num('ttft_s_p50', 1e3, '{:.1f}ms'):>9s} {num('tpot_s_p50', 1e3, '{:.2f}ms'):>9s} "
              f"{num('output_tps', 1, '{:.0f}'):>7s} {num('peak_allocated_bytes', 1 / GIB, '{:.2f}'):>8s} "
              f"{num('kv_measured_bytes', 1 / GIB, '{:.3f}'):>8s} {num('kv_rel_error', 100, '{:+.1f}%'):>7s} "
              f"{num('j_per_output_tok', 1, '{:.3g}'):>7s} {num('power_avg_w', 1, '{:.0f}'):>6s} "
              f"{r.get('requests', r['concurrency'] * r.get('repeats', 1))!s:>4s}")  # fmt: skip
    energy = energy_lines(rows, whole_j)
    print("\n" + "\n".join(energy))
    if errors:
        print(f"\nroofline after calibrating on prompt {min(args.prompts)} (predicted / measured − 1, p50s):")
        for e in errors:
            print(f"  {e['model'][-28:]:28s} c={e['concurrency']:<3d} P={e['prompt_toks']:<5d} "
                  f"TTFT {e['ttft_err']:+.1%}  TPOT {e['tpot_err']:+.1%}")  # fmt: skip
    if not_run:
        print(f"\nnot run (time budget {args.budget_s:.0f} s): {len(not_run)} cells — {', '.join(not_run[:6])}…")
    summary = {"gpu": gpu, "torch": torch.__version__, "wall_s": time.monotonic() - started,
               "cells": len(rows), "not_run": not_run, "roofline_errors": errors,
               "energy": {"lines": energy, "whole_run_nvml_j": whole_j,
                          "j_per_output_tok": {r["cell_id"]: r.get("j_per_output_tok") for r in rows}}}  # fmt: skip
    (out / "check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{len(rows)} cells in {summary['wall_s']:.0f} s; dataset and check.json in {out}")
    return 0 if rows and all(r["status"] in ("ok", "oom", "refused") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
