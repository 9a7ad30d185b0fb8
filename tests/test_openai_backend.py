"""The OpenAI-compatible HTTP backend against a real `transformers serve` on 127.0.0.1 (tiny Llama, word-level
tokenizer built offline), plus every failure a request can meet. Fakes (servers_fixtures.FakeOpenAIServer) stand
in only for malformed streams and HTTP errors a real server cannot be made to produce."""

from __future__ import annotations

import json
import math

import pytest
from servers_fixtures import FakeOpenAIServer, build_tiny_model_dir, start_transformers_serve

from kvray.backends.hf import HFBackend
from kvray.backends.hf_paged import HFPagedBackend
from kvray.backends.openai import Chunk, OpenAIBackend, PromptBuilder, load_tokenizer, token_times
from kvray.metrics import itl_gaps
from kvray.runner import run_cell
from kvray.servers import free_port
from kvray.spec import Cell, Workload, make_options
from kvray.store import DatasetWriter


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(model_dir):
    proc = start_transformers_serve(model_dir, continuous_batching=True)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def backend():
    b = OpenAIBackend()
    yield b
    b.close()


def http_cell(model_dir, url, workload, warmup=1, repeats=1, **options):
    return Cell(model=str(model_dir), workload=workload, backend="openai", dtype="fp32", warmup=warmup,
                repeats=repeats, options=make_options(base_url=url, **options))  # fmt: skip


def test_streams_exact_counts_from_a_real_transformers_serve(backend, model_dir, server):
    cell = http_cell(model_dir, server.base_url, Workload.uniform(4, 32, 16), repeats=2)
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


def test_chat_endpoint_counts_the_template_in_the_prompt(backend, model_dir, server):
    cell = http_cell(model_dir, server.base_url, Workload.uniform(2, 24, 8), endpoint="chat")
    result = run_cell(backend, cell)
    assert result.status == "ok", result.reason
    assert [(t.prompt_toks, t.output_toks) for t in result.traces] == [(24, 8), (24, 8)]


def test_token_counts_match_the_in_process_backends_and_timings_differ_by_http_only(backend, model_dir, server):
    """Same model, same workload: the server's usage equals what hf / hf-paged count in-process; the HTTP
    timings sit on the same engine cadence (measured ratios: benchmarks/http_vs_inprocess.py)."""
    workload = Workload.uniform(4, 32, 16)
    http = run_cell(backend, http_cell(model_dir, server.base_url, workload))
    results = {"openai": http}
    for name, engine in (("hf", HFBackend()), ("hf-paged", HFPagedBackend())):
        cell = Cell(model=str(model_dir), workload=workload, backend=name, dtype="fp32", device="cpu", warmup=1)
        try:
            results[name] = run_cell(engine, cell, check_oom=False)
        finally:
            engine.close()
    counts = {name: sorted((t.prompt_toks, t.output_toks) for t in r.traces) for name, r in results.items()}
    assert counts["openai"] == counts["hf"] == counts["hf-paged"] == [(32, 16)] * 4
    for r in results.values():
        assert r.status == "ok" and r.metrics["output_toks_total"] == 64
    # transformers serve runs the same continuous-batching engine as hf-paged: per-token cadence agrees within
    # what a loaded 2-core machine allows, and TTFT only adds a request's HTTP and tokenisation overhead.
    paged, served = results["hf-paged"].metrics, http.metrics
    assert 0.2 < served["tpot_s_p50"] / paged["tpot_s_p50"] < 5
    assert served["ttft_s_p50"] - paged["ttft_s_p50"] < 0.5


def test_a_refused_connection_is_a_recorded_error_per_request(backend, model_dir):
    cell = http_cell(model_dir, f"http://127.0.0.1:{free_port()}", Workload.uniform(3, 8, 4), warmup=0)
    result = run_cell(backend, cell)
    assert result.status == "error" and "connection refused" in (result.reason or "")
    assert [t.status for t in result.traces] == ["error"] * 3
    assert all("connection refused" in (t.error or "") for t in result.traces)


def test_a_request_past_its_timeout_is_a_recorded_error(backend, model_dir, server):
    cell = http_cell(model_dir, server.base_url, Workload.uniform(2, 8, 100), warmup=0, timeout_s=0.05,
                     server_flavor="transformers")  # fmt: skip
    result = run_cell(backend, cell)
    assert result.status == "error"
    assert all(t.status == "error" and t.error.startswith("timeout after 0.05 s") for t in result.traces)


def test_a_real_http_error_status_is_recorded_with_the_servers_reason(backend, model_dir, server):
    # transformers serve answers 422 to fields it does not know: a real error from a real server.
    cell = http_cell(model_dir, server.base_url, Workload.uniform(1, 8, 4), warmup=0, server_flavor="vllm")
    result = run_cell(backend, cell)
    trace = result.traces[0]
    assert trace.status == "error" and trace.error.startswith("HTTP 422") and "ignore_eos" in trace.error


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


def test_a_multi_token_chunk_shares_its_timestamp_and_the_gaps_are_split(backend, model_dir):
    with FakeOpenAIServer() as fake:  # its first chunk carries two words (two tokens)
        result = run_cell(backend, http_cell(model_dir, f"{fake.url}/ok", Workload.uniform(1, 8, 5), warmup=0))
    trace = result.traces[0]
    assert trace.status == "ok" and trace.output_toks == 5
    assert trace.token_times_s[0] == trace.token_times_s[1] < trace.token_times_s[2]
    gaps = itl_gaps(trace.token_times_s)
    assert len(gaps) == 4 and gaps[0] == 0.0 and math.isclose(sum(gaps), trace.token_times_s[-1] - trace.token_times_s[0])


def test_the_api_key_is_sent_from_the_environment_and_never_stored(backend, model_dir, tmp_path, monkeypatch):
    secret = "sk-kvray-test-1234567890"
    monkeypatch.setenv("KVRAY_TEST_KEY", secret)
    with FakeOpenAIServer(expected_key=secret) as fake:
        ok = run_cell(backend, http_cell(model_dir, f"{fake.url}/auth", Workload.uniform(1, 8, 3), warmup=0,
                                         api_key_env="KVRAY_TEST_KEY"))  # fmt: skip
        monkeypatch.setenv("KVRAY_TEST_KEY", "wrong")
        denied = run_cell(backend, http_cell(model_dir, f"{fake.url}/auth", Workload.uniform(1, 8, 3), warmup=0,
                                             api_key_env="KVRAY_TEST_KEY"))  # fmt: skip
        seen = [h.get("Authorization") for h in fake.seen_headers]
    assert ok.status == "ok" and f"Bearer {secret}" in seen
    assert denied.traces[0].status == "error" and denied.traces[0].error.startswith("HTTP 401")
    writer = DatasetWriter(tmp_path / "results")
    writer.append(ok)
    for path in (tmp_path / "results").iterdir():
        assert secret not in path.read_bytes().decode(errors="replace"), path
    assert secret not in json.dumps(ok.to_dict())
    monkeypatch.delenv("KVRAY_TEST_KEY")
    missing = run_cell(backend, http_cell(model_dir, fake.url, Workload.uniform(1, 8, 3), warmup=0,
                                          api_key_env="KVRAY_TEST_KEY"))  # fmt: skip
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
    assert token_times(chunks, [1, 2, 1], 2, 0.5) == [0.1, 0.2]  # usage is the truth
