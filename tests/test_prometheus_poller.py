"""The /metrics poller against real HTTP servers on 127.0.0.1 whose /metrics is slow, missing or fine:
a slow scrape must not cost the cell its KV timeline, a server without metrics must stop the polling."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from kvray.servers import prometheus
from kvray.servers.prometheus import MetricsPoller

METRICS = (
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
)


def serve(delays_s: list[float], status: int = 200):
    """A /metrics server: the n-th answer waits delays_s[n] (the last delay repeats)."""
    calls: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            delay = delays_s[min(len(calls), len(delays_s) - 1)]
            calls.append(time.monotonic())
            time.sleep(delay)
            body = METRICS.encode() if status == 200 else b"not found"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics", calls


async def poll_for(url: str, run_s: float) -> MetricsPoller:
    async with httpx.AsyncClient() as client:
        poller = MetricsPoller(client, url, time.perf_counter(), interval_s=0.02)
        poller.start()
        await asyncio.sleep(run_s)
        await poller.stop()
        return poller


def test_a_scrape_that_times_out_does_not_stop_the_polling(monkeypatch):
    monkeypatch.setattr(prometheus, "SCRAPE_TIMEOUT_S", 0.2)
    server, url, calls = serve([0.5, 0.0])  # the first answer comes after the client gave up on it
    try:
        poller = asyncio.run(poll_for(url, 1.0))
    finally:
        server.shutdown()
    assert poller.available is True and len(calls) > 3
    busy = [p for p in poller.points if p["running"] == 4.0]
    assert len(busy) >= 3 and busy[0]["kv_usage"] == 0.25


def test_a_scrape_in_flight_when_the_run_ends_still_lands():
    server, url, calls = serve([0.4])  # every answer is slower than the whole run
    try:
        poller = asyncio.run(poll_for(url, 0.1))
    finally:
        server.shutdown()
    # the scrape asked for at t≈0 (during the run) and the one after the run
    assert [p["running"] for p in poller.points] == [4.0, 4.0] and poller.points[0]["sent_s"] < 0.05
    # each point is stamped when its answer arrived, 0.4 s after it was asked for, with the round trip kept
    for p in poller.points:
        assert p["rtt_s"] >= 0.4 and abs(p["t_s"] - p["sent_s"] - p["rtt_s"]) < 1e-5


def test_points_are_stamped_when_the_answer_arrives():
    server, url, calls = serve([0.15])  # every answer takes 150 ms: a busy server's event loop
    try:
        poller = asyncio.run(poll_for(url, 0.6))
    finally:
        server.shutdown()
    assert len(poller.points) >= 2
    for p in poller.points:
        assert 0.15 <= p["rtt_s"] < 1.0 and p["t_s"] >= p["sent_s"] + 0.15
    # consecutive answers are at least one answer time plus the interval apart: stamps follow the answers
    stamps = [p["t_s"] for p in poller.points]
    assert all(b - a >= 0.15 for a, b in zip(stamps, stamps[1:], strict=False))


def test_prefix_cache_counter_deltas():
    from kvray.servers.prometheus import counter_deltas, parse

    before = parse(
        'vllm:prefix_cache_hits_total{engine="0"} 256.0\nvllm:prefix_cache_queries_total{engine="0"} 512.0\n'
    )
    after = parse(
        'vllm:prefix_cache_hits_total{engine="0"} 384.0\nvllm:prefix_cache_queries_total{engine="0"} 1024.0\n'
        'vllm:prefix_cache_hits_created{engine="0"} 1.7e9\n'
    )
    assert counter_deltas(before, after) == {"prefix_cache_hits": 128, "prefix_cache_queries": 512}
    assert counter_deltas(None, after) == {} and counter_deltas(before, parse("other 1\n")) == {}


@pytest.mark.parametrize("status", [404, 500])
def test_a_server_without_metrics_is_asked_once(status):
    server, url, calls = serve([0.0], status=status)
    try:
        poller = asyncio.run(poll_for(url, 0.5))
    finally:
        server.shutdown()
    assert poller.available is False and poller.points == [] and len(calls) == 1
