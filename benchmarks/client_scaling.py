"""Load generation over K client actors: constant-rate loads against one fast local stub server, sent by one kvray
client process (K = 1) or spread over K Ray actors (``clients: K``, kvray/backends/http/clients.py).

Usage:  uv run python benchmarks/client_scaling.py [--rates 50 100 200 400] [--clients 1 2 4] [--seconds 3]

The server is benchmarks/client_capacity.py's stub — raw asyncio HTTP/1.1 in a process of its own, streaming
``gen_toks`` SSE chunks back to back, no model — so what limits the rate is the client side: scheduling, HTTP, SSE
parsing, token timestamps. Each (K, rate) is one ``constant`` cell (equal gaps, ``rate × seconds`` requests, no
warmup, one repeat) after an unmeasured warm-up cell per K (actors started, imports, connections). Printed per cell:
offered and achieved req/s, TTFT p50, the client lag (sent − due) p99 over all requests and the worst client's, and
whether the row is flagged ``client_behind`` (p99 above min(50 ms, 10 % of the gap): kvray/measure/serving.py).
A K's higher rates are skipped once it achieves less than half the offered rate.
Results: docs/benchmarks.md, "Load generation over K client actors".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_capacity import serve  # noqa: E402


def measure(
    engine: Any, url: str, tokenizer: str, rate: float, seconds: float, gen_toks: int, clients: int
) -> dict[str, Any]:
    """One constant-rate cell sent from ``clients`` processes; its row."""
    from kvray.bench.cell import bench_cell
    from kvray.runner.run import run_cell

    requests = max(int(rate * seconds), 20)
    cell = bench_cell(
        "kvray/tiny-llama",
        prompt_toks=16,
        gen_toks=gen_toks,
        backend="openai",
        warmup=0,
        repeats=1,
        options={
            "base_url": url,
            "served_model": "stub",
            "tokenizer": tokenizer,
            "server_flavor": "openai",
            "metrics_interval_s": 0,
        },
        load={"kind": "constant", "rate": rate, "requests": requests},
        clients=clients,
    )
    result = run_cell(engine, cell, check_oom=False)
    row = result.to_row()
    row["failed"] = sum(t.status != "ok" for t in result.traces)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--gen-toks", type=int, default=8)
    args = parser.parse_args()
    from kvray.backends.http import OpenAIBackend
    from kvray.servers.model_dirs import build_word_tokenizer
    from kvray.servers.process import free_port
    from kvray.sweep.ray_env import shutdown, start_local_ray

    tokenizer = tempfile.mkdtemp(prefix="kvray-tok-")
    build_word_tokenizer(4096).save_pretrained(tokenizer)  # kvray/tiny-llama's vocabulary: builds the prompts
    port = free_port()
    stub = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    stub.start()
    started = time.time()
    start_local_ray(num_cpus=os.cpu_count() or 2)
    print(f"Ray started in {time.time() - started:.0f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1"
    load_start = os.getloadavg()
    print(
        f"stub server (pid {stub.pid}) + kvray caller (pid {os.getpid()}) + K client actors, all on this machine's "
        f"{os.cpu_count()} CPUs; constant loads, {args.seconds:g} s each, {args.gen_toks} streamed tokens per "
        f"request; load average {load_start[0]:.1f} / {load_start[1]:.1f} / {load_start[2]:.1f} at the start"
    )
    print(
        "| K | offered req/s | achieved req/s | TTFT p50 ms | lag p99 ms | lag p99 per client ms | "
        "clock offset max ms | failed | client_behind |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    engine = OpenAIBackend()
    try:
        for k in args.clients:
            measure(engine, url, tokenizer, 20.0, 1.0, args.gen_toks, k)  # unmeasured: actors, imports, connections
            for rate in args.rates:
                m = measure(engine, url, tokenizer, rate, args.seconds, args.gen_toks, k)
                per_client = "—"
                if k > 1:
                    lags = json.loads(m["client_lag_s_p99_by_client"])
                    per_client = ", ".join("—" if x is None else f"{x * 1e3:.1f}" for x in lags)
                offset = m.get("client_offset_s_max", float("nan")) * 1e3
                print(
                    f"| {k} | {rate:g} | {m['achieved_rps']:.1f} | {m['ttft_s_p50'] * 1e3:.2f} | "
                    f"{m['client_lag_s_p99'] * 1e3:.2f} | {per_client} | {offset:.3f} | {m['failed']} | "
                    f"{'yes' if m['client_behind'] else 'no'} |",
                    flush=True,
                )
                if not m["achieved_rps"] >= rate / 2:  # far past this K's limit: higher rates only take longer
                    break
    finally:
        engine.close()
        stub.terminate()
        shutdown()
    load_end = os.getloadavg()
    print(f"load average {load_end[0]:.1f} / {load_end[1]:.1f} / {load_end[2]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
