"""TTFT's clock per backend (``ttft_basis``) reaches every row, and calibration fits η only to engine-clock TTFT."""

from __future__ import annotations

from kvray.analysis.calibrate import observations_from_rows
from kvray.backends import REGISTRY, backend_class


def row(backend: str, **extra):
    base = {
        "status": "ok",
        "simulated": False,
        "hardware": "NVIDIA H100 80GB HBM3",
        "backend": backend,
        "model": "facebook/opt-125m",
        "dtype": "bf16",
        "kv_dtype": "bf16",
        "prompt_toks": 512,
        "gen_toks": 16,
        "concurrency": 1,
        "prompt_toks_list": "512",
        "ttft_s_p50": 0.01,
        "tpot_s_p50": 0.002,
        "queue_s_max": 0.0,
    }
    return {**base, **extra}


def test_every_backend_declares_its_ttft_clock():
    bases = {name: backend_class(name).ttft_basis for name in REGISTRY}
    assert bases == {
        "hf": "engine",
        "synthetic": "engine",
        "sim": "engine",
        "hf-paged": "engine",
        "vllm": "client-http",
        "openai": "client-http",
        "ollama": "client-http",
    }


def test_calibration_skips_client_side_ttft_including_rows_written_before_the_column():
    rows = [
        row("hf", ttft_basis="engine"),
        row("vllm", ttft_basis="client-http"),
        row("openai"),  # an older dataset: no ttft_basis column, the backend's declaration decides
        row("hf-paged", ttft_basis=float("nan")),  # pandas' empty cell
    ]
    groups, skipped = observations_from_rows(rows)
    used = sorted({o.row for obs in groups.values() for o in obs})
    assert used == [0, 3]
    assert skipped == {"TTFT not on the engine's clock (ttft_basis)": 2}
