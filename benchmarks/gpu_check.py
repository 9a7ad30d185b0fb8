"""The prepared GPU check: one script, one process, under 8 minutes on an H100/H200, no Ray, no network.

    python3 benchmarks/gpu_check.py --out "$OUT"    # on the GPU machine, from the repo root
    python3 benchmarks/gpu_check.py --smoke         # the same stages on a CPU with a tiny model, in about a minute

It runs on the GPU machine's own stack (Python 3.12, torch 2.11, transformers 5.17, no Ray or vLLM); kvray is
imported from this checkout. Five stages, in this order, each measured through `kvray bench`'s own code path
(random bf16 weights, the runner's memory tracker, the OOM pre-check, NVML telemetry):

  grid      the ``hf`` backend (static batches) over opt-1.3b and a Llama-3-8B geometry, concurrency 1–32 ×
            prompt 512/2048, 64 generated; each model loaded once, its cells small to large. Then ``kvray
            calibrate`` on the prompt-512 half and the roofline's error on the prompt-2048 half (predicted with
            the fitted η, against measured TTFT/TPOT p50).
  overhead  what measuring costs on CUDA (benchmarks/overhead.py's ``measure_overhead``): ``run_cell`` against a
            bare ``model.generate``, alternating on one loaded model; the median of per-round ratios.
  paged     the ``hf-paged`` backend (transformers' continuous batching over a paged KV cache) on the first model:
            concurrency 8 and 32 at prompt 512, with the pool, the used-KV peak and the KV timeline.
  validate  the simulator calibrated on hf-paged cells (bursts to 64, a closed loop) and validated on held-out
            ones (other lengths, Poisson below and above the closed loop's rate): benchmarks/gpu_validate.py.
  serve     one serving load with the knee search (``kvray bench --backend hf-paged --load poisson --rate auto``
            without its curve): Poisson probes of 16+ requests at doubling then bisected rates until the knee is
            bracketed within 10 %; each probe is a row; the search's own row gives knee_rps and saturation_rps.

Energy (issue #16): every row carries the telemetry columns — NVML power, utilisation and
``nvmlDeviceGetTotalEnergyConsumption`` over its measured window (energy_j, j_per_output_tok, power_avg_w,
gpu_util_mean, telemetry_samples, energy_basis or energy_reason); the script also reads that counter around the
whole run as a cross-check. The time budget (``--budget-s``, default 7 min) gives each stage a latest start
(``STAGE_STARTS``, fractions of the budget): work not started by then is listed as not run, never silently
dropped. Rows are appended to the dataset (cells.jsonl / traces.jsonl) as each finishes; the parquet tables and
check.json are written at the end of each stage. Prints one compact table per stage.

Needs only python3 with torch, transformers, pandas, pyarrow, psutil, nvidia-ml-py, typer, rich, numpy, pyyaml.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # kvray from this checkout, installed or not
sys.path.insert(1, str(REPO / "benchmarks"))  # overhead.py's measure_overhead
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

STAGES = ("grid", "overhead", "paged", "validate", "serve")
# The latest moment (a fraction of --budget-s) each stage may start new work; work started runs to its end. The
# grid usually ends far sooner (the later stages then start at once); the serve stage's last probe may start at
# 92 % of 7 minutes and still end inside 8.
STAGE_STARTS = {"grid": 0.45, "overhead": 0.55, "paged": 0.62, "validate": 0.8, "serve": 0.92}
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["facebook/opt-1.3b", "meta-llama/Meta-Llama-3-8B"])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--prompts", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--gen-toks", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paged-concurrency", nargs="+", type=int, default=[8, 32], help="hf-paged cells (paged stage)")
    ap.add_argument("--serve-prompt", type=int, default=128, help="serve stage: prompt tokens of each request")
    ap.add_argument("--serve-gen", type=int, default=16, help="serve stage: generated tokens of each request")
    ap.add_argument("--serve-requests", type=int, default=16, help="serve stage: requests a probe sends at least")
    ap.add_argument("--overhead-rounds", type=int, default=10)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (in order)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the stages' start deadlines scale with it (7 min)")
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, small settings: tests the path")
    ap.add_argument("--assume-gpu", default=None, help="GPU table entry for rows whose hardware is not one (smoke)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.device, args.dtype = ["kvray/tiny-llama"], "cpu", "fp32"
        args.concurrency, args.prompts, args.gen_toks, args.repeats = [1, 2, 4], [16, 64], 4, 1
        args.paged_concurrency, args.serve_prompt, args.serve_gen, args.overhead_rounds = [2, 4], 16, 4, 3
        args.assume_gpu = args.assume_gpu or "H100-SXM"  # exercises calibrate + predict; the η it fits is meaningless
    return args


@dataclass
class Budget:
    """Seconds since the check started, against each stage's latest start (``STAGE_STARTS`` × ``budget_s``)."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def deadline_s(self, stage: str) -> float:
        return STAGE_STARTS[stage] * self.budget_s

    def open(self, stage: str) -> bool:
        """May ``stage`` start new work now?"""
        return self.elapsed_s() < self.deadline_s(stage)


