"""The OpenAI-compatible HTTP backend against a real `transformers serve` on 127.0.0.1 (tiny Llama, word-level
tokenizer built offline), plus every failure a request can meet. Fakes (servers_fixtures.FakeOpenAIServer) stand
in only for malformed streams and HTTP errors a real server cannot be made to produce."""

from __future__ import annotations

import json
import math

import pytest
from servers_fixtures import DOUBLE_GAP_S, FakeOpenAIServer, build_tiny_model_dir, start_transformers_serve

from kvray.backends.hf import HFBackend
from kvray.backends.hf_paged import HFPagedBackend
from kvray.backends.http import Chunk, OpenAIBackend, PromptBuilder, load_tokenizer, token_times
from kvray.data.writer import DatasetWriter
from kvray.measure.metrics import itl_gaps
from kvray.runner.run import run_cell
from kvray.servers.process import free_port
from kvray.spec import Cell, Workload, make_options


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def transformers_server(model_dir):
    proc = start_transformers_serve(model_dir, continuous_batching=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend():
    b = OpenAIBackend()
    yield b
    b.close()


def http_cell(model_dir, url, workload, warmup=1, repeats=1, **options):
    return Cell(
        model=str(model_dir),
        workload=workload,
        backend="openai",
        dtype="fp32",
        warmup=warmup,
        repeats=repeats,
        options=make_options(base_url=url, **options),
    )


def test_streams_exact_counts_from_a_real_transformers_serve(backend, model_dir, transformers_server):
    cell = http_cell(model_dir, transformers_server.base_url, Workload.uniform(4, 32, 16), repeats=2)
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    assert result.extra["server_flavor"] == "transformers"  # probed: it rejects vLLM's fields with 422
    assert len(result.traces) == 8
    for t in result.traces:
        assert (t.prompt_toks, t.output_toks, len(t.token_times_s)) == (32, 16, 16)  # from usage, exact
        assert t.token_times_s == sorted(t.token_times_s) and t.start_s < t.token_times_s[0] <= t.end_s
        assert len(set(t.token_times_s)) == 16  # a word-level tokenizer: one token per streamed chunk
    assert result.metrics["requests_ok"] == 8 and result.metrics["itl_s_p50"] > 0
    assert "kv_timeline" not in result.extra  # transformers serve has no /metrics: nothing scraped, no crash


def test_two_client_actors_against_a_real_transformers_serve_count_every_token(
    backend,
    model_dir,
    transformers_server,
    ray_session,
):
    """Issue #18 item 4 against a real model server: K = 2 Ray client actors share a burst of 4 requests; each
    request is answered once, with the exact token counts the server's usage reports, and the row says which
    client sent what."""
    cell = http_cell(model_dir, transformers_server.base_url, Workload.uniform(4, 32, 12), warmup=1, repeats=1)
    from dataclasses import replace

    two = run_cell(backend, replace(cell, clients=2))
    assert two.status == "ok", two.reason
    assert sorted(t.request_id for t in two.traces) == [0, 1, 2, 3]
    assert sorted(t.client for t in two.traces) == [0, 0, 1, 1]
    for t in two.traces:
        assert (t.prompt_toks, t.output_toks, len(t.token_times_s)) == (32, 12, 12)
        assert 0 <= t.sent_s < t.token_times_s[0] <= t.end_s
    row = two.to_row()
    assert row["clients"] == 2 and json.loads(row["client_requests_by_client"]) == [2, 2]
    assert row["client_offset_s_max"] <= row["client_rtt_s_max"] / 2 + 1e-6


def test_a_closed_loop_over_http_sends_each_users_next_request_when_its_stream_ends(
    backend, model_dir, transformers_server
):
    """Issue #14: a closed loop against a real server — 2 users × 4 requests; each request is due the moment its
    user's previous stream ended and is sent then (the client's lag recorded), and only 2 are ever in flight."""
    from kvray.plan.loads import build_workload
    from kvray.spec import LoadSpec

    wl = build_workload(LoadSpec("closed", users=2, requests=8), 16, 6, slo={"e2e_ms": 60_000})
    result = run_cell(backend, http_cell(model_dir, transformers_server.base_url, wl, warmup=0))
    assert result.status == "ok", result.reason
    traces = {t.request_id: t for t in result.traces}
    for r in wl.requests:
        t = traces[r.id]
        assert t.sent_s is not None and 0 <= t.sent_s - t.arrival_s < 0.5
        if r.after is not None:
            assert t.arrival_s == pytest.approx(traces[r.after].end_s, abs=1e-6)
    in_flight = max(sum(t.sent_s <= x < t.end_s for t in traces.values()) for x in (t.sent_s for t in traces.values()))
    assert in_flight == 2
    m = result.metrics
    assert m["requests_steady"] == 4 and m["client_lag_s_n"] == 8 and m["slo_attainment"] == 1.0


def test_chat_endpoint_counts_the_template_in_the_prompt(backend, model_dir, transformers_server):
    cell = http_cell(model_dir, transformers_server.base_url, Workload.uniform(2, 24, 8), endpoint="chat")
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    assert [(t.prompt_toks, t.output_toks) for t in result.traces] == [(24, 8), (24, 8)]


def test_token_counts_match_the_in_process_backends_and_timings_differ_by_http_only(
    backend, model_dir, transformers_server
):
    """Same model, same workload: the server's usage equals what hf / hf-paged count in-process; the HTTP
    timings sit on the same engine cadence (measured ratios: benchmarks/http_vs_inprocess.py)."""
    workload = Workload.uniform(4, 32, 16)
    http = run_cell(backend, http_cell(model_dir, transformers_server.base_url, workload, repeats=2))
    results = {"openai": http}
    for name, engine in (("hf", HFBackend()), ("hf-paged", HFPagedBackend())):
        cell = Cell(
            model=str(model_dir), workload=workload, backend=name, dtype="fp32", device="cpu", warmup=1, repeats=2
        )
        try:
            results[name] = run_cell(engine, cell, check_oom=False)
        finally:
            engine.close()
    counts = {name: sorted((t.prompt_toks, t.output_toks) for t in r.traces) for name, r in results.items()}
    assert counts["openai"] == counts["hf"] == counts["hf-paged"] == [(32, 16)] * 8  # 4 requests × 2 repeats
    for r in results.values():
        assert r.status == "ok" and r.metrics["output_toks_total"] == 128

    # transformers serve runs the same continuous-batching engine as hf-paged: requests in the running batch
    # decode in lockstep, one token each per engine step, however long the machine's load makes a step. HTTP
    # only delivers each step's tokens over 4 connections, so on the client's clock, while all four streams are
    # running (from the last first token to the first last token), each stream receives the same number of
    # tokens, give or take the step in flight at each edge. A request admitted late (its connection set up
    # under load) only shortens that window. Streams read one after another (requests not really in flight
    # together) leave no window at all, chunks stamped in bulk when read leave fewer than 16 distinct times, and
    # a stream cut short by token accounting ends before its last chunk; each fails here, with no timing margin
    # that a loaded machine could exceed.
    for result in (http, results["hf-paged"]):
        for repeat in (0, 1):
            times = [t.token_times_s for t in result.traces if t.repeat == repeat]
            start, end = max(ts[0] for ts in times), min(ts[-1] for ts in times)
            in_window = [sum(start <= t <= end for t in ts) for ts in times]
            assert min(in_window) >= 6 and max(in_window) - min(in_window) <= 2, (result.cell.backend, in_window)
    for t in http.traces:  # one chunk per token, and the stream ends with its last token (usage, [DONE])
        assert len(set(t.token_times_s)) == 16 and t.token_times_s == sorted(t.token_times_s)
        assert 0 <= t.end_s - t.token_times_s[-1] < 0.5, (t.end_s, t.token_times_s)
    assert http.extra["ttft_basis"] == "client-http" and results["hf-paged"].extra["ttft_basis"] == "engine"
    ttfts = (http.metrics["ttft_s_p50"], results["hf-paged"].metrics["ttft_s_p50"])
    assert ttfts[0] - ttfts[1] < 1.0, ttfts


def test_a_refused_connection_is_a_recorded_error_per_request(backend, model_dir):
    cell = http_cell(model_dir, f"http://127.0.0.1:{free_port()}", Workload.uniform(3, 8, 4), warmup=0)
    result = run_cell(backend, cell)
    assert result.status == "error" and "connection refused" in (result.reason or "")
    assert [t.status for t in result.traces] == ["error"] * 3
    assert all("connection refused" in (t.error or "") for t in result.traces)


def test_a_request_past_its_timeout_is_a_recorded_error(backend, model_dir, transformers_server):
    cell = http_cell(
        model_dir,
        transformers_server.base_url,
        Workload.uniform(2, 8, 100),
        warmup=0,
        timeout_s=0.05,
        server_flavor="transformers",
    )
    result = run_cell(backend, cell)
    assert result.status == "error"
    assert all(t.status == "error" and t.error.startswith("timeout after 0.05 s") for t in result.traces)


def test_a_real_http_error_status_is_recorded_with_the_servers_reason(backend, model_dir, transformers_server):
    # transformers serve answers 422 to fields it does not know: a real error from a real server.
    cell = http_cell(model_dir, transformers_server.base_url, Workload.uniform(1, 8, 4), warmup=0, server_flavor="vllm")
    trace = run_cell(backend, cell).traces[0]
    assert trace.status == "error" and trace.error.startswith("HTTP 422") and "ignore_eos" in trace.error
    cell = http_cell(
        model_dir,
        transformers_server.base_url,
        Workload.uniform(1, 8, 4),
        warmup=0,
        server_flavor="transformers",
        extra_body='{"kvray_bogus_field": 1}',
    )
    trace = run_cell(backend, cell).traces[0]
    assert trace.status == "error" and "kvray_bogus_field" in trace.error


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("garbage", "malformed stream: invalid JSON"),
        ("nousage", "malformed stream: it ended without usage"),
        ("cut", "malformed stream"),
        ("http500", "HTTP 500"),
    ],
)
def test_malformed_streams_and_server_errors_from_a_fake_server(backend, model_dir, mode, expected):
    with FakeOpenAIServer() as fake:
        cell = http_cell(model_dir, f"{fake.url}/{mode}", Workload.uniform(2, 8, 4), warmup=0)
        result = run_cell(backend, cell)
    assert result.status == "error"
    assert all(t.status == "error" and expected in (t.error or "") for t in result.traces), result.traces


