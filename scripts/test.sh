#!/usr/bin/env bash
# Runs the whole test suite (slow real-model tests included) with the .venv from scripts/install.sh, and
# vLLM's CPU build as an oracle in its own venv (scripts/vllm-venv.sh; LLMCTL_SKIP_VLLM=1 skips both).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the layering contracts in pyproject.toml ([tool.importlinter])
if [ "${LLMCTL_SKIP_VLLM:-0}" != 1 ]; then
    LLMCTL_VLLM_PYTHON=$(HF_HUB_OFFLINE=0 bash scripts/vllm-venv.sh | tail -n 1)
    export LLMCTL_VLLM_PYTHON
fi
exec .venv/bin/python -m pytest -q "$@"
