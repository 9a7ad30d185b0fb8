"""What measuring costs: the same workload through ``run_cell`` (timestamps, memory sampling, metrics) and
through a bare ``model.generate`` loop, alternating in one process on one loaded model.

    uv run python benchmarks/overhead.py [--model facebook/opt-125m] [--device cpu] [--dtype fp32]
                                         [--concurrency 4] [--prompt-toks 128] [--gen-toks 16] [--rounds 15]

Prints the median wall time of each and their ratio — the median of per-round ratios, robust to a machine
whose load drifts (target: runner / bare ≤ 1.03). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvray.backends.hf import TORCH_DTYPES, HFBackend
from kvray.bench.runner import run_cell
from kvray.spec import Cell, Workload


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

    workload = Workload.uniform(args.concurrency, args.prompt_toks, args.gen_toks)
    cell = Cell(model=args.model, workload=workload, dtype=args.dtype, device=args.device, warmup=0, repeats=1)
    backend = HFBackend()
    backend.load(cell)
    model, device = backend.model, backend.device
    assert next(model.parameters()).dtype == getattr(torch, TORCH_DTYPES[backend.dtype])
    ids = backend._prompts(cell, workload.requests, 0)
    batch = torch.stack([ids[r.id] for r in workload.requests])

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    def bare() -> tuple[float, float]:
        x = batch.to(device)
        sync()
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.gen_toks,
                                 min_new_tokens=args.gen_toks, do_sample=False, pad_token_id=backend._pad_id)  # fmt: skip
        sync()
        assert out.shape[1] == args.prompt_toks + args.gen_toks
        return time.perf_counter() - t, time.process_time() - c

    def runner() -> tuple[float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        result = run_cell(backend, cell, check_oom=False)
        sync()
        assert result.status == "ok" and all(tr.output_toks == args.gen_toks for tr in result.traces), result.reason
        return time.perf_counter() - t, time.process_time() - c

    bare(), runner()  # warm both paths
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "runner": []}
    for i in range(args.rounds):
        order = (("bare", bare), ("runner", runner))
        for name, fn in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            times[name].append(fn())
    print(f"model {args.model} on {device} ({args.dtype}, {torch.get_num_threads()} CPU threads), "
          f"{args.concurrency} × {args.prompt_toks} → {args.gen_toks}, {args.rounds} rounds")  # fmt: skip
    for k, label in ((0, "wall"), (1, "CPU")):
        b = [x[k] for x in times["bare"]]
        r = [x[k] for x in times["runner"]]
        paired = statistics.median(x / y for x, y in zip(r, b, strict=True))
        print(f"{label:>4}: bare median {statistics.median(b) * 1e3:8.1f} ms (min {min(b) * 1e3:.1f}), "
              f"run_cell median {statistics.median(r) * 1e3:8.1f} ms (min {min(r) * 1e3:.1f}); "
              f"ratio: paired median {paired:.3f}, min/min {min(r) / min(b):.3f}")  # fmt: skip
    print("target: run_cell / bare ≤ 1.03")


if __name__ == "__main__":
    main()
