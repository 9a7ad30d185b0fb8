"""The GPU machine's own stack, rebuilt here: the GPU check, `kvray bench` and the HF backends on transformers 5.17.

The lent GPU machine has Python 3.12, torch 2.11, transformers 5.17, accelerate, pandas, pyarrow, psutil,
nvidia-ml-py, typer, rich, matplotlib — no Ray, no vLLM, no network — and kvray only as a source tree. A check that
works only with kvray's own locked stack (transformers 5.24) produced nothing there (every HF cell failed on
``'GenerateDecoderOnlyOutput' object has no attribute 'cache'``). These tests run in a virtualenv built like that
machine by `.ci/gpu_stack_venv.sh` (cached at $KVRAY_GPU_STACK_VENV, default ~/.cache/kvray/gpu-stack-venv; about
30 s to build once, a second after), each as a child process with kvray on PYTHONPATH.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("ray", "vllm", "moto", "fastapi", "openai")  # the GPU machine has none of them


@functools.lru_cache(maxsize=1)
def gpu_stack_python() -> str:
    """The virtualenv's python, built on first use; a failed build fails the test saying why, never a skip."""
    venv = Path(os.environ.get("KVRAY_GPU_STACK_VENV") or Path.home() / ".cache" / "kvray" / "gpu-stack-venv")
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "gpu_stack_venv.sh")],
        stdout=subprocess.PIPE,
        stderr=sys.__stderr__,
        text=True,
        env={**os.environ, "KVRAY_GPU_STACK_VENV": str(venv)},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        pytest.fail(
            f"could not build the GPU-stack virtualenv at {venv} (exit {proc.returncode}); run "
            "`bash .ci/gpu_stack_venv.sh` to see why",
            pytrace=False,
        )
    return lines[-1]


