"""`kvray bench` as a user runs it: a real subprocess, a tiny model, files written, bad flags exit 2, no Ray."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from tiny_models import tiny_config, write_model_dir

# Runs `kvray bench` with `import ray` made impossible, then proves ray was never even attempted.
NO_RAY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            sys.stderr.write("ray import attempted\\n")
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, Block())
from kvray.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray imported"
    raise
"""


def run(*args, no_ray=False, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", NO_RAY] if no_ray else [sys.executable, "-m", "kvray.cli"]
    cmd += ["bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return str(write_model_dir(tmp_path_factory.mktemp("m") / "opt", tiny_config("opt")))


@pytest.mark.integration  # a `kvray` child process
def test_bench_runs_hf_without_ray_and_writes_the_dataset(tmp_path, opt_dir):
    out = tmp_path / "results"
    args = ["--model", opt_dir, "--prompt-toks", "12", "--gen-toks", "4", "-c", "3", "--dtype", "fp32"]
    proc = run(*args, "--device", "cpu", "--repeats", "2", "--output", str(out), no_ray=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ray import attempted" not in proc.stderr
    assert "TTFT" in proc.stdout and "output tokens/s" in proc.stdout and "status: ok" in proc.stdout
    for name in ("cells.jsonl", "cells.csv", "cells.parquet", "traces.parquet", "traces.csv"):
        assert (out / name).is_file(), name
    (cell_json,) = out.glob("cell_*.json")
    record = json.loads(cell_json.read_text())
    assert record["status"] == "ok" and record["cell"]["device"] == "cpu"
    assert len(record["traces"]) == 6 and all(t["output_toks"] == 4 for t in record["traces"])
    assert record["memory"]["kv_measured_bytes"] == record["memory"]["kv_predicted_bytes"] > 0
    cells = pd.read_parquet(out / "cells.parquet")
    assert cells.loc[0, "cell_id"] == record["cell_id"] and cells.loc[0, "concurrency"] == 3
    assert len(pd.read_parquet(out / "traces.parquet")) == 6


@pytest.mark.integration  # a `kvray` child process
def test_bench_mixed_workload_as_json(tmp_path, opt_dir):
    out = tmp_path / "r"
    proc = run(
        "--model",
        opt_dir,
        "--mixed",
        "4,4,20",
        "--gen-toks",
        "3",
        "--dtype",
        "fp32",
        "--device",
        "auto",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--output",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["metrics"]["requests"] == 3
    record = json.loads((out / f"cell_{data['cell_id']}.json").read_text())
    assert record["cell"]["workload"]["kind"] == "mixed"
    assert [r["prompt_toks"] for r in record["cell"]["workload"]["requests"]] == [4, 4, 20]


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
def test_refused_cell_exits_1_with_the_estimate(tmp_path):
    proc = run(
        "--model",
        "meta-llama/Llama-3.1-70B",
        "-c",
        "32",
        "--prompt-toks",
        "4096",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 1, proc.stderr
    assert "refused" in proc.stdout and "GiB" in proc.stdout
    assert json.loads((tmp_path / "r" / "cells.jsonl").read_text())["status"] == "refused"


@pytest.mark.integration  # a `kvray` child process: the command as a user runs it
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "nobody/nothing"], "unknown model"),
        (["--prompt-toks", "0"], "must be positive"),
        (["--gen-toks", "-3"], "must be positive"),
        (["--concurrency", "0"], "concurrency: must be positive"),
        (["--prompt-toks", "500", "--gen-toks", "100"], "max_position_embeddings (512)"),
        (["--dtype", "int4"], "unknown dtype"),
        (["--device", "tpu"], "unknown device"),
        (["--backend", "nope"], "--backend: got 'nope' (allowed: hf"),
        (["--weights", "half"], "--weights: unknown weights"),
        (["--mixed", "8,x"], "--mixed"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, needle, opt_dir, tmp_path):
    argv = ["--model", opt_dir, "--prompt-toks", "8", "--gen-toks", "2", "--output", str(tmp_path / "never"), *args]
    proc = run(*argv)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "never").exists()


def test_bench_cell_is_built_and_checked_from_plain_arguments(opt_dir, monkeypatch):
    """kvray/bench/cell.py: the Cell `kvray bench` runs, validated whole before any model loads."""
    from kvray.bench.cell import bench_cell
    from kvray.errors import KvrayInputError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cell = bench_cell(opt_dir, mixed=[4, 4, 20], gen_toks=3, dtype="float32", options={"b": 2, "a": None})
    assert cell.workload.kind == "mixed" and [r.prompt_toks for r in cell.workload.requests] == [4, 4, 20]
    assert cell.dtype == "fp32" and cell.options == (("b", 2),)
    assert cell.device != "auto"  # the hf backend pins the device it will run on, so the row says where
    # A server may serve a model kvray cannot resolve; an in-process backend may not.
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listening:  # a server must be reachable (checked at once)
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        served = bench_cell("nobody/served-only", backend="openai", options={"base_url": url})
    assert served.model == "nobody/served-only" and served.backend == "openai"
    with pytest.raises(KvrayInputError, match="cannot reach the server"):  # nothing listens on the discard port
        bench_cell("nobody/served-only", backend="openai", options={"base_url": "http://127.0.0.1:9"})
    with pytest.raises(KvrayInputError, match="unknown model"):
        bench_cell("nobody/served-only", backend="hf")
    with pytest.raises(KvrayInputError, match="needs a server URL"):
        bench_cell(opt_dir, prompt_toks=8, gen_toks=2, backend="openai")


def test_replace_measures_again_and_keeps_one_row(tmp_path):
    """A second bench of the same cell is refused; with --replace its new row takes the earlier one's place."""
    from kvray.bench.cell import bench_cell, measure_and_record
    from kvray.errors import KvrayInputError

    out = tmp_path / "r"
    cell = bench_cell(
        "kvray/tiny-llama",
        prompt_toks=8,
        gen_toks=3,
        concurrency=2,
        backend="synthetic",
        dtype="fp32",
        warmup=0,
        repeats=1,
        options={"ttft_s": 0.01, "tpot_s": 0.01},
    )
    first = measure_and_record(cell, out)
    assert first.added
    with pytest.raises(KvrayInputError, match="--replace"):
        measure_and_record(cell, out)
    (out / "cells.jsonl").write_text((out / "cells.jsonl").read_text() + "not a kvray row\n")
    second = measure_and_record(cell, out, replace=True)
    assert not second.added  # it replaced the earlier row
    lines = (out / "cells.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["cell_id"] for r in rows] == [cell.cell_id]  # one row for the cell, the new one
    assert rows[0]["duration_s"] == second.result.duration_s != first.result.duration_s
    assert "not a kvray row" in lines  # lines that are not rows are left as they were