def test_a_failed_request_counts_tokens_not_chunks(backend, model_dir):
    """Issue #12 item 16: a stream cut after two chunks of two tokens each got 4 tokens, not 2."""
    with FakeOpenAIServer() as fake:
        cell = http_cell(model_dir, f"{fake.url}/cutdouble", Workload.uniform(1, 8, 8), warmup=0)
        trace = run_cell(backend, cell).traces[0]
    assert trace.status == "error" and "malformed stream" in (trace.error or "")
    assert trace.output_toks == 4 and len(trace.token_times_s) == 4
    # the two tokens of a chunk share its arrival time
    assert trace.token_times_s[0] == trace.token_times_s[1] and trace.token_times_s[2] == trace.token_times_s[3]


def test_a_multi_token_chunk_shares_its_timestamp_and_the_gaps_are_split(backend, model_dir):
    with FakeOpenAIServer() as fake:  # its first chunk carries two words (two tokens)
        result = run_cell(backend, http_cell(model_dir, f"{fake.url}/ok", Workload.uniform(1, 8, 5), warmup=0))
    trace = result.traces[0]
    assert trace.status == "ok" and trace.output_toks == 5
    assert trace.token_times_s[0] == trace.token_times_s[1] < trace.token_times_s[2]
    gaps = itl_gaps(trace.token_times_s)
    assert (
        len(gaps) == 4 and gaps[0] == 0.0 and math.isclose(sum(gaps), trace.token_times_s[-1] - trace.token_times_s[0])
    )


