"""What measuring costs: the same workload through ``run_cell`` (timestamps, memory sampling, metrics) and
through a bare ``model.generate`` loop, alternating in one process on one loaded model.

    python3 benchmarks/overhead.py [--model facebook/opt-125m] [--device cpu] [--dtype fp32]
                                   [--concurrency 4] [--prompt-toks 128] [--gen-toks 16] [--rounds 15]

Prints the median wall time of each and their ratio — the median of per-round ratios, robust to a machine
whose load drifts (target: runner / bare ≤ 1.03). Results: docs/benchmarks.md. Run from the repo root (kvray is
imported from this checkout, installed or not); benchmarks/gpu_check.py calls ``measure_overhead`` on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kvray from this checkout, installed or not


def measure_overhead(
    model_id: str = "facebook/opt-125m",
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    concurrency: int = 4,
    prompt_toks: int = 128,
    gen_toks: int = 16,
    rounds: int = 15,
) -> dict[str, Any]:
    """Both paths on one loaded model, ``rounds`` alternating pairs after one warm-up of each: the medians of
    wall and CPU (this process's ``process_time``) seconds and the median of the per-round ratios."""
    import torch

    from kvray.backends.hf import TORCH_DTYPES, HFBackend
    from kvray.runner.run import run_cell
    from kvray.spec import Cell, Workload

    workload = Workload.uniform(concurrency, prompt_toks, gen_toks)
    cell = Cell(model=model_id, workload=workload, dtype=dtype, device=device, warmup=0, repeats=1)
    backend = HFBackend()
    try:
        backend.load(cell)
        model, on = backend.model, backend.device
        assert next(model.parameters()).dtype == getattr(torch, TORCH_DTYPES[backend.dtype])
        ids = backend._prompts(cell, workload.requests, 0)
        batch = torch.stack([ids[r.id] for r in workload.requests])

        def sync() -> None:
            if on.startswith("cuda"):
                torch.cuda.synchronize(on)

        def bare() -> tuple[float, float]:
            x = batch.to(on)
            sync()
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=gen_toks,
                    min_new_tokens=gen_toks,
                    do_sample=False,
                    pad_token_id=backend._pad_id,
                )
            sync()
            assert out.shape[1] == prompt_toks + gen_toks
            return time.perf_counter() - t, time.process_time() - c

        def runner() -> tuple[float, float]:
            sync()
            t, c = time.perf_counter(), time.process_time()
            result = run_cell(backend, cell, check_oom=False)
            sync()
            assert result.status == "ok" and all(tr.output_toks == gen_toks for tr in result.traces), result.reason
            return time.perf_counter() - t, time.process_time() - c

        bare(), runner()  # warm both paths
        times: dict[str, list[tuple[float, float]]] = {"bare": [], "runner": []}
        for i in range(rounds):
            order = (("bare", bare), ("runner", runner))
            for name, fn in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                times[name].append(fn())
    finally:
        backend.close()
    summary: dict[str, Any] = {
        "model": model_id,
        "device": on,
        "dtype": backend.dtype,
        "concurrency": concurrency,
        "prompt_toks": prompt_toks,
        "gen_toks": gen_toks,
        "rounds": rounds,
        "cpu_threads": torch.get_num_threads(),
    }
    for k, label in ((0, "wall"), (1, "cpu")):
        b = [x[k] for x in times["bare"]]
        r = [x[k] for x in times["runner"]]
        summary[f"{label}_bare_median_s"] = statistics.median(b)
        summary[f"{label}_runner_median_s"] = statistics.median(r)
        summary[f"{label}_bare_min_s"], summary[f"{label}_runner_min_s"] = min(b), min(r)
        summary[f"{label}_ratio_paired_median"] = statistics.median(x / y for x, y in zip(r, b, strict=True))
    return summary


def report_lines(s: dict[str, Any]) -> list[str]:
    """The printed form: one header line, then wall and CPU."""
    lines = [
        f"model {s['model']} on {s['device']} ({s['dtype']}, {s['cpu_threads']} CPU threads), "
        f"{s['concurrency']} × {s['prompt_toks']} → {s['gen_toks']}, {s['rounds']} rounds"
    ]
    for label in ("wall", "cpu"):
        lines.append(
            f"{'wall' if label == 'wall' else 'CPU':>4}: bare median {s[f'{label}_bare_median_s'] * 1e3:8.1f} ms "
            f"(min {s[f'{label}_bare_min_s'] * 1e3:.1f}), run_cell median {s[f'{label}_runner_median_s'] * 1e3:8.1f} ms "
            f"(min {s[f'{label}_runner_min_s'] * 1e3:.1f}); ratio: paired median {s[f'{label}_ratio_paired_median']:.3f}, "
            f"min/min {s[f'{label}_runner_min_s'] / s[f'{label}_bare_min_s']:.3f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="facebook/opt-125m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--prompt-toks", type=int, default=128)
    ap.add_argument("--gen-toks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least sensitive to other load)")
    args = ap.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    summary = measure_overhead(
        args.model,
        device=args.device,
        dtype=args.dtype,
        concurrency=args.concurrency,
        prompt_toks=args.prompt_toks,
        gen_toks=args.gen_toks,
        rounds=args.rounds,
    )
    print("\n".join(report_lines(summary)))
    print("target: run_cell / bare ≤ 1.03")


if __name__ == "__main__":
    main()
