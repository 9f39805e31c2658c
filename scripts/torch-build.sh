#!/usr/bin/env bash
# Prints which torch build scripts/install.sh installs here: "cuda" where an NVIDIA GPU and its driver
# answer (`nvidia-smi -L` lists a GPU), else "cpu". LLMCTL_TORCH=cpu|cuda chooses instead.
set -euo pipefail
case "${LLMCTL_TORCH:-auto}" in
    cpu | cuda) echo "$LLMCTL_TORCH" ;;
    auto)
        if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU '; then
            echo cuda
        else
            echo cpu
        fi
        ;;
    *)
        echo "error: LLMCTL_TORCH must be cpu, cuda or auto, got '$LLMCTL_TORCH'" >&2
        exit 2
        ;;
esac
