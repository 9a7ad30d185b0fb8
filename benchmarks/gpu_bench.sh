#!/usr/bin/env bash
# kvray bench on a GPU machine without Ray: facebook/opt-1.3b with random weights (no download), bf16, cuda:0,
# concurrency 1 2 4 8 16 × prompt 512 and 2048 tokens, 64 generated; one dataset, then a compact table.
#
#   bash benchmarks/gpu_bench.sh                # needs python with torch, transformers, typer, rich, pandas,
#                                               # pyarrow, psutil, numpy (nvidia-ml-py optional); never Ray
# Every knob can be overridden, which is also how it is smoke-tested on a CPU:
#   DEVICE=cpu DTYPE=fp32 MODEL=kvray/tiny-llama PROMPTS="16" CONCURRENCY="1 2" GEN=4 bash benchmarks/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
MODEL=${MODEL:-facebook/opt-1.3b}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bf16}
PROMPTS=${PROMPTS:-512 2048}
CONCURRENCY=${CONCURRENCY:-1 2 4 8 16}
GEN=${GEN:-64}
WARMUP=${WARMUP:-1}
REPEATS=${REPEATS:-3}
OUT=${OUT:-results/gpu-bench-$(date -u +%Y%m%dT%H%M%SZ)}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_VERBOSITY=error

# Use kvray from this checkout whether or not it was pip-installed (pip install -e . --no-deps also works).
if ! "$PY" -c "import kvray" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, transformers, typer, rich, pandas, pyarrow, psutil, numpy" || {
  echo "gpu_bench: a required library is missing (see the header of this script)" >&2
  exit 1
}
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

mkdir -p "$OUT"
failed=0
for p in $PROMPTS; do
  for c in $CONCURRENCY; do
    echo "== $MODEL $DTYPE on $DEVICE: concurrency $c, prompt $p, gen $GEN"
    "$PY" -m kvray.cli bench --model "$MODEL" --weights random --dtype "$DTYPE" --device "$DEVICE" \
      --prompt-toks "$p" --gen-toks "$GEN" --concurrency "$c" --warmup "$WARMUP" --repeats "$REPEATS" \
      --output "$OUT" --json > "$OUT/.last.json"
    rc=$?
    if [ "$rc" -eq 2 ]; then cat "$OUT/.last.json"; exit 2; fi  # bad flags: nothing else will work either
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('  ', d['status'], d['reason'] or '')" \
      "$OUT/.last.json"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
  done
done
rm -f "$OUT/.last.json"

"$PY" - "$OUT" <<'EOF'
import sys

from kvray.data.store import load_dataset

cells, _, _ = load_dataset(sys.argv[1])
GIB = 2**30
cols = ["conc", "prompt", "status", "TTFT p50", "TPOT p50", "ITL p99", "out tok/s", "peak alloc", "KV meas", "KV err"]
print(f"\n{cells['model'].iloc[0]} {cells['dtype'].iloc[0]} on {cells['hardware'].iloc[0]} — {sys.argv[1]}")
print(" ".join(f"{c:>10}" for c in cols))
for _, r in cells.sort_values(["prompt_toks", "concurrency"]).iterrows():
    ok = r["status"] == "ok"

    def num(key, scale=1.0, fmt="{:.1f}"):
        v = r.get(key)
        return fmt.format(v * scale) if ok and v is not None and v == v else "—"

    print(" ".join(f"{v:>10}" for v in (
        r["concurrency"], r["prompt_toks"], r["status"],
        num("ttft_s_p50", 1e3, "{:.1f}ms"), num("tpot_s_p50", 1e3, "{:.2f}ms"), num("itl_s_p99", 1e3, "{:.2f}ms"),
        num("output_tps", 1.0, "{:.0f}"), num("peak_allocated_bytes", 1 / GIB, "{:.2f}G"),
        num("kv_measured_bytes", 1 / GIB, "{:.3f}G"), num("kv_rel_error", 100, "{:+.1f}%"),
    )))
EOF
echo "dataset: $OUT (cells.parquet, traces.parquet, cell_<id>.json); $failed cell(s) not ok"