def test_the_api_key_is_sent_from_the_environment_and_never_stored(backend, model_dir, tmp_path, monkeypatch):
    secret = "sk-kvray-test-1234567890"
    monkeypatch.setenv("KVRAY_TEST_KEY", secret)
    with FakeOpenAIServer(expected_key=secret) as fake:
        ok = run_cell(
            backend,
            http_cell(model_dir, f"{fake.url}/auth", Workload.uniform(1, 8, 3), warmup=0, api_key_env="KVRAY_TEST_KEY"),
        )
        monkeypatch.setenv("KVRAY_TEST_KEY", "wrong")
        denied = run_cell(
            backend,
            http_cell(model_dir, f"{fake.url}/auth", Workload.uniform(1, 8, 3), warmup=0, api_key_env="KVRAY_TEST_KEY"),
        )
        seen = [h.get("Authorization") for h in fake.seen_headers]
    assert ok.status == "ok" and f"Bearer {secret}" in seen
    assert denied.traces[0].status == "error" and denied.traces[0].error.startswith("HTTP 401")
    writer = DatasetWriter(tmp_path / "results")
    writer.append(ok)
    for path in (tmp_path / "results").rglob("*"):  # every file, the dataset's parts/ folder included
        if path.is_file():
            assert secret not in path.read_bytes().decode(errors="replace"), path
    assert secret not in json.dumps(ok.to_dict())
    monkeypatch.delenv("KVRAY_TEST_KEY")
    missing = run_cell(
        backend, http_cell(model_dir, fake.url, Workload.uniform(1, 8, 3), warmup=0, api_key_env="KVRAY_TEST_KEY")
    )
    assert missing.status == "error" and "KVRAY_TEST_KEY" in (missing.reason or "")