@dataclass
class Check:
    """What the run has produced so far: rows by stage, work not run, and each stage's own summary."""

    args: argparse.Namespace
    out: Path
    budget: Budget
    writer: Any
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in STAGES})
    not_run: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in STAGES})
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, stage: str, result: Any) -> dict[str, Any]:
        """Append the row to the dataset now (durable before the next cell starts) and keep it for the tables."""
        if not self.writer.append(result):
            print(f"  (row {result.cell_id} was already in {self.out}: not written again)", flush=True)
        row = result.to_row()
        self.rows[stage].append(row)
        return row

    def all_rows(self) -> list[dict[str, Any]]:
        return [r for s in STAGES for r in self.rows[s]]


def ms(row: dict[str, Any], key: str, digits: int = 1) -> str:
    v = row.get(key)
    return f"{v * 1e3:.{digits}f}ms" if isinstance(v, int | float) and v == v else "—"


def cell_line(row: dict[str, Any], seconds: float) -> str:
    return (
        f"  {row['cell_label'] if 'cell_label' in row else row['cell_id']:58s} {row['status']:8s} "
        f"TTFT p50 {ms(row, 'ttft_s_p50'):>9s}  TPOT p50 {ms(row, 'tpot_s_p50', 2):>8s}  "
        f"J/tok {num(row, 'j_per_output_tok', 1, '{:.3g}'):>6s}  ({seconds:.1f} s)"
    )


def num(row: dict[str, Any], key: str, scale: float, fmt: str) -> str:
    v = row.get(key)
    return fmt.format(v * scale) if row["status"] == "ok" and isinstance(v, int | float) and v == v else "—"


def run_cells(check: Check, stage: str, backend: Any, cells: list[Any]) -> None:
    """Cells in order on one loaded backend while the stage is open; the rest are listed as not run."""
    from kvray.runner.run import run_cell

    for cell in cells:
        if not check.budget.open(stage):
            check.not_run[stage].append(cell.label())
            continue
        t0 = time.monotonic()
        row = check.record(stage, run_cell(backend, cell))
        row["cell_label"] = cell.label()
        print(cell_line(row, time.monotonic() - t0), flush=True)


def stage_grid(check: Check) -> None:
    """The hf backend's grid, one model load per model."""
    from kvray.backends import get_backend
    from kvray.bench.cell import bench_cell

    a = check.args
    for model in a.models:
        cells = [
            bench_cell(
                model,
                prompt_toks=p,
                gen_toks=a.gen_toks,
                concurrency=c,
                dtype=a.dtype,
                device=a.device,
                weights="random",
                warmup=a.warmup,
                repeats=a.repeats,
            )
            for p in sorted(a.prompts)
            for c in sorted(a.concurrency)
        ]
        if not check.budget.open("grid"):
            check.not_run["grid"].extend(c.label() for c in cells)
            continue
        backend = get_backend("hf")
        try:
            run_cells(check, "grid", backend, cells)
        finally:
            backend.close()


