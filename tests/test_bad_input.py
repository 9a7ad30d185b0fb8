"""Bad input as a suite: every command, ~95 kinds of mistake, each one line and exit 2, at once, writing nothing.

Each case runs ``kvray.cli.main`` in this process (in-process is ~100× cheaper than a subprocess per case) in
a fresh folder holding the fixtures below; the test asserts the exit code, that stderr is one ``kvray:
error:`` line with no traceback, that the line says what was wrong (``needle``), that it came within
``LIMIT_S``, and that the folder is byte-for-byte what it was (no half-written results, figures or locks).
A few cases run through the real entry point (``python -m kvray.cli``) as a user would, and check that no
model code was imported on the way to the error.

Fixtures in each case's folder: quickstart.yaml (a valid job), bad-*.yaml (the broken jobs), results/
(a real row from the synthetic backend), empty/, garbage/ (cells.jsonl of non-JSON), notrows/ (JSON lines
that are not kvray rows), afile (a plain file), noconfig/ (a directory without config.json), badconfig/
(config.json that is not JSON).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 15.0  # "a few seconds" with margin for a loaded 2-core machine; the slowest case measures ~3 s
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there

GOOD_JOB = (ROOT / "jobs" / "quickstart.yaml").read_text()
SYNTH = "models: [kvray/tiny-llama]\nbackends: [synthetic]\ndtypes: [fp32]\n"
BAD_JOBS = {
    "bad-yaml.yaml": "models: [a\ngrid: {",
    "bad-json.json": '{"models": ["kvray/tiny-llama"], "grid": ',
    "bad-empty.yaml": "",
    "bad-list.yaml": "- models\n- grid\n",
    "bad-key.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2]}\nbogus: 1\n",
    "bad-nomodels.yaml": "grid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-repeats.yaml": SYNTH + "repeats: three\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-negconc.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], concurrency: [-1]}\n",
    "bad-zerogen.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [0]}\n",
    "bad-huge.yaml": SYNTH + "grid: {prompt_toks: [999999], gen_toks: [2]}\n",
    "bad-backend.yaml": "models: [kvray/tiny-llama]\nbackends: [warp]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-name.yaml": "name: ../evil\n" + SYNTH + "grid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-dtype.yaml": "models: [kvray/tiny-llama]\ndtypes: [fp7]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-device.yaml": SYNTH + "device: tpu\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-simgpu.yaml": "models: [kvray/tiny-llama]\nbackends: [sim]\nhardware: [H999]\n"
    "grid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-creds.yaml": "models: [kvray/tiny-llama]\nbackends: [openai]\n"
    "options: {base_url: 'http://user:hunter2@127.0.0.1:9'}\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-timeout.yaml": SYNTH + "cell_timeout_s: 0\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-pretrained.yaml": SYNTH + "weights: pretrained\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-model.yaml": "models: [nobody/nothing]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-gridtype.yaml": SYNTH + "grid: {prompt_toks: eight, gen_toks: [2]}\n",
    "bad-mixed.yaml": SYNTH + "grid: {mixed: [[8, 0]], gen_toks: [2]}\n",
    "bad-options.yaml": SYNTH + "options: [ttft_s]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-hwmix.yaml": SYNTH + "hardware: 7\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-workers.yaml": SYNTH + "workers: 0\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-tp.yaml": SYNTH + "tensor_parallel: [1, 3]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-tp-zero.yaml": SYNTH + "tensor_parallel: [0]\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
    "bad-load-kind.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], load: {kind: flood, requests: 4}}\n",
    "bad-load-norate.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], load: {kind: poisson, requests: 4}}\n",
    "bad-load-zerorate.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], load: {kind: poisson, rates: [0], "
    "requests: 4}}\n",
    "bad-load-key.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], load: {kind: closed, requests: 4, qps: 3}}\n",
    "bad-load-users.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], load: {kind: poisson, rate: 2, "
    "requests: 4, users: [2]}}\n",
    "bad-slo.yaml": SYNTH + "grid: {prompt_toks: [8], gen_toks: [2], slo: {ttft_ms: 0}}\n",
    "bad-dist-nomax.yaml": SYNTH + "grid: {prompt_dist: {kind: lognormal, median: 8}, gen_toks: [2]}\n",
    "bad-dist-huge.yaml": SYNTH + "grid: {prompt_dist: {kind: uniform, min: 8, max: 999999}, gen_toks: [2]}\n",
    "bad-telemetry.yaml": SYNTH + "options: {telemetry_interval_s: 0.001}\ngrid: {prompt_toks: [8], gen_toks: [2]}\n",
}
BENCH = ("bench", "--model", "kvray/tiny-llama", "--prompt-toks", "8", "--gen-toks", "2", "--output", "out")
SYN_BENCH = (*BENCH, "--backend", "synthetic", "--repeats", "1", "--warmup", "0")
JOB = "quickstart.yaml"

# (case id, argv, what the line must say)
CASES: list[tuple[str, list[str], str]] = [
    # info / env
    ("info-unknown-model", ["info", "nobody/nothing"], "unknown model"),
    ("info-bad-dtype", ["info", "gpt2", "--dtype", "fp7"], "dtype"),
    ("info-empty-model", ["info", ""], "empty"),
    ("info-path-separators", ["info", "../../etc/nothing"], "unknown model"),
    ("info-dir-without-config", ["info", "noconfig"], "without config.json"),
    ("info-config-not-json", ["info", "badconfig"], "not valid JSON"),
    ("info-unknown-flag", ["info", "gpt2", "--bogus"], "No such option"),
    ("info-zero-tp", ["info", "gpt2", "--tp", "0"], "--tp values must be positive"),
    ("info-tp-not-dividing-heads", ["info", "Qwen/Qwen2.5-7B", "--tp", "8"], "28 attention heads are not divisible"),
    ("check-tp-kv-heads-uneven", ["check", "Qwen/Qwen2.5-0.5B", "--tp", "7", "--gpu", "L4"], "2 KV heads cannot"),
    ("env-unknown-flag", ["env", "--bogus"], "No such option"),
    ("env-extra-argument", ["env", "extra"], "unexpected extra argument"),
    # check
    ("check-zero-concurrency", ["check", "gpt2", "-c", "0", "--seq-len", "128"], "must be positive"),
    ("check-negative-length", ["check", "gpt2", "-c", "1", "--seq-len", "-5"], "must be positive"),
    ("check-unknown-gpu", ["check", "gpt2", "-c", "1", "--seq-len", "128", "--gpu", "H999"], "H999"),
    ("check-concurrency-text", ["check", "gpt2", "-c", "many"], "--concurrency"),
    ("check-unknown-model", ["check", "nobody/nothing", "-c", "1", "--seq-len", "8"], "unknown model"),
    # bench, every backend
    ("bench-unknown-backend", [*BENCH, "--backend", "warp"], "warp"),
    ("bench-weights", [*BENCH, "--weights", "fancy"], "--weights"),
    ("bench-dtype", [*BENCH, "--dtype", "int3"], "dtype"),
    ("bench-zero-prompt", [*SYN_BENCH, "--prompt-toks", "0"], "prompt"),
    ("bench-negative-gen", [*SYN_BENCH, "--gen-toks", "-1"], "gen"),
    ("bench-zero-concurrency", [*SYN_BENCH, "-c", "0"], "concurrency"),
    ("bench-tp-not-dividing-heads", [*SYN_BENCH, "--tp", "3"], "not divisible by tensor parallel size 3"),
    ("bench-zero-tp", [*SYN_BENCH, "--tp", "0"], "--tp: must be positive: expected integers >= 1, got 0"),
    ("bench-huge-prompt", [*BENCH, "--prompt-toks", "999999"], "max_position_embeddings"),
    ("bench-mixed-text", [*BENCH, "--mixed", "8,x"], "--mixed"),
    ("bench-negative-gap", [*BENCH, "--arrival-gap-s", "-1"], "--arrival-gap-s"),
    ("bench-device-tpu", [*BENCH, "--device", "tpu"], "tpu"),
    ("bench-device-cuda-absent", [*BENCH, "--device", "cuda:0"], "cuda"),
    ("bench-negative-warmup", [*SYN_BENCH, "--warmup", "-1"], "warmup"),
    ("bench-zero-repeats", [*BENCH, "--backend", "synthetic", "--repeats", "0"], "repeats"),
    ("bench-option-no-equals", [*BENCH, "--option", "novalue"], "KEY=VALUE"),
    ("bench-synthetic-bad-option", [*SYN_BENCH, "--option", "ttft_s=-1"], "ttft_s"),
    ("bench-telemetry-negative", [*SYN_BENCH, "--option", "telemetry_interval_s=-1"], "telemetry_interval_s"),
    ("bench-telemetry-text", [*BENCH, "--option", "telemetry_interval_s=often"], "telemetry_interval_s"),
    ("bench-load-unknown", [*SYN_BENCH, "--load", "tsunami"], "tsunami"),
    ("bench-load-rate-negative", [*SYN_BENCH, "--load", "poisson", "--rate", "-2", "--requests", "4"], "--rate"),
    ("bench-load-rate-text", [*SYN_BENCH, "--load", "poisson", "--rate", "fast", "--requests", "4"], "--rate"),
    ("bench-load-no-rate", [*SYN_BENCH, "--load", "poisson", "--requests", "4"], "rate"),
    ("bench-load-rate-closed", [*SYN_BENCH, "--load", "closed", "--rate", "3", "--requests", "4"], "open loops"),
    ("bench-rate-without-load", [*SYN_BENCH, "--rate", "3"], "--load"),
    ("bench-load-zero-requests", [*SYN_BENCH, "--load", "closed", "--requests", "0"], "--requests"),
    ("bench-load-no-count", [*SYN_BENCH, "--load", "poisson", "--rate", "3"], "requests or duration_s"),
    ("bench-auto-no-requests", [*SYN_BENCH, "--load", "poisson", "--rate", "auto", "--duration-s", "2"], "requests"),
    ("bench-slo-unknown", [*SYN_BENCH, "--slo", "latency_ms=5"], "latency_ms"),
    ("bench-slo-text", [*SYN_BENCH, "--slo", "ttft_ms=soon"], "ttft_ms"),
    ("bench-slo-negative", [*SYN_BENCH, "--slo", "ttft_ms=-5"], "ttft_ms"),
    ("bench-dist-unknown", [*SYN_BENCH, "--prompt-dist", "zipf:s=2"], "zipf"),
    ("bench-dist-missing", [*SYN_BENCH, "--prompt-dist", "lognormal:sigma=1"], "median"),
    ("bench-dist-text", [*SYN_BENCH, "--gen-dist", "uniform:min=a,max=4"], "--gen-dist"),
    # tiny Llama holds 4,096 positions: a median of 16 never draws near 99,999,999, but its max may be drawn
    (
        "bench-dist-max-beyond-positions",
        [*SYN_BENCH, "--prompt-dist", "lognormal:median=16,max=99999999"],
        "--prompt-dist max 99999999 + --gen-toks 2 need 100000000 positions, more than kvray/tiny-llama's "
        "max_position_embeddings (4096)",
    ),
    # positions P + G − 1, as a job file's lengths are checked: 4096 + 2 − 1 is one over
    ("bench-dist-max-one-over", [*SYN_BENCH, "--prompt-dist", "uniform:min=8,max=4096"], "need 4097 positions"),
    ("bench-gen-dist-max-beyond", [*SYN_BENCH, "--gen-dist", "uniform:min=1,max=4090"], "--gen-dist max 4090"),
    ("bench-mixed-load", [*SYN_BENCH, "--mixed", "8,8", "--load", "closed", "--requests", "4"], "--mixed"),
    ("bench-openai-no-url", [*BENCH, "--backend", "openai"], "--base-url"),
    ("bench-openai-ftp", [*BENCH, "--backend", "openai", "--base-url", "ftp://x"], "http://"),
    ("bench-openai-unreachable", [*BENCH, "--backend", "openai", "--base-url", UNREACHABLE], "cannot reach"),
    (
        "bench-openai-credentials",
        [*BENCH, "--backend", "openai", "--base-url", "http://u:hunter2@127.0.0.1:9"],
        "credentials",
    ),  # fmt: skip
    (
        "bench-openai-key-unset",
        [*BENCH, "--backend", "openai", "--base-url", UNREACHABLE, "--api-key-env", "KVRAY_TEST_NOT_SET"],
        "KVRAY_TEST_NOT_SET",
    ),  # fmt: skip
    (
        "bench-openai-endpoint",
        [*BENCH, "--backend", "openai", "--base-url", UNREACHABLE, "--option", "endpoint=fax"],
        "endpoint",
    ),  # fmt: skip
    ("bench-ollama-no-host", [*BENCH, "--backend", "ollama"], "--host"),
    ("bench-ollama-unreachable", [*BENCH, "--backend", "ollama", "--host", UNREACHABLE], "cannot reach"),
    (
        "bench-ollama-num-ctx",
        [*BENCH, "--backend", "ollama", "--host", UNREACHABLE, "--option", "num_ctx=0"],
        "num_ctx",
    ),  # fmt: skip
    (
        "bench-vllm-python-missing",
        [*BENCH, "--backend", "vllm", "--vllm-python", "/nonexistent/python"],
        "/nonexistent/python",
    ),  # fmt: skip
    ("bench-hf-paged-dtype", [*BENCH, "--backend", "hf-paged", "--dtype", "fp7"], "dtype"),
    ("bench-sim-huge", [*BENCH, "--backend", "sim", "--prompt-toks", "999999"], "max_position_embeddings"),
    ("bench-sim-max-num-seqs", [*BENCH, "--backend", "sim", "--option", "max_num_seqs=0"], "max_num_seqs"),
    (
        "bench-sim-gpu-util",
        [*BENCH, "--backend", "sim", "--option", "gpu_memory_utilization=1.5"],
        "gpu_memory_utilization",
    ),  # fmt: skip
    ("bench-pretrained-bundled", [*BENCH, "--weights", "pretrained"], "no pretrained weights"),
    (
        "bench-pretrained-offline",
        [*BENCH[:2], "facebook/opt-125m", *BENCH[3:], "--weights", "pretrained"],
        "HF_HUB_OFFLINE",
    ),  # fmt: skip
    ("bench-unknown-model", ["bench", "--model", "nobody/nothing", "--output", "out"], "unknown model"),
    ("bench-output-is-file", [*SYN_BENCH[:-7], "afile", *SYN_BENCH[-6:]], "is a file"),
    ("bench-same-cell-again", [*SYN_BENCH[:-7], "results", *SYN_BENCH[-6:]], "--replace"),
    # run / job files
    ("run-missing-file", ["run", "nope.yaml"], "no such job file"),
    *[
        (f"run-{name.split('.')[0]}", ["run", name], needle)
        for name, needle in (
            ("bad-yaml.yaml", "not valid YAML"),
            ("bad-json.json", "not valid YAML"),
            ("bad-empty.yaml", "empty"),
            ("bad-list.yaml", "mapping"),
            ("bad-key.yaml", "bogus"),
            ("bad-nomodels.yaml", "models"),
            ("bad-repeats.yaml", "repeats"),
            ("bad-negconc.yaml", "concurrency"),
            ("bad-zerogen.yaml", "gen_toks"),
            ("bad-huge.yaml", "positions"),
            ("bad-backend.yaml", "warp"),
            ("bad-name.yaml", "name"),
            ("bad-dtype.yaml", "dtypes"),
            ("bad-device.yaml", "device"),
            ("bad-simgpu.yaml", "H999"),
            ("bad-creds.yaml", "credentials"),
            ("bad-timeout.yaml", "cell_timeout_s"),
            ("bad-pretrained.yaml", "no pretrained weights"),
            ("bad-model.yaml", "unknown model"),
            ("bad-gridtype.yaml", "prompt_toks"),
            ("bad-mixed.yaml", "mixed"),
            ("bad-options.yaml", "options"),
            ("bad-hwmix.yaml", "hardware"),
            ("bad-workers.yaml", "workers"),
            ("bad-tp.yaml", "4 attention heads are not divisible by tensor parallel size 3"),
            ("bad-tp-zero.yaml", "tensor_parallel"),
            ("bad-telemetry.yaml", "telemetry_interval_s"),
            ("bad-load-kind.yaml", "flood"),
            ("bad-load-norate.yaml", "rate"),
            ("bad-load-zerorate.yaml", "rates[0]"),
            ("bad-load-key.yaml", "qps"),
            ("bad-load-users.yaml", "users"),
            ("bad-slo.yaml", "ttft_ms"),
            ("bad-dist-nomax.yaml", "needs max"),
            ("bad-dist-huge.yaml", "max_position_embeddings"),
        )
    ],  # fmt: skip
    ("run-output-is-file", ["run", JOB, "--output", "afile"], "afile"),
    ("run-folder-locked", ["run", JOB, "--output", "locked"], "in use by another kvray run"),
    ("run-unknown-flag", ["run", JOB, "--bogus"], "No such option"),
    # exp1–exp4
    ("exp1-zero-concurrency", ["exp1", "-c", "0", "2", "--dry-run"], "must be positive"),
    ("exp1-unknown-backend", ["exp1", "--backend", "warp", "--dry-run"], "warp"),
    ("exp1-hardware-mix", ["exp1", "--hardware", "each", "H100", "--dry-run"], "not a mix"),
    ("exp1-sim-unknown-gpu", ["exp1", "--backend", "sim", "--hardware", "H999", "--dry-run"], "H999"),
    ("exp1-dtype", ["exp1", "--dtype", "fp7", "--dry-run"], "dtype"),
    ("exp1-unknown-model", ["exp1", "--model", "nobody/nothing", "--dry-run"], "unknown model"),
    (
        "exp1-remote-unreachable",
        ["exp1", "--model", "kvray/tiny-llama", "-c", "1", "--address", UNREACHABLE, "--output-dir", "exp-out"],
        "cannot reach",
    ),  # fmt: skip
    ("exp2-nothing-fits", ["exp2", "--model", "gpt2", "--seqlens", "999999", "--dry-run"], "largest possible"),
    ("exp2-negative-seqlen", ["exp2", "--seqlens", "-128", "--dry-run"], "must be positive"),
    ("exp3-long-huge", ["exp3", "--model", "kvray/tiny-llama", "--long", "999999", "--dry-run"], "largest possible"),
    ("exp3-long-shorter", ["exp3", "--short", "512", "--long", "256", "--dry-run"], "must be longer"),
    ("exp3-zero-short", ["exp3", "--n-short", "0", "--dry-run"], "must be positive"),
    ("exp4-openai-no-url", ["exp4", "--backends", "openai", "--dry-run"], "--base-url"),
    ("exp4-ollama-ftp", ["exp4", "--backends", "ollama", "--host", "ftp://x", "--dry-run"], "http://"),
    (
        "exp4-openai-credentials",
        ["exp4", "--backends", "openai", "--base-url", "http://u:hunter2@h:1", "--dry-run"],
        "credentials",
    ),  # fmt: skip
    ("exp4-huge-prompt", ["exp4", "--model", "gpt2", "--prompt-toks", "999999", "--dry-run"], "positions"),
    ("exp6-zero-pool", ["exp6", "--kv-pool-mib", "0", "--dry-run"], "--kv-pool-mib"),
    ("exp6-prefix-past-prompt", ["exp6", "--prefix-toks", "600", "--prompt-toks", "544", "--dry-run"], "--prefix-toks"),
    ("exp6-zero-turns", ["exp6", "--turns", "0", "--dry-run"], "turns"),
    ("exp5-negative-users", ["exp5", "--users", "-4", "--dry-run"], "--users values must be positive"),
    ("exp5-rate-word", ["exp5", "--rates", "fast", "--dry-run"], "--rates"),
    ("exp5-zero-rate", ["exp5", "--rates", "0", "--dry-run"], "--rates values must be positive"),
    ("exp5-open-load-burst", ["exp5", "--open-load", "burst", "--dry-run"], "--open-load"),
    ("exp5-nothing-to-run", ["exp5", "--users", "0", "--open-load", "none", "--dry-run"], "closed loop"),
    ("exp5-two-per-user", ["exp5", "--requests-per-user", "2", "--dry-run"], "--requests-per-user"),
    ("exp5-bad-slo", ["exp5", "--slo", "ttft_ms=-1", "--dry-run"], "ttft_ms"),
    ("exp5-unknown-slo", ["exp5", "--slo", "latency=3", "--dry-run"], "unknown SLO"),
    ("exp5-bad-dist", ["exp5", "--prompt-dist", "zipf:a=2", "--dry-run"], "zipf"),
    ("exp5-openai-no-url", ["exp5", "--backends", "openai", "--dry-run"], "--base-url"),
    ("exp5-sim-unknown-gpu", ["exp5", "--hardware", "H999", "--dry-run"], "H999"),
    ("exp5-huge-prompt", ["exp5", "--model", "gpt2", "--prompt-toks", "999999", "--dry-run"], "positions"),
    # predict / calibrate
    ("predict-unknown-gpu", ["predict", "gpt2", "--gpu", "H999"], "H999"),
    ("predict-negative-tp", ["predict", "gpt2", "--tp", "-2"], "--tp values must be positive"),
    ("predict-tp-not-dividing-heads", ["predict", "meta-llama/Llama-3.1-70B", "--tp", "3"], "not divisible by"),
    ("predict-zero-concurrency", ["predict", "gpt2", "--gpu", "H100", "--concurrency", "0"], "positive"),
    ("predict-layout", ["predict", "gpt2", "--gpu", "H100", "--layout", "weird"], "layout"),
    ("predict-unknown-model", ["predict", "nobody/nothing", "--gpu", "H100"], "unknown model"),
    ("calibrate-missing", ["calibrate", "nowhere"], "nowhere"),
    ("calibrate-empty", ["calibrate", "empty"], "empty"),
    ("calibrate-garbage", ["calibrate", "garbage"], "garbage"),
    # plot / report
    ("plot-missing", ["plot", "nowhere"], "not a results folder"),
    ("plot-empty", ["plot", "empty"], "holds no results"),
    ("plot-garbage", ["plot", "garbage"], "holds no results"),
    ("plot-not-rows", ["plot", "notrows"], "not a kvray result"),
    ("plot-unknown-cell", ["plot", "results", "--cell", "nosuchcell"], "no cell 'nosuchcell'"),
    ("plot-out-file", ["plot", "results", "--output", "afile"], "--output afile: afile is a file"),
    ("plot-out-under-file", ["plot", "results", "--out", "afile/figs"], "afile is a file"),  # the old spelling
    ("plot-out-unwritable", ["plot", "results", "--output", "/proc/kvray-figures"], "cannot write to /proc/kvray"),
    ("plot-default-out-file", ["plot", "figfile"], "figfile/figures: figfile/figures is a file"),
    ("report-figures-file", ["report", "figfile"], "figfile/figures is a file"),
    ("report-missing", ["report", "nowhere"], "not a results folder"),
    ("report-empty", ["report", "empty"], "holds no results"),
    ("report-garbage", ["report", "garbage"], "holds no results"),
    ("report-not-rows", ["report", "notrows"], "not a kvray result"),
    # compare (the same folder twice is not bad input: tests/test_compare.py compares it as no change)
    ("compare-missing-base", ["compare", "nowhere", "results"], "not a results folder"),
    ("compare-missing-new", ["compare", "results", "nowhere"], "not a results folder"),
    ("compare-empty", ["compare", "results", "empty"], "holds no results"),
    ("compare-garbage", ["compare", "garbage", "results"], "holds no results"),
    ("compare-not-rows", ["compare", "results", "notrows"], "not a kvray result"),
    ("compare-one-folder", ["compare", "results"], "Missing argument"),
    ("compare-negative-pct", ["compare", "results", "results", "--fail-on-regression", "-5"], "percentage >= 0"),
    ("compare-nan-pct", ["compare", "results", "results", "--fail-on-regression", "nan"], "percentage >= 0"),
    ("compare-text-pct", ["compare", "results", "results", "--fail-on-regression", "ten"], "valid number"),
    ("compare-min-change", ["compare", "results", "results", "--min-change", "100"], "--min-change"),
    ("compare-out-file", ["compare", "results", "results", "--output", "afile"], "is a file"),
    # launch
    ("launch-unreachable", ["launch", "--job", JOB, "--address", UNREACHABLE, "--output", "l-out"], "cannot reach"),
    ("launch-no-scheme", ["launch", "--job", JOB, "--address", "127.0.0.1:8265"], "http(s)://"),
    ("launch-neither", ["launch", "--job", JOB], "exactly one"),
    ("launch-both", ["launch", "--job", JOB, "--address", UNREACHABLE, "--cluster", "c.yaml"], "exactly one"),
    ("launch-missing-job", ["launch", "--job", "nope.yaml", "--address", UNREACHABLE], "no such job file"),
    ("launch-bad-job", ["launch", "--job", "bad-key.yaml", "--address", UNREACHABLE], "bogus"),
    ("launch-missing-cluster", ["launch", "--job", JOB, "--cluster", "nope.yaml"], "does not exist"),
    ("launch-cluster-not-yaml", ["launch", "--job", JOB, "--cluster", "bad-yaml.yaml"], "not valid YAML"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixtures every case starts from (built once; each case gets a copy)."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / JOB).write_text(GOOD_JOB)
    for name, text in BAD_JOBS.items():
        (root / name).write_text(text)
    (root / "afile").write_text("not a folder\n")
    for name in ("empty", "noconfig", "badconfig", "garbage", "notrows", "locked"):
        (root / name).mkdir()
    (root / "badconfig" / "config.json").write_text("{ not json")
    (root / "garbage" / "cells.jsonl").write_text("not json {\n\x00\x01\n")
    (root / "notrows" / "cells.jsonl").write_text('{"cell_id": "x", "status": "ok"}\n')
    # A folder held by a live run: this test process's pid.
    (root / "locked" / ".kvray-run.lock").write_text(
        f'{{"pid": {os.getpid()}, "host": "{__import__("socket").gethostname()}", "since": "now"}}'
    )
    # A real row of the synthetic bench cell, so the same bench again is refused.
    from kvray.bench.cell import bench_cell, measure_and_record

    cell = bench_cell("kvray/tiny-llama", prompt_toks=8, gen_toks=2, backend="synthetic", repeats=1, warmup=0)
    measure_and_record(cell, root / "results")
    shutil.copytree(root / "results", root / "figfile")  # results whose figures folder is a plain file
    (root / "figfile" / "figures").write_text("not a folder\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("args", "needle"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_exit_2(args, needle, template, tmp_path, monkeypatch, capsys):
    from kvray.cli.app import main

    work = tmp_path / "w"
    shutil.copytree(template, work)
    before = snapshot(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KVRAY_TEST_NOT_SET", raising=False)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("kvray: error: ") and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    assert "hunter2" not in err  # a credential is never echoed back
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s"
    assert snapshot(work) == before, "bad input left something behind"


def test_the_suite_covers_every_command_with_60_kinds():
    commands = {args[0] for _, args, _ in CASES}
    every = {
        "info",
        "env",
        "check",
        "bench",
        "run",
        "exp1",
        "exp2",
        "exp3",
        "exp4",
        "exp5",
        "exp6",
        "predict",
        "calibrate",
        "plot",
        "report",
        "compare",
        "launch",
    }
    assert commands == every and len(CASES) >= 60 and len({i for i, _, _ in CASES}) == len(CASES)
    backends = {a[a.index("--backend") + 1] for _, a, _ in CASES if a[0] == "bench" and "--backend" in a}
    assert {"hf-paged", "vllm", "openai", "ollama", "synthetic", "sim"} <= backends


MODEL_CODE = ("transformers.modeling_utils", "vllm", "ray")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bench", "--model", "kvray/tiny-llama", "--backend", "openai", "--base-url", UNREACHABLE], "cannot reach"),
        (["bench", "--model", "kvray/tiny-llama", "--weights", "pretrained"], "no pretrained weights"),
        (["report", "."], "holds no results"),
        (["run", "job.yaml"], "positions"),
        (["launch", "--job", "ok.yaml", "--address", UNREACHABLE], "cannot reach"),
    ],
)
def test_real_entry_point(args, needle, tmp_path):
    """``python -m kvray.cli`` as a user runs it: one line, exit 2, seconds, no model code imported."""
    (tmp_path / "job.yaml").write_text(BAD_JOBS["bad-huge.yaml"])
    (tmp_path / "ok.yaml").write_text(GOOD_JOB)
    code = (
        "import sys, atexit\n"
        f"atexit.register(lambda: print(sorted(m for m in {MODEL_CODE!r} if m in sys.modules), file=sys.stderr))\n"
        "from kvray.cli import main\nmain(sys.argv[1:])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - t0
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr
    imported = eval(lines[1])  # the atexit line: model code imported on the way to the error
    assert imported == [] or args[0] == "launch" and imported == ["ray"], imported
    assert elapsed < 30.0 and sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "ok.yaml"]