def test_prompts_have_exact_lengths_with_a_byte_level_bpe_tokenizer_too(tmp_path):
    """A trained byte-level BPE (the common real-model kind) does not round-trip random ids; the builder
    still lands on the exact count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "naïve café – déjà vu, 東京 ünïcödé"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    builder = PromptBuilder(fast)
    for n in (1, 7, 64, 200):
        prompts = {builder.make(n, seed) for seed in range(3)}
        assert len(prompts) == 3  # seeded per request: no two share a prefix by construction
        assert all(builder.count(p) == n for p in prompts)


def test_word_tokenizer_prompts_and_chunk_reconciliation(model_dir):
    builder = PromptBuilder(load_tokenizer(str(model_dir)))
    assert [builder.count(builder.make(n, 0)) for n in (1, 2, 33)] == [1, 2, 33]  # BOS included
    chat = PromptBuilder(builder.tokenizer, chat=True)
    assert chat.count(chat.make(17, 1)) == 17
    chunks = [Chunk(0.1, "a", None), Chunk(0.2, "b c", None), Chunk(0.3, "d", None)]
    assert token_times(chunks, [1, 2, 1], 4, 0.5) == [0.1, 0.2, 0.2, 0.3]
    assert token_times(chunks, [1, 2, 1], 6, 0.5) == [0.1, 0.2, 0.2, 0.3, 0.5, 0.5]  # held back: at the end
    # usage is the truth: an over-count is spread over the stream, first token on the first chunk, last on the last
    assert token_times(chunks, [1, 2, 1], 2, 0.5) == [0.1, 0.3]
    assert token_times(chunks, [2, 2, 2], 3, 0.5) == [0.1, 0.2, 0.3]


def test_chunks_that_retokenise_as_two_tokens_keep_the_streams_timing(backend, model_dir):
    """Each chunk " w5 w6" re-tokenises as two tokens while usage counts one per chunk: E2E and TPOT are the
    stream's, on the fake's schedule of one chunk every DOUBLE_GAP_S — trimming the surplus from the end would
    halve both — and the disagreement is recorded per request and per cell."""
    n = 8
    with FakeOpenAIServer() as fake:
        result = run_cell(backend, http_cell(model_dir, f"{fake.url}/double", Workload.uniform(2, 8, n), warmup=0))
    assert result.status == "ok", result.reason
    for t in result.traces:
        assert (t.output_toks, t.chunk_toks, len(t.token_times_s)) == (n, 2 * n, n)
        assert len(set(t.token_times_s)) == n  # one usage token per chunk, none doubled up
        assert t.end_s - t.token_times_s[0] >= (n - 1) * DOUBLE_GAP_S  # the schedule: n − 1 gaps, then usage
    assert (n - 1) * DOUBLE_GAP_S <= result.metrics["e2e_s_p50"] < 3 * n * DOUBLE_GAP_S + 1.0
    assert DOUBLE_GAP_S <= result.metrics["tpot_s_p50"] < 4 * DOUBLE_GAP_S
    assert result.metrics["stream_token_mismatches"] == 2
    row = result.to_row()
    assert row["ttft_basis"] == "client-http" and row["memory_scope"].startswith("remote server — not measured")
    assert row["rss_peak_bytes"] is None and row["baseline_bytes"] is None  # the client's RSS is not the server's


def test_one_client_per_cell_with_connections_opened_before_the_clock(model_dir, transformers_server):
    """Warmup and measured repeats of a cell share one HTTP client; a new cell gets a new one."""
    b = OpenAIBackend()
    try:
        first = run_cell(
            b, http_cell(model_dir, transformers_server.base_url, Workload.uniform(2, 8, 4), warmup=1, repeats=2)
        )
        assert first.status == "ok", first.reason
        assert b.session.clients_opened == 1
        second = run_cell(b, http_cell(model_dir, transformers_server.base_url, Workload.uniform(3, 8, 4), warmup=0))
        assert second.status == "ok", second.reason
        assert b.session.clients_opened == 2
    finally:
        b.close()


# --- the CLI: `kvray bench --backend openai` and `kvray exp4` flags -----------------------------------------

NO_RAY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, Block())
from kvray.cli import main
main(sys.argv[1:])
"""


