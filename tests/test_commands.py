"""Every command once, in this process, on the happy path (the fast tier's end-to-end pass over the CLI).

One synthetic job runs through ``kvray run --address inprocess`` (no Ray) into a folder that ``plot``,
``report``, ``compare`` and ``calibrate`` then read; the model-only commands and every exp command's dry run
need no folder. What each command prints is pinned elsewhere; here each must exit 0 and leave what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_calls import kvray
from job_files import write_job_file


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("commands")
    job = write_job_file(
        root, "every_command", repeats=3, grid={"prompt_toks": [16], "gen_toks": [4], "concurrency": [1, 2]}
    )
    out = root / "out"
    assert kvray("run", str(job), "--address", "inprocess", "--output", str(out), "--no-plots") == 0
    return out


def test_run_in_process_writes_the_dataset(folder):
    rows = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}


def test_plot_report_compare_read_the_folder(folder, tmp_path):
    assert kvray("plot", str(folder)) == 0
    assert (folder / "figures" / "fig1_mem_vs_concurrency.png").is_file()
    assert kvray("report", str(folder)) == 0
    assert (folder / "report.html").is_file() and (folder / "report.md").is_file()
    assert kvray("compare", str(folder), str(folder), "--output", str(tmp_path / "cmp")) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file()


def test_validate_reads_the_folder(folder, capsys):
    assert kvray("validate", str(folder), "--json") == 0  # no simulated device for its rows: all skipped, exit 0
    assert "median_abs_rel_error" in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "args",
    [
        ("info", "kvray/tiny-llama", "--json"),
        ("env", "--json"),
        ("check", "kvray/tiny-llama", "-c", "4", "--seq-len", "256", "--gpu", "H100-SXM"),
        ("predict", "kvray/tiny-llama", "--gpu", "H100-SXM", "-c", "1", "4", "--prompt-toks", "64", "--gen-toks", "8"),
        ("bench", "-m", "kvray/tiny-llama", "--backend", "sim", "--prompt-toks", "64", "--gen-toks", "8", "-c", "2"),
        *[(f"exp{n}", "--model", "kvray/tiny-llama", "--dry-run") for n in range(1, 9)],
        ("exp9", "--model", "kvray/tiny-llama", "--dry-run"),
        (
            "plan",
            "-m",
            "kvray/tiny-llama",
            "--rate",
            "5",
            "--slo",
            "ttft_ms=500,tpot_ms=50",
            "--gpus",
            "L4",
            "--tp",
            "1",
            "--output",
            "plan_out",
        ),
        ("trace", str(Path(__file__).resolve().parents[1] / "traces" / "azure_code_2023_first500.csv"), "--json"),
        ("route", "--help"),  # its measured run starts two vLLM replicas: tests/test_router_vllm.py (vllm tier)
    ],
    ids=lambda a: a[0],
)
def test_every_other_command_exits_0(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bench writes results/ here
    assert kvray(*args) == 0
