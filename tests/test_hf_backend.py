"""The hf backend on real tiny transformers models (random weights, CPU): counts, timestamps, batching, KV."""

import pytest
import torch
from tiny_models import tiny_config, write_model_dir

from kvray.backends.hf import HFBackend, cache_bytes
from kvray.measure.metrics import request_metrics
from kvray.model.geometry import geometry_from_config
from kvray.model.kvmath import cached_positions, kv_bytes_batch
from kvray.runner.run import run_cell
from kvray.spec import Cell, RequestSpec, Workload


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(write_model_dir(tmp_path_factory.mktemp("models") / "llama", tiny_config("llama-gqa")))


@pytest.fixture(scope="module")
def backend():
    b = HFBackend()
    yield b
    b.close()


def make_cell(model, workload, dtype="fp32", warmup=0, repeats=1):
    return Cell(model=model, workload=workload, dtype=dtype, device="cpu", warmup=warmup, repeats=repeats)


def test_exact_token_counts_even_when_eos_is_the_likeliest_token(backend, llama_dir):
    cell = make_cell(llama_dir, Workload.uniform(1, 7, 6))
    backend.load(cell)
    # Make EOS the token greedy decoding picks first: plain generate stops at once, the backend must not.
    ids = backend._prompts(cell, cell.workload.requests, 0)[0][None]
    with torch.inference_mode():
        first = backend.model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
    saved = backend.model.generation_config.eos_token_id
    backend.model.generation_config.eos_token_id = first
    try:
        with torch.inference_mode():
            control = backend.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert control.shape[1] == 7 + 1  # the control really stops at EOS
        run = backend.run(cell, cell.workload.requests, repeat=0)
    finally:
        backend.model.generation_config.eos_token_id = saved
    assert [t.output_toks for t in run.traces] == [6]
    assert len(run.traces[0].token_times_s) == 6 and run.traces[0].status == "ok"


def test_prompts_are_exact_seeded_and_free_of_special_tokens(backend, llama_dir):
    cell = make_cell(llama_dir, Workload.mixed([5, 40], 2))
    backend.load(cell)
    p0, p0_again, p1 = (backend._prompts(cell, cell.workload.requests, r) for r in (0, 0, 1))
    assert [len(p0[0]), len(p0[1])] == [5, 40]
    assert torch.equal(p0[1], p0_again[1]) and not torch.equal(p0[1], p1[1])
    special = {0, 1, 2}  # pad, bos, eos of the tiny llama
    assert not special & set(torch.cat([p0[0], p0[1], p1[1]]).tolist())


def test_timestamps_are_monotone(backend, llama_dir):
    r = run_cell(backend, make_cell(llama_dir, Workload.uniform(2, 9, 5), repeats=2))
    assert r.status == "ok", r.reason
    for t in r.traces:
        times = [t.arrival_s, t.start_s, *t.token_times_s]
        assert times == sorted(times) and t.end_s == t.token_times_s[-1]
        assert request_metrics(t)["ttft_s"] > 0


def test_warmup_excluded_and_repeats_aggregated(backend, llama_dir):
    r = run_cell(backend, make_cell(llama_dir, Workload.uniform(3, 6, 3), warmup=2, repeats=3))
    assert r.status == "ok", r.reason
    assert sorted(t.repeat for t in r.traces) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.metrics["requests"] == 9 and r.metrics["output_toks_total"] == 27
    assert r.metrics["output_tps"] > 0 and r.hardware["name"] == "cpu"


def test_mixed_lengths_form_one_left_padded_batch(backend, llama_dir):
    cell = make_cell(llama_dir, Workload.mixed([3, 17, 9], 4))
    r = run_cell(backend, cell)
    assert r.status == "ok", r.reason
    assert len({t.start_s for t in r.traces}) == 1  # one batch
    assert len({tuple(t.token_times_s) for t in r.traces}) == 1  # every row advances together
    g = geometry_from_config(tiny_config("llama-gqa"))
    padded = kv_bytes_batch(g, [cached_positions(17, 4)] * 3, "fp32")
    assert r.memory["kv_measured_bytes"] == r.memory["kv_predicted_bytes"] == padded
    assert [t.prompt_toks for t in r.traces] == [3, 17, 9]


def test_requests_arriving_mid_batch_wait_for_the_next_batch(backend, llama_dir):
    # r0 starts alone; r1 and r2 arrive while its 40-token batch runs and form the next batch together.
    reqs = (RequestSpec(0, 6, 40, 0.0), RequestSpec(1, 6, 2, 0.01), RequestSpec(2, 12, 3, 0.015))
    r = run_cell(backend, make_cell(llama_dir, Workload("mixed", reqs)))
    assert r.status == "ok", r.reason
    t0, t1, t2 = r.traces
    assert t1.start_s == t2.start_s >= t0.token_times_s[-1]
    assert t1.output_toks == 2 and t2.output_toks == 3  # each keeps its own length within the batch
    assert t1.token_times_s == t2.token_times_s[:2]
    m1 = request_metrics(t1)
    assert m1["queue_s"] > 0 and m1["ttft_s"] > m1["queue_s"]
    assert r.metrics["queue_s_max"] == pytest.approx(t1.start_s - 0.01)  # r1 waited longest


@pytest.mark.parametrize(
    ("kind", "dtype", "batch", "prompt", "gen"),
    [
        ("opt", "fp32", 2, 11, 4),
        ("llama-gqa", "bf16", 3, 8, 5),
        ("mistral-swa", "fp32", 2, 20, 6),  # beyond the 16-token window: the cache is capped
        ("deepseek-mla", "fp32", 2, 9, 3),  # MLA: the latent is cached
    ],
)
def test_measured_kv_equals_predicted(tmp_path, kind, dtype, batch, prompt, gen):
    cfg = tiny_config(kind)
    model = str(write_model_dir(tmp_path / kind, cfg))
    b = HFBackend()
    r = run_cell(b, make_cell(model, Workload.uniform(batch, prompt, gen), dtype=dtype))
    b.close()
    assert r.status == "ok", r.reason
    expected = kv_bytes_batch(geometry_from_config(cfg), [cached_positions(prompt, gen)] * batch, dtype)
    assert r.memory["kv_measured_bytes"] == expected == r.memory["kv_predicted_bytes"]
    assert r.memory["kv_rel_error"] == 0.0
    assert r.memory["weights_bytes"] > 0 and r.memory["rss_peak_bytes"] >= r.memory["baseline_bytes"] > 0


def test_model_loads_once_per_model_dtype_and_reloads_on_change(backend, llama_dir):
    cell = make_cell(llama_dir, Workload.uniform(1, 4, 2))
    backend.load(cell)
    model = backend.model
    backend.load(make_cell(llama_dir, Workload.uniform(4, 8, 3)))
    assert backend.model is model
    backend.load(make_cell(llama_dir, Workload.uniform(1, 4, 2), dtype="bf16"))
    assert backend.model is not model and next(backend.model.parameters()).dtype == torch.bfloat16


def test_cache_bytes_counts_every_layer():
    class Layer:
        def __init__(self):
            self.keys, self.values = torch.zeros(2, 3, dtype=torch.float16), torch.zeros(5)

    class Cache:
        layers = [Layer(), Layer()]

    assert cache_bytes(Cache()) == 2 * (6 * 2 + 5 * 4)
