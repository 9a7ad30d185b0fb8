#!/usr/bin/env bash
# Build (or reuse) a virtualenv shaped like the lent GPU machine's own Python stack, for tests/test_gpu_stack.py:
# torch 2.11, transformers 5.17 (the oldest release kvray supports), accelerate, pandas, pyarrow, psutil,
# nvidia-ml-py, typer, rich, matplotlib — and NO ray, vllm, moto, fastapi, openai (the GPU machine has none of
# them and no network). kvray is not installed in it: it is imported from the source tree (PYTHONPATH), as
# `python3 benchmarks/gpu_check.py` does on the GPU machine. pytest (+ pytest-timeout) is the one addition, so the
# HF backends' own tests can run against transformers 5.17 too.
#
# Built with uv from this machine's Python 3.11 (no Python is downloaded; the GPU machine has 3.12); torch comes
# from PyPI (a CUDA build, ~3 GB, downloaded once into uv's cache: about 30 s here, then a few seconds).
# Cached outside the repo ($KVRAY_GPU_STACK_VENV, default ~/.cache/kvray/gpu-stack-venv), keyed by the package
# list below; a warm call takes a second. The last line printed is the venv's python. Progress goes to stderr.
set -euo pipefail
VENV="${KVRAY_GPU_STACK_VENV:-$HOME/.cache/kvray/gpu-stack-venv}"
TORCH="${KVRAY_GPU_STACK_TORCH:-torch==2.11.*}"
TRANSFORMERS="${KVRAY_GPU_STACK_TRANSFORMERS:-transformers==5.17.*}"
PACKAGES=("$TORCH" "$TRANSFORMERS" accelerate pandas pyarrow psutil nvidia-ml-py typer rich matplotlib pyyaml
  numpy httpx tokenizers pytest pytest-timeout)
ABSENT=(ray vllm moto fastapi openai)
KEY="$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-12)"
READY="$VENV/.kvray-ready-gpu-stack-$KEY"
UV="$(command -v uv || true)"
[ -n "$UV" ] || UV="$HOME/.local/bin/uv"
if [ ! -x "$UV" ]; then
  echo "gpu_stack_venv: uv not found (install it: python3 -m pip install uv)" >&2
  exit 1
fi
PYTHON="$(command -v python3.11 || command -v python3)"

FOUND='import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "transformers")))'
if [ ! -f "$READY" ] || ! "$VENV/bin/python" -c "$FOUND" >/dev/null 2>&1; then
  echo "building $VENV (${PACKAGES[*]})…" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$UV" venv --quiet --no-python-downloads --python "$PYTHON" "$VENV" >&2
  "$UV" pip install --quiet --python "$VENV/bin/python" "${PACKAGES[@]}" >&2
  # The point of this venv is what it lacks: refuse one that pulled any of them in as a dependency.
  for name in "${ABSENT[@]}"; do
    if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"; then
      echo "gpu_stack_venv: $name got installed (a dependency of the list above); the GPU machine has none" >&2
      exit 1
    fi
  done
  "$VENV/bin/python" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
  touch "$READY"
fi
echo "$VENV/bin/python"