def run_in_stack(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """A child process of the GPU-stack python with kvray (and the tests' helpers) from this checkout only."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        KVRAY_CACHE_DIR=str(cwd / "kvray-cache"),
    )
    return subprocess.run(
        [gpu_stack_python(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_the_stack_is_the_gpu_machines_and_lacks_what_it_lacks(tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, json, torch, transformers; "
        f"print(json.dumps({{'absent': [m for m in {ABSENT!r} if u.find_spec(m) is not None], "
        "'transformers': transformers.__version__, 'torch': torch.__version__, "
        "'kvray': __import__('kvray').__file__}))"
    )
    proc = run_in_stack(["-c", probe], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["absent"] == []
    assert found["transformers"].startswith("5.17.") and found["torch"].startswith("2.11.")
    assert Path(found["kvray"]).resolve().parent == REPO / "kvray"  # the source tree, not an installed copy


def test_gpu_check_smoke_runs_every_stage_on_the_gpu_machines_stack(tmp_path: Path) -> None:
    proc = run_in_stack([str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "gpu-check-smoke"
    summary = json.loads((out / "check.json").read_text())
    assert summary["transformers"].startswith("5.17.") and summary["partial"] is False
    assert summary["not_run"] == []  # a 420 s budget: nothing cut
    by_stage = summary["rows_by_stage"]
    # grid: concurrency 1 2 4 × prompt 16 64 → 6 cells; paged: concurrency 2 4 at prompt 16 → 2 cells
    assert by_stage["grid"] == 6 and by_stage["paged"] == 2
    # serve: one request alone, then ≥ 2 probes (a bracket needs a sustainable and an unsustainable rate: the
    # search doubles or halves from the first), then the search's own row
    serve = summary["stages"]["serve"]
    assert serve["cut_by_budget"] is False and serve["probes_run"] == by_stage["serve"] - 1 >= 3
    offered = [float(x) for x in serve["probe_offered_rps"].split(",")]  # 4 significant digits
    knee = serve["knee_rps_nominal"]  # the rate the search asked for at the knee; knee_rps is what it realised
    assert serve["probes"] == len(offered) == by_stage["serve"] - 2
    assert any(abs(o - knee) <= 1e-3 * knee for o in offered)  # the knee is a probed rate
    # a seeded Poisson schedule scales with its rate: the realised knee is the nominal one times a fixed factor
    assert 0.5 * knee < serve["knee_rps"] < 2 * knee
    # bracketed: some probed rate above the knee was not sustainable, and the closest is within 10 % of it
    above = [o for o in offered if o > knee * 1.001]
    assert above and min(above) <= 1.1 * knee * 1.001
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]  # written as they ended
    assert len(cells) == summary["cells"] == 6 + 2 + by_stage["serve"]
    assert all(c["status"] == "ok" for c in cells), [(c["cell_id"], c["status"], c.get("reason")) for c in cells]
    rows = pd.read_parquet(out / "cells.parquet")
    assert len(rows) == len(cells) and set(rows["backend"]) == {"hf", "hf-paged"}
    search = rows.set_index("cell_id").loc[serve["search_cell_id"]]
    assert search["knee_rps"] == serve["knee_rps"] and search["load"] == "poisson"
    # the paged cells measured the pool's peak use. The tiny Llama holds 4 layers × 2 KV heads × 64 × 4 B (fp32)
    # × 2 (K and V) = 4,096 B a position; a request of 16 + 4 − 1 = 19 cached positions takes one block of the
    # default 256 tokens (1 MiB); c requests at once: c MiB
    paged = rows[(rows["backend"] == "hf-paged") & (rows["load"] == "burst") & (rows["concurrency"] >= 2)]
    assert sorted(paged["concurrency"]) == [2, 4]
    assert (paged["kv_measured_bytes"] == paged["concurrency"] * 256 * 4096).all()
    # overhead: rounds of both paths were timed on the check's device
    overhead = json.loads((out / "overhead.json").read_text())
    assert overhead["device"] == "cpu" and overhead["rounds"] == 3 and overhead["wall_ratio_paired_median"] > 0
    # telemetry: every measured row has its telemetry columns (samples ≥ 2), and energy or the reason it has none
    measured = rows[rows["telemetry_samples"].notna()]
    assert len(measured) == len(rows) - 1  # all but the search's own summary row
    assert (measured["telemetry_samples"] >= 2).all()
    assert (measured["energy_j"].notna() | measured["energy_reason"].notna()).all()
    assert set(summary["telemetry"]) == set(rows["cell_id"])
    for name in ("traces.parquet", "calibration.json", "check.json", "overhead.json"):
        assert (out / name).is_file(), name
    assert "roofline after calibrating on prompt 16" in proc.stdout and "energy: " in proc.stdout


def test_kvray_bench_runs_without_ray_on_the_gpu_machines_stack(tmp_path: Path) -> None:
    """`kvray bench` is the GPU machine's path: the CLI, both HF backends and the dataset writer, no Ray."""
    for backend in ("hf", "hf-paged"):
        proc = run_in_stack(
            [
                "-m",
                "kvray.cli",
                "bench",
                "-m",
                "kvray/tiny-llama",
                "--backend",
                backend,
                "--device",
                "cpu",
                "--dtype",
                "fp32",
                "--prompt-toks",
                "16",
                "--gen-toks",
                "4",
                "-c",
                "2",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--output",
                str(tmp_path / backend),
                "--json",
            ],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / backend / "cells.jsonl").read_text().splitlines()]
        assert [(r["cell"]["backend"], r["status"], r["metrics"]["requests"]) for r in rows] == [(backend, "ok", 2)]
    # and Ray is really not there to be imported by accident
    proc = run_in_stack(["-c", "import ray"], tmp_path)
    assert proc.returncode != 0 and "No module named 'ray'" in proc.stderr


def test_the_hf_backends_own_tests_pass_on_transformers_5_17(tmp_path: Path) -> None:
    """The oldest transformers kvray supports (pyproject's floor): its generate output names the cache
    ``past_key_values`` and its paged cache keeps per-layer block tensors; kvray reads both layouts."""
    proc = run_in_stack(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            "--rootdir",
            str(REPO),
            "-W",
            "ignore::DeprecationWarning",
            str(REPO / "tests" / "test_hf_backend.py"),
            str(REPO / "tests" / "test_hf_paged.py"),
        ],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
