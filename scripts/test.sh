#!/usr/bin/env bash
# Runs the whole test suite (slow real-model tests included) with the .venv from scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
