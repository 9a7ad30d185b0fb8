"""Issue 25, items 5 and 7: labels that say what they measured, and the edges a bad-input sweep found.

Expected values are worked by hand in each test (token ids of kvray's word-level vocabulary, a stream's stamps,
the sample a percentile needs), never read back from the code under test."""

from __future__ import annotations

import time

import pytest

from kvray.errors import KvrayInputError

# --- item 7: a bundled kvray/… id is never looked up on the hub ----------------------------------------------


def test_bundled_id_gets_the_offline_word_tokenizer(monkeypatch):
    """kvray/tiny-llama: 4,096 words "w4" … (ids 0–3 <pad> <s> </s> <unk>), BOS 1 in front — with the hub
    unreachable (the discard port), so a lookup there would fail or retry instead of answering at once."""
    from kvray.backends.openai import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    tok = load_tokenizer("kvray/tiny-llama")
    assert time.monotonic() - t0 < 20  # the hub's retries took a minute
    assert len(tok) == 4096
    assert tok("w5 w6 w4095")["input_ids"] == [1, 5, 6, 4095]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)  # the bundled config's ids
    assert tok.decode([5, 6, 4095]) == "w5 w6 w4095"


def test_unknown_kvray_id_is_one_line_not_a_hub_lookup():
    from kvray.backends.openai import load_tokenizer

    with pytest.raises(KvrayInputError, match="not a model kvray bundles.*kvray/tiny-llama"):
        load_tokenizer("kvray/no-such-model")


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ((None, 1, 2), (0, 1, 2)),  # Llama's: no pad → 0
        ((0, 1, 2), (0, 1, 2)),
        ((3, 0, 1), (3, 0, 1)),  # three distinct special words: kept
        ((None, 128000, [128001, 128009]), (0, 1, 2)),  # beyond the 4 special words: 0, 1, 2
        ((1, 1, 2), (0, 1, 2)),  # pad = bos: not distinct
    ],
)
def test_special_ids_match_the_served_directory(ids, expected):
    from kvray.servers.model_dirs import special_ids

    assert special_ids(*ids) == expected


@pytest.mark.integration
def test_bench_openai_with_a_bundled_id_against_a_live_server(tmp_path, monkeypatch, capsys):
    """The issue's command against a live OpenAI-compatible stub (it serves "stub", not a directory, so the
    tokenizer comes from -m kvray/tiny-llama): measured at once, the hub never asked."""
    from servers_fixtures import PacedOpenAIServer

    from kvray.cli.app import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with PacedOpenAIServer(first_token_s=0.02, token_s=0.005) as stub:
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--backend", "openai", "-m", "kvray/tiny-llama", "--base-url", stub.url,
                  "--prompt-toks", "8", "--gen-toks", "6", "--repeats", "1", "--warmup", "0",
                  "--output", str(tmp_path / "out")])  # fmt: skip
        elapsed = time.monotonic() - t0
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err
    assert "status: ok" in out.out and elapsed < 45, (elapsed, out.out)
