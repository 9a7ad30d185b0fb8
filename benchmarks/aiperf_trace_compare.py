"""kvray vs AIPerf replaying ONE Mooncake-format trace against ONE vLLM CPU server: TTFT and ITL p50.

Usage:  uv run python benchmarks/aiperf_trace_compare.py [--aiperf /tmp/aiperf-venv/bin/aiperf] [--rounds 4]
(AIPerf in its own virtualenv: ``uv venv /tmp/aiperf-venv && uv pip install --python /tmp/aiperf-venv aiperf``.)

The trace (written here, seeded): 40 requests, 128 tokens per hash id (AIPerf's ``--isl-block-size 128``, kvray's
``trace_block_toks: 128``), 8 documents shared as prefixes, ~2 req/s, 8 output tokens each. The server: kvray's
VLLMBackend serving kvray/tiny-llama (seeded random weights, fp32) from the CPU build, prefix caching off (AIPerf's
prompts are not kvray's, so only the lengths and the schedule may decide the timings). Each round runs, in an order
that rotates: AIPerf ``profile --custom-dataset-type mooncake_trace --fixed-schedule --use-server-token-count`` (its
prompts from its sonnet corpus read through the served tokenizer, unknown words as one ordinary token); the same
with kvray's request fields for a vLLM server added (``min_tokens``, ``return_token_ids``: the same requests as
kvray's); and kvray's ``replay`` load on the ``openai`` backend. Printed: each run's medians over requests with their
counts and the load average when it started, and the ratios of the medians over rounds.

Definitions compared (per request, then the median): TTFT — first token − request start (AIPerf), first token −
due time (kvray; also printed from the send, and its client's lag); ITL — (last − first token) ÷ (tokens − 1)
for both (kvray's TPOT, which leaves out streams its client read bunched; also printed over every request).
Skips (exit 0, one line) when AIPerf or the vLLM CPU venv is absent.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guidellm_compare import VLLM_VENV, _server_version  # noqa: E402

BLOCK, OUTPUT, REQUESTS = 128, 8, 40
SERVED_NAME = "kvray/tiny-llama"  # the name the server answers to (--served-model-name: the cell's model)


def start_server() -> Any:
    """kvray's VLLMBackend serving kvray/tiny-llama with prefix caching OFF: AIPerf's prompts are not kvray's (below),
    so only the lengths and the schedule may decide the timings."""
    from kvray.backends.vllm import VLLMBackend
    from kvray.spec import Cell, Workload, make_options

    cell = Cell(
        model=SERVED_NAME,
        workload=Workload.uniform(1, 32, 8),
        backend="vllm",
        dtype="fp32",
        device="cpu",
        options=make_options(enable_prefix_caching=False, extra_args="-O0"),
    )
    backend = VLLMBackend()
    backend.load(cell)
    return backend


def aiperf_tokenizer(model_path: str, out: Path) -> tuple[Path, str]:
    """(HF_HOME, repo id) of the served tokenizer with every unknown word read as ``w50``, laid out as a Hugging Face
    cache entry. AIPerf builds a trace's prompts from a text corpus (sonnet), which the tiny word-level vocabulary does
    not hold; so its prompts become ``w50 w50 …`` of the trace's lengths, one served token per word (the server's
    prefix caching is off: content does not matter). Why a cache entry and not a directory: AIPerf 0.13's
    prompt-building workers load the tokenizer in offline mode, where a local path goes to ``snapshot_download`` and
    fails (``HFValidationError``; the run dies with ``BrokenProcessPool`` in "Configure Profiling"); a repo id found
    in ``$HF_HOME`` with ``HF_HUB_OFFLINE=1`` loads in every process, and nothing is downloaded."""
    import shutil

    revision = "0" * 40
    entry = out / "hub" / "models--kvray--tiny-llama-words"
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    for f in Path(model_path).glob("*token*"):
        shutil.copy(f, snapshot / f.name)
    spec = json.loads((snapshot / "tokenizer.json").read_text())
    spec["model"]["unk_token"] = "w50"
    (snapshot / "tokenizer.json").write_text(json.dumps(spec))
    return out, "kvray/tiny-llama-words"


def write_trace(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t, lines = 0.0, []
    for i in range(REQUESTS):
        t += rng.exponential(0.5)
        doc, length = int(rng.integers(8)), int(rng.integers(2, 7))
        ids = [doc * 100 + j for j in range(length)] + [10_000 + i]
        lines.append(
            json.dumps(
                {
                    "timestamp": round(t * 1000),
                    "input_length": length * BLOCK + 64,
                    "output_length": OUTPUT,
                    "hash_ids": ids,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def run_aiperf(
    exe: str, url: str, model_path: str, trace: Path, out: Path, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    hf_home, tokenizer = aiperf_tokenizer(model_path, out / "hf")
    cmd = [
        exe,
        "profile",
        "-m",
        SERVED_NAME,
        "--url",
        url.removesuffix("/v1"),
        "--endpoint-type",
        "completions",
        "--streaming",
        "--input-file",
        str(trace),
        "--custom-dataset-type",
        "mooncake_trace",
        "--fixed-schedule",
        "--isl-block-size",
        str(BLOCK),
        "--tokenizer",
        tokenizer,
        "--use-server-token-count",
        "--extra-inputs",
        "ignore_eos:true",
        "--output-artifact-dir",
        str(out),
        "--no-gpu-telemetry",
        "--no-server-metrics",
        *extra,
    ]
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        log = out / "logs" / "aiperf.log"
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line][:3] if log.is_file() else []
        raise RuntimeError(
            f"aiperf failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}\n" + "\n".join(errors)
        )
    found = sorted(out.rglob("*aiperf*.json"))
    report = json.loads(next(p for p in found if "profile_export" in p.name).read_text())
    return report


def run_kvray(url: str, model_path: str, trace: Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """kvray's replay on the ``openai`` backend: its cell metrics, plus two per-request medians read from the traces
    for the comparison — TTFT from the send (AIPerf's start; kvray's own TTFT counts from the due time, so a client
    that fell behind adds its lag) and TPOT over every request (kvray's column leaves out streams its client read
    bunched, ``tpot_bunched_n``; AIPerf keeps all)."""
    from kvray.backends import get_backend
    from kvray.bench.cell import bench_cell
    from kvray.plan.replay import check_trace_key
    from kvray.runner.run import run_cell

    opts = check_trace_key({"path": str(trace), "format": "mooncake", "trace_block_toks": BLOCK})
    options = {"base_url": url, **(options or {})}
    cell = bench_cell(model_path, backend="openai", options=options, warmup=0, repeats=1, trace=opts)
    engine = get_backend("openai")
    try:
        result = run_cell(engine, cell)
    finally:
        engine.close()
    ok = [t for t in result.traces if t.status == "ok" and t.first_token_s is not None]
    from_send = [t.first_token_s - t.start_s for t in ok]  # type: ignore[operator]
    tpot_all = [(t.end_s - t.first_token_s) / (t.output_toks - 1) for t in ok if t.output_toks > 1]  # type: ignore[operator]
    return {
        **result.metrics,
        "ttft_from_send_s_p50": statistics.median(from_send),
        "ttft_from_send_s_n": len(from_send),
        "tpot_all_s_p50": statistics.median(tpot_all),
        "tpot_all_s_n": len(tpot_all),
    }


def stat(report: dict[str, Any], name: str) -> tuple[float, Any]:
    entry = report.get(name) or next((m for m in report.get("records", []) if m.get("tag") == name), {})
    return float(entry.get("p50")), entry.get("count", report.get("request_count", {}).get("avg"))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--aiperf", default="/tmp/aiperf-venv/bin/aiperf")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not Path(args.aiperf).is_file():
        print(
            f"skip: AIPerf not found at {args.aiperf} (uv venv /tmp/aiperf-venv && uv pip install --python "
            "/tmp/aiperf-venv aiperf)"
        )
        return 0
    if not os.environ.get("KVRAY_VLLM_PYTHON") and not VLLM_VENV.is_file():
        print(f"skip: no vLLM CPU build (KVRAY_VLLM_PYTHON unset, {VLLM_VENV} absent)")
        return 0
    os.environ.setdefault("KVRAY_VLLM_PYTHON", str(VLLM_VENV))
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True).stdout.strip()
    backend = start_server()
    url, model_path = backend.server.base_url, str(backend.model_path)
    kvray_name = f"kvray {importlib.metadata.version('kvray')}"
    server = _server_version(url)
    # AIPerf twice: as it comes, and sending the fields kvray sends a vLLM server (ignore_eos, min_tokens,
    # return_token_ids: kvray/backends/http/backend.py) — the same requests, so only the measuring differs
    tools = {
        f"aiperf {version}": (),
        f"aiperf {version} + kvray's fields": (
            "--extra-inputs",
            f"min_tokens:{OUTPUT}",
            "--extra-inputs",
            "return_token_ids:true",
        ),
        kvray_name: None,
    }
    names = list(tools)
    rows: list[tuple[Any, ...]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trace = write_trace(Path(tmp) / "trace.jsonl")
            for rnd in range(args.rounds):
                for k, tool in enumerate(names[rnd % 3 :] + names[: rnd % 3]):  # who goes first rotates
                    load = os.getloadavg()[0]
                    extra = tools[tool]
                    if extra is not None:
                        a = run_aiperf(args.aiperf, url, model_path, trace, Path(tmp) / f"a{rnd}-{k}", extra)
                        (ttft, n_t), (itl, n_i) = stat(a, "time_to_first_token"), stat(a, "inter_token_latency")
                        rows.append((tool, rnd + 1, load, ttft, n_t, itl, n_i, "", "", ""))
                        continue
                    m = run_kvray(url, model_path, trace)
                    rows.append(
                        (
                            tool,
                            rnd + 1,
                            load,
                            m["ttft_s_p50"] * 1e3,
                            m["ttft_s_n"],
                            m["tpot_s_p50"] * 1e3,
                            m["tpot_s_n"],
                            f"{m['client_lag_s_p99'] * 1e3:.1f}",
                            f"{m['ttft_from_send_s_p50'] * 1e3:.1f} ({m['ttft_from_send_s_n']})",
                            f"{m['tpot_all_s_p50'] * 1e3:.2f} ({m['tpot_all_s_n']})",
                        )
                    )
    finally:
        backend.close()
    print(
        f"one vLLM {server} CPU server, kvray/tiny-llama fp32; a {REQUESTS}-request Mooncake-format "
        f"trace ({BLOCK} tokens per hash id, {OUTPUT} output tokens), replayed at its timestamps"
    )
    print(
        "| tool | round | load avg | TTFT p50 ms | n | ITL/TPOT p50 ms | n | lag p99 ms | TTFT from send p50 (n) "
        "| TPOT all p50 (n) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tool, rnd, load, ttft, n_t, itl, n_i, lag, send, tpot_all in sorted(
        rows, key=lambda r: (r[1], names.index(r[0]))
    ):
        print(f"| {tool} | {rnd} | {load:.1f} | {ttft:.1f} | {n_t} | {itl:.2f} | {n_i} | {lag} | {send} | {tpot_all} |")
    for label, col in (("TTFT", 3), ("ITL", 5)):
        k_med = statistics.median(r[col] for r in rows if r[0] == kvray_name)
        for tool in names[:2]:
            a_med = statistics.median(r[col] for r in rows if r[0] == tool)
            print(
                f"{label}: median over rounds kvray {k_med:.2f} ms / {tool} {a_med:.2f} ms = {k_med / a_med:.2f} "
                "(target 0.75–1.25)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
