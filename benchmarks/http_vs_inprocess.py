"""What HTTP adds on top of the engine: the same continuous-batching engine in-process (hf-paged) and behind
`transformers serve --continuous-batching` (the openai backend), same tiny model, cache and workload.

    uv run python benchmarks/http_vs_inprocess.py [--concurrency 4] [--prompt-toks 128] [--gen-toks 32]

Prints p50 TTFT / TPOT / ITL / E2E and output tokens/s of both and their ratios, measured in one run. Token
counts must match exactly (the script fails otherwise); timings differ by the HTTP round trip, server-side
tokenisation and the server's own scheduling. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers_fixtures import build_tiny_model_dir, start_transformers_serve  # noqa: E402

from kvray.backends.hf_paged import HFPagedBackend  # noqa: E402
from kvray.backends.http import OpenAIBackend  # noqa: E402
from kvray.runner.run import run_cell  # noqa: E402
from kvray.spec import Cell, Workload, make_options  # noqa: E402

KEYS = ("ttft_s_p50", "tpot_s_p50", "itl_s_p50", "e2e_s_p50", "output_tps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-toks", type=int, default=128)
    parser.add_argument("--gen-toks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs (the engine's first batches are slow)")
    args = parser.parse_args()
    workload = Workload.uniform(args.concurrency, args.prompt_toks, args.gen_toks)
    with tempfile.TemporaryDirectory(prefix="kvray-bench-") as tmp:
        model_dir = build_tiny_model_dir(Path(tmp))
        # the server's cache: 64 blocks of 256 tokens, 256 tokens per batch — the same for the in-process engine
        paged = Cell(
            model=str(model_dir),
            workload=workload,
            backend="hf-paged",
            dtype="fp32",
            device="cpu",
            warmup=args.warmup,
            repeats=args.repeats,
            options=make_options(num_blocks=64, max_batch_tokens=256),
        )
        engine = HFPagedBackend()
        try:
            inproc = run_cell(engine, paged, check_oom=False)
        finally:
            engine.close()
        server = start_transformers_serve(model_dir, continuous_batching=True)
        try:
            http_cell = Cell(
                model=str(model_dir),
                workload=workload,
                backend="openai",
                dtype="fp32",
                warmup=args.warmup,
                repeats=args.repeats,
                options=make_options(base_url=server.base_url),
            )
            http = run_cell(OpenAIBackend(), http_cell)
        finally:
            server.stop()
    for r in (inproc, http):
        if r.status != "ok":
            sys.exit(f"{r.cell.backend}: {r.status} {r.reason}")
    counts = [sorted((t.prompt_toks, t.output_toks) for t in r.traces) for r in (inproc, http)]
    if counts[0] != counts[1]:
        sys.exit(f"token counts differ: in-process {counts[0][:3]}… vs HTTP {counts[1][:3]}…")
    print(
        f"tiny-llama fp32, {args.concurrency} × {args.prompt_toks} prompt + {args.gen_toks} generated, "
        f"{args.warmup} warmup + {args.repeats} repeats; token counts identical ({len(counts[0])} requests)"
    )
    print(f"{'metric':<12} {'in-process':>12} {'HTTP':>12} {'HTTP / in':>10} {'HTTP − in':>11}")
    for key in KEYS:
        a, b = inproc.metrics[key], http.metrics[key]
        scale, unit = (1.0, "") if key == "output_tps" else (1e3, " ms")
        print(f"{key:<12} {a * scale:>12.2f} {b * scale:>12.2f} {b / a:>10.2f} {(b - a) * scale:>8.2f}{unit}")


if __name__ == "__main__":
    main()