def stage_overhead(check: Check) -> None:
    """run_cell against bare generate on the first model (benchmarks/overhead.py), on the check's device."""
    from overhead import measure_overhead, report_lines

    a = check.args
    prompt, gen = (16, 4) if a.smoke else (128, 16)
    summary = measure_overhead(
        a.models[0],
        device=a.device,
        dtype=a.dtype,
        concurrency=4,
        prompt_toks=prompt,
        gen_toks=gen,
        rounds=a.overhead_rounds,
    )
    (check.out / "overhead.json").write_text(json.dumps(summary, indent=2))
    check.stages["overhead"].update(summary)
    print("\n".join(f"  {line}" for line in report_lines(summary)), flush=True)


def paged_cells(check: Check) -> list[Any]:
    from kvray.bench.cell import bench_cell

    a = check.args
    return [
        bench_cell(
            a.models[0],
            prompt_toks=min(a.prompts),
            gen_toks=a.gen_toks,
            concurrency=c,
            dtype=a.dtype,
            device=a.device,
            backend="hf-paged",
            weights="random",
            warmup=a.warmup,
            repeats=a.repeats,
        )
        for c in sorted(a.paged_concurrency)
    ]


def serve_cell(check: Check) -> Any:
    from kvray.bench.cell import bench_cell

    a = check.args
    load = {"kind": "poisson", "rate": "auto", "requests": a.serve_requests, "seed": 0}
    return bench_cell(
        a.models[0],
        prompt_toks=a.serve_prompt,
        gen_toks=a.serve_gen,
        concurrency=1,
        dtype=a.dtype,
        device=a.device,
        backend="hf-paged",
        weights="random",
        warmup=0,
        repeats=1,
        load=load,
    )


class BudgetSpent(Exception):
    """The serve stage's latest start passed before the search had bracketed its knee."""


def stage_paged_and_serve(check: Check) -> None:
    """hf-paged cells, then the knee search, on one hf-paged backend (one model load, one KV pool)."""
    from kvray.backends import get_backend

    a = check.args
    wanted = [s for s in ("paged", "validate", "serve") if s in a.stages]
    if not any(check.budget.open(s) for s in wanted):
        if "paged" in wanted:
            check.not_run["paged"].extend(c.label() for c in paged_cells(check))
        if "serve" in wanted:
            check.not_run["serve"].append(serve_cell(check).label())
        if "validate" in wanted:
            check.not_run["validate"].append("validate: calibration and held-out cells")
        return
    backend = get_backend("hf-paged")
    try:
        if "paged" in wanted:
            begin(check, "paged")
            run_cells(check, "paged", backend, paged_cells(check))
            end(check, "paged")
        if "validate" in wanted:
            from gpu_validate import stage_validate

            begin(check, "validate")
            stage_validate(check, backend, lambda: check.budget.open("validate"))
            end(check, "validate")
        if "serve" in wanted:
            begin(check, "serve")
            stage_serve(check, backend)
            end(check, "serve")
    finally:
        backend.close()


