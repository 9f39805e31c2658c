#!/usr/bin/env bash
# The GPU (CUDA) path on a machine with an NVIDIA GPU, in under 5 minutes: parity with transformers on both
# bundled models in fp32/bf16/fp16, every quantized format loaded on CUDA against its dequantized weights
# with a 16-token greedy decode, and decode speed against transformers' static cache (scripts/gpu_check.py).
# Prints the GPU and one table; exits 1 on a failed check, 2 when there is no CUDA device.
#   [PYTHON=python3] bash scripts/gpu-check.sh [--skip-quantized] [--new-tokens N] [--smollm2 GGUF] [--gemma GGUF]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}  # PYTHON=python3: a machine's own torch with CUDA, llmctl from this checkout
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu-check: no $PY here; run scripts/install.sh first (or set PYTHON to a python with torch)" >&2
    exit 2
fi
[ "$PY" = .venv/bin/python ] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no CUDA device (nvidia-smi finds no NVIDIA GPU)" >&2
    exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
exec "$PY" scripts/gpu_check.py "$@"
