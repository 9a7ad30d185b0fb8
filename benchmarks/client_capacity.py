"""How many requests/s one kvray client process sustains: constant-rate loads against a server that answers
at once, through the openai backend, until the client falls behind its own schedule.

Usage:  uv run python benchmarks/client_capacity.py [--rates 25 50 100 200 400 800] [--seconds 4] [--gen-toks 8]

The server is a stub, not a model: a raw asyncio HTTP/1.1 server in its own process (so it does not share the
client's event loop or GIL) that answers ``/v1/models`` and streams ``/v1/completions`` as ``gen_toks`` SSE
chunks written back to back, then usage and ``[DONE]``; ``/metrics`` is a 404, as on a server without one. So
whatever limits the rate is kvray's client: scheduling, HTTP, SSE parsing, token timestamps.

For each rate the load is ``constant`` (equal gaps: the strictest schedule) with ``rate × seconds`` requests;
the table prints the achieved rate, the client's lag p50/p99/max (sent − due, per request, over n steady
requests) against the documented limit (kvray/measure/serving.py: p99 ≤ min(50 ms, 10 % of the gap)), and
whether the row is flagged ``client_behind``. The sustained rate is the highest one not flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from typing import Any


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive HTTP/1.1: each request answered whole before the next is read."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next(
                (int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length"), 0
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path.startswith("/v1/models"):
                payload = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(payload)).encode()
                    + b"\r\n\r\n"
                    + payload
                )
            elif path.startswith("/v1/completions") and method == "POST":
                n = int(body.get("max_tokens") or 8)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(n):
                    event = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
                    _chunk(writer, b"data: " + json.dumps(event).encode() + b"\n\n")
                usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
                last = {"id": "c", "object": "text_completion", "choices": [], "usage": usage}
                _chunk(writer, b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def serve(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def measure(url: str, model_path: str, rate: float, seconds: float, gen_toks: int) -> dict[str, Any]:
    """One constant-rate cell through the openai backend, in this process; its row's serving columns."""
    from kvray.backends import get_backend
    from kvray.bench.cell import bench_cell
    from kvray.runner.run import run_cell

    requests = max(int(rate * seconds), 20)
    cell = bench_cell(
        model_path,
        prompt_toks=16,
        gen_toks=gen_toks,
        backend="openai",
        warmup=0,
        repeats=1,
        options={"base_url": url, "served_model": "stub", "tokenizer": model_path},
        load={"kind": "constant", "rate": rate, "requests": requests},
    )
    engine = get_backend("openai")
    try:
        return run_cell(engine, cell, check_oom=False).metrics
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100, 200, 400, 800])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--gen-toks", type=int, default=8)
    args = parser.parse_args()
    from kvray.servers.model_dirs import servable_model_dir
    from kvray.servers.process import free_port

    model_path = str(servable_model_dir("kvray/tiny-llama", "fp32"))  # its tokenizer builds the prompts
    port = free_port()
    stub = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    stub.start()
    time.sleep(1.0)
    url = f"http://127.0.0.1:{port}/v1"
    print(
        f"kvray client (pid {os.getpid()}, one process) → stub server (pid {stub.pid}); constant loads, "
        f"{args.seconds:g} s each, {args.gen_toks} streamed tokens per request; {os.cpu_count()} CPUs here, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    print(
        f"{'offered/s':>9} {'achieved/s':>10} {'lag p50 ms':>10} {'lag p99 ms':>10} {'lag max ms':>10} "
        f"{'n':>5} {'limit ms':>8}  behind"
    )
    best = None
    try:
        measure(url, model_path, 5.0, 2.0, args.gen_toks)  # unmeasured: imports, tokenizer, connection pool
        for rate in args.rates:
            m = measure(url, model_path, rate, args.seconds, args.gen_toks)
            behind = bool(m.get("client_behind"))
            print(
                f"{rate:>9g} {m['achieved_rps']:>10.1f} {m['client_lag_s_p50'] * 1e3:>10.2f} "
                f"{m['client_lag_s_p99'] * 1e3:>10.2f} {m['client_lag_s_max'] * 1e3:>10.2f} "
                f"{m['client_lag_s_n']:>5} {m['client_lag_limit_s'] * 1e3:>8.2f}  {'yes' if behind else 'no'}",
                flush=True,
            )
            if not behind:
                best = rate
    finally:
        stub.terminate()
    print(f"highest rate not flagged client_behind: {best:g} req/s" if best else "every rate fell behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