def stage_serve(check: Check, backend: Any) -> None:
    """``--load poisson --rate auto``: the same search ``kvray bench`` runs (kvray/runner/saturation.py), each probe
    recorded as it ends; stopped (no knee claimed) when the stage's latest start passes mid-search."""
    from datetime import UTC, datetime

    from kvray.runner.run import run_cell
    from kvray.runner.saturation import find_saturation, search_result

    cell = serve_cell(check)
    summary = check.stages["serve"]
    if not check.budget.open("serve"):
        check.not_run["serve"].append(cell.label())
        return
    started_at, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    print(f"  knee search: {cell.label()}", flush=True)

    def measure(probe: Any) -> Any:
        if not check.budget.open("serve"):
            raise BudgetSpent
        t = time.monotonic()
        result = run_cell(backend, probe)
        row = check.record("serve", result)
        m = result.metrics or {}
        rate = probe.workload.load.rate_rps if probe.workload.load is not None else None
        print(
            f"    probe {'alone' if rate is None else f'{rate:8.3g} req/s'}: {result.status:7s} "
            f"achieved {m.get('achieved_rps', float('nan')):8.3g} req/s  n {len(result.traces):4d}  "
            f"TTFT p50 {ms(row, 'ttft_s_p50'):>9s}  E2E p50 {ms(row, 'e2e_s_p50'):>9s}  "
            f"({time.monotonic() - t:.1f} s)",
            flush=True,
        )
        return result

    try:
        outcome = find_saturation(cell, measure, curve=False)
    except BudgetSpent:
        summary.update(cut_by_budget=True, probes_run=len(check.rows["serve"]), knee_rps=None)
        check.not_run["serve"].append(f"{cell.label()} (search stopped after {len(check.rows['serve'])} probes)")
        print(f"  knee search stopped by the budget after {len(check.rows['serve'])} probes: no knee claimed")
        return
    row = check.record("serve", search_result(cell, outcome, started_at, time.perf_counter() - t0))
    summary.update(
        cut_by_budget=False,
        probes_run=len(check.rows["serve"]) - 1,
        search_cell_id=row["cell_id"],
        search_status=row["status"],
        **outcome.summary(),
    )
    print(
        f"  knee {outcome.knee_rps:.4g} req/s, saturation {outcome.saturation_rps:.4g} req/s achieved, "
        f"{len(outcome.probes)} probes ({outcome.stopped or 'bracketed'})",
        flush=True,
    )


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
        p = predict_cell(
            resolve_geometry(r["model"]),
            spec,
            int(r["concurrency"]),
            int(r["prompt_toks"]),
            int(r["gen_toks"]),
            dtype=r["dtype"],
            eff=eff,
        )
        out.append(
            {
                "model": r["model"],
                "concurrency": r["concurrency"],
                "prompt_toks": r["prompt_toks"],
                "ttft_err": p.ttft_s / r["ttft_s_p50"] - 1,
                "tpot_err": p.tpot_s / r["tpot_s_p50"] - 1,
            }
        )
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
        reasons = sorted({str(r["energy_reason"]) for r in rows if r.get("energy_reason")}) or ["no reason recorded"]
        return [f"energy: not measured — {'; '.join(reasons)}"]
    total = sum(r["energy_j"] for r in measured)
    out = [f"energy: {len(measured)} rows, {total:.1f} J in their measured windows ({measured[0]['energy_basis']})"]
    if whole_j is not None:
        out.append(f"  NVML counter over the whole run (loads, warmups, gaps included): {whole_j:.1f} J")
    return out


TELEMETRY_KEYS = ("energy_j", "j_per_output_tok", "power_avg_w", "power_peak_w", "gpu_util_mean", "cpu_util_mean",
                  "throttled", "telemetry_samples", "telemetry_interval_s", "energy_basis", "energy_reason",
                  "gpu_telemetry_reason", "telemetry_scope")  # fmt: skip