def kvray(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", NO_RAY, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_bench_measures_a_server_over_http_without_ray(model_dir, transformers_server, tmp_path):
    out = tmp_path / "bench"
    proc = kvray(
        "bench",
        "--backend",
        "openai",
        "--base-url",
        transformers_server.base_url,
        "--api-key-env",
        "KVRAY_BENCH_KEY",
        "--model",
        str(model_dir),
        "-c",
        "2",
        "--prompt-toks",
        "16",
        "--gen-toks",
        "6",
        "--repeats",
        "1",
        "--output",
        str(out),
        "--json",
        env={"KVRAY_BENCH_KEY": "sk-never-stored-42"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["status"] == "ok" and record["metrics"]["requests_ok"] == 2
    assert record["metrics"]["output_toks_total"] == 12
    for path in out.rglob("*"):
        if path.is_file():
            assert "sk-never-stored-42" not in path.read_bytes().decode(errors="replace"), path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bench", "--backend", "openai", "--model", "kvray/tiny-llama"), "needs a server URL"),
        (("bench", "--backend", "openai", "--base-url", "ftp://x", "--model", "kvray/tiny-llama"), "http://"),
        (("bench", "--backend", "ollama", "--model", "llama3.2:1b"), "--host"),
        (
            ("bench", "--backend", "vllm", "--vllm-python", "/nonexistent/python", "--model", "kvray/tiny-llama"),
            "not an executable file",
        ),
        (("exp4", "--model", "kvray/tiny-llama", "--backends", "hf", "openai"), "needs --base-url"),
        (("exp4", "--model", "kvray/tiny-llama", "--prompt-toks", "4096"), "positions"),
    ],
)
def test_bad_server_flags_exit_2_with_one_line(args, message):
    proc = kvray(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_exp4_dry_run_lists_every_backend_and_concurrency():
    proc = kvray(
        "exp4",
        "--model",
        "kvray/tiny-llama",
        "--dtype",
        "fp32",
        "--prompt-toks",
        "32",
        "--gen-toks",
        "8",
        "-c",
        "1",
        "4",
        "--dry-run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = json.loads(proc.stdout)["cells"]
    assert sorted((c["backend"], c["concurrency"]) for c in cells) == sorted(
        (b, c) for b in ("hf", "hf-paged", "vllm") for c in (1, 4)
    )
    assert {c["experiment"] for c in cells} == {"exp4"}


def test_a_server_never_outlives_kvray_even_when_kvray_is_killed(tmp_path):
    """Ray kills a worker's direct children on exit; an engine core below the API server would survive that.
    The guardian kills the server's whole process group once kvray is gone, however it went."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    script = f"""
import sys, time
from kvray.servers.process import ServerProcess
# a leader with a grandchild, like vLLM's API server and its engine core
cmd = ["bash", "-c", "{sys.executable} -m http.server {port} --bind 127.0.0.1 & sleep 600 & wait"]
server = ServerProcess(cmd, "http://127.0.0.1:{port}/", name="fake").start(30)
print(server.proc.pid, flush=True)
time.sleep(600)
"""
    kvray_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pgid = int(kvray_proc.stdout.readline())
    os.killpg(pgid, 0)  # the server's group is up
    kvray_proc.send_signal(signal.SIGKILL)  # no atexit, no finally: only the guardian can clean up
    kvray_proc.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(pgid, signal.SIGKILL)
        raise AssertionError("the server's process group outlived kvray")


def test_server_figures_of_a_folder_without_server_data_say_what_is_missing(tmp_path):
    from kvray.analysis.dataset import Dataset
    from kvray.figures.server import has_server_data, server_figures

    (tmp_path / "empty").mkdir()
    dataset = Dataset.load(tmp_path / "empty")
    assert not has_server_data(dataset.records)
    figures = server_figures(dataset, tmp_path / "empty" / "figures")
    assert [f.name for f in figures] == ["fig8_backend_compare", "fig9_kv_timeline"]
    assert all(f.empty and f.notes and all(p.is_file() for p in f.paths) for f in figures)
