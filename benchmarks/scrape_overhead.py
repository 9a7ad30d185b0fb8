"""What scraping /metrics costs the server: TPOT with the KV timeline off and at two scrape intervals, same vLLM.

    uv run python benchmarks/scrape_overhead.py [--rounds 5] [--concurrency 4] [--prompt-toks 64] [--gen-toks 64]
        [--intervals 0.5 0.1] [--vllm-python PY]

vLLM's API server answers /metrics on the event loop that streams the tokens, so every scrape takes a slice of
the loop (and, on a CPU build, of the cores decoding). One vLLM server (its CPU build unless --vllm-python points
elsewhere) serves every run; the modes are interleaved round by round (off, each interval, off, …) so that
drift in the machine's load falls on all of them alike. Each run is one measured repeat of the same cell shape
with fresh prompts; per mode the script prints the median over rounds of the per-run TPOT p50 (and ITL p50),
and its change against "off". Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers_fixtures import DEFAULT_VLLM_VENV, build_tiny_model_dir  # noqa: E402

from kvray.backends.vllm import VLLMBackend  # noqa: E402
from kvray.runner.run import run_cell  # noqa: E402
from kvray.spec import Cell, Workload, make_options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-toks", type=int, default=64)
    parser.add_argument("--gen-toks", type=int, default=64)
    parser.add_argument("--intervals", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument(
        "--vllm-python", default=os.environ.get("KVRAY_VLLM_PYTHON") or str(DEFAULT_VLLM_VENV / "bin" / "python")
    )
    args = parser.parse_args()
    modes = [0.0, *args.intervals]  # 0: no scraping during the run
    workload = Workload.uniform(args.concurrency, args.prompt_toks, args.gen_toks)
    tpot: dict[float, list[float]] = {m: [] for m in modes}
    itl: dict[float, list[float]] = {m: [] for m in modes}
    scrapes: dict[float, list[int]] = {m: [] for m in modes}
    backend = VLLMBackend()
    with tempfile.TemporaryDirectory(prefix="kvray-bench-") as tmp:
        model_dir = build_tiny_model_dir(Path(tmp))
        try:
            for rnd in range(args.rounds):
                for mode in modes:
                    cell = Cell(
                        model=str(model_dir),
                        workload=workload,
                        backend="vllm",
                        dtype="fp32",
                        device="cpu",
                        warmup=1 if rnd == 0 else 0,
                        repeats=1,
                        experiment=f"scrape-{rnd}",
                        options=make_options(vllm_python=args.vllm_python, metrics_interval_s=mode),
                    )
                    r = run_cell(backend, cell)
                    if r.status != "ok":
                        sys.exit(f"interval {mode}: {r.status} {r.reason}")
                    tpot[mode].append(r.metrics["tpot_s_p50"])
                    itl[mode].append(r.metrics["itl_s_p50"])
                    # points during the run (the last one of each run is the untimed scrape after it)
                    scrapes[mode].append(max(len(r.extra.get("kv_timeline") or []) - 1, 0))
        finally:
            backend.close()
    off = statistics.median(tpot[0.0])
    print(
        f"vLLM CPU build, tiny Llama fp32, {args.concurrency} × {args.prompt_toks} → {args.gen_toks} tokens, "
        f"{args.rounds} interleaved rounds, median over rounds of each run's p50"
    )
    print(f"{'scrape interval':>16} | {'scrapes/run':>11} | {'TPOT p50':>9} | {'ITL p50':>8} | vs off")
    for mode in modes:
        med = statistics.median(tpot[mode])
        label = "off" if mode == 0 else f"{mode:g} s"
        print(
            f"{label:>16} | {statistics.median(scrapes[mode]):>11.0f} | {med * 1e3:>6.2f} ms | "
            f"{statistics.median(itl[mode]) * 1e3:>5.2f} ms | {(med / off - 1) * 100:+.1f} %"
        )
    print(
        "per-run TPOT p50 (ms): "
        + "; ".join(
            f"{'off' if m == 0 else f'{m:g} s'}: " + ", ".join(f"{v * 1e3:.1f}" for v in tpot[m]) for m in modes
        )
    )


if __name__ == "__main__":
    main()