def telemetry_of(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Each row's telemetry/energy columns, by cell id (NaN → None, so check.json stays plain JSON)."""

    def plain(v: Any) -> Any:
        return None if isinstance(v, float) and v != v else v

    return {r["cell_id"]: {k: plain(r.get(k)) for k in TELEMETRY_KEYS} for r in rows}


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{title}")
    print(
        f"{'model':24s} {'backend':8s} {'c':>3s} {'P':>5s} {'status':8s} {'TTFT p50':>9s} {'TPOT p50':>9s} "
        f"{'tok/s':>7s} {'peak GiB':>8s} {'KV meas':>8s} {'KV err':>7s} {'J/tok':>7s} {'W avg':>6s} "
        f"{'util%':>5s} {'n':>4s}"
    )
    for r in rows:
        print(
            f"{r['model'][-24:]:24s} {r['backend']:8s} {r['concurrency']:>3d} {r['prompt_toks']:>5d} "
            f"{r['status']:8s} {num(r, 'ttft_s_p50', 1e3, '{:.1f}ms'):>9s} {num(r, 'tpot_s_p50', 1e3, '{:.2f}ms'):>9s} "
            f"{num(r, 'output_tps', 1, '{:.0f}'):>7s} {num(r, 'peak_allocated_bytes', 1 / GIB, '{:.2f}'):>8s} "
            f"{num(r, 'kv_measured_bytes', 1 / GIB, '{:.3f}'):>8s} {num(r, 'kv_rel_error', 100, '{:+.1f}%'):>7s} "
            f"{num(r, 'j_per_output_tok', 1, '{:.3g}'):>7s} {num(r, 'power_avg_w', 1, '{:.0f}'):>6s} "
            f"{num(r, 'gpu_util_mean', 1, '{:.0f}'):>5s} {r.get('requests', r['concurrency'] * r.get('repeats', 1))!s:>4s}"
        )


def begin(check: Check, stage: str) -> None:
    check.stages[stage] = {
        "started_s": round(check.budget.elapsed_s(), 2),
        "latest_start_s": round(check.budget.deadline_s(stage), 2),
    }
    print(
        f"\n[{stage}] at {check.budget.elapsed_s():.0f} s (starts new work until {check.budget.deadline_s(stage):.0f} s)",
        flush=True,
    )


def end(check: Check, stage: str) -> None:
    check.stages[stage].update(
        ended_s=round(check.budget.elapsed_s(), 2), rows=len(check.rows[stage]), not_run=check.not_run[stage]
    )
    check.writer.write_tables()  # the parquet/csv tables, once a stage (its rows are on disk already)
    write_summary(check, partial=True)


def versions() -> dict[str, str]:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def write_summary(check: Check, partial: bool, **extra: Any) -> dict[str, Any]:
    import torch

    rows = check.all_rows()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    summary = {
        "gpu": gpu,
        **versions(),
        "device": check.args.device,
        "dtype": check.args.dtype,
        "budget_s": check.args.budget_s,
        "wall_s": round(check.budget.elapsed_s(), 2),
        "partial": partial,
        "cells": len(rows),
        "rows_by_stage": {s: len(check.rows[s]) for s in STAGES},
        "not_run": [x for s in STAGES for x in check.not_run[s]],
        "stages": check.stages,
        "telemetry": telemetry_of(rows),
        **extra,
    }
    (check.out / "check.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    import torch

    from kvray.data.writer import DatasetWriter

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    out = Path(args.out) / ("gpu-check-smoke" if args.smoke else "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    v = versions()
    print(
        f"kvray GPU check — python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, {gpu}, "
        f"device {args.device}, {args.dtype}, stages {' '.join(args.stages)}, budget {args.budget_s:.0f} s → {out}"
    )
    check = Check(args, out, budget, DatasetWriter(out, tables=False))
    energy0 = nvml_energy_mj(args.device)
    if "grid" in args.stages:
        begin(check, "grid")
        stage_grid(check)
        end(check, "grid")
    if "overhead" in args.stages:
        if budget.open("overhead"):
            begin(check, "overhead")
            stage_overhead(check)
            end(check, "overhead")
        else:
            check.not_run["overhead"].append(f"overhead on {args.models[0]}")
    stage_paged_and_serve(check)
    energy1 = nvml_energy_mj(args.device)
    whole_j = (energy1 - energy0) / 1e3 if energy0 is not None and energy1 is not None else None

    grid = check.rows["grid"]
    errors = (
        roofline_error(grid, min(args.prompts), out / "calibration.json", args.assume_gpu)
        if len(args.prompts) > 1
        else []
    )
    print_table("grid (hf, static batches)", grid)
    print_table("paged (hf-paged, continuous batching)", check.rows["paged"])
    rows = check.all_rows()
    energy = energy_lines(rows, whole_j)
    print("\n" + "\n".join(energy))
    if errors:
        print(f"\nroofline after calibrating on prompt {min(args.prompts)} (predicted / measured − 1, p50s):")
        for e in errors:
            print(
                f"  {e['model'][-28:]:28s} c={e['concurrency']:<3d} P={e['prompt_toks']:<5d} "
                f"TTFT {e['ttft_err']:+.1%}  TPOT {e['tpot_err']:+.1%}"
            )
    not_run = [x for s in STAGES for x in check.not_run[s]]
    if not_run:
        print(f"\nnot run (time budget {args.budget_s:.0f} s): {len(not_run)} — {', '.join(not_run[:6])}…")
    check.writer.write_tables()
    summary = write_summary(
        check,
        partial=False,
        roofline_errors=errors,
        energy={
            "lines": energy,
            "whole_run_nvml_j": whole_j,
            "j_per_output_tok": {r["cell_id"]: r.get("j_per_output_tok") for r in rows},
        },
    )
    print(f"\n{len(rows)} rows in {summary['wall_s']:.0f} s; dataset and check.json in {out}")
    failed = [r["cell_id"] for r in rows if r["status"] not in ("ok", "oom", "refused")]
    if failed:
        print(f"rows that failed: {', '.join(failed)}")
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
