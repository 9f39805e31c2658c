"""``llmctl`` itself, run by the python of vLLM's venv (scripts/vllm-venv.sh), for tests/test_vllm_backend.py:

    VLLM_PYTHON tests/oracles/vllm_llmctl.py eval FOLDER --backend vllm ...   # the arguments of `llmctl`

with llmctl importable (PYTHONPATH: the checkout). The one thing it adds to `llmctl`: the dequantizing
stand-in of tests/oracles/vllm_logprobs.py replaces vLLM's int4 kernel's two methods (``cpu_gemm_wna16``,
AVX-512 builds only; where it exists it computes in bf16, 1–3 % of NLL from llmctl's reading on SmolLM2), as
the oracle test's "auto" does; everything else vLLM runs as shipped. ``LLMCTL_TEST_INT4_KERNEL=native``
keeps vLLM's own (the refusal test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_logprobs import _Int4Emulation

    from llmctl.cli import main
    from llmctl.runtime.vllm_engine import import_vllm

    import_vllm()  # llmctl's environment for vLLM, before vLLM is imported below
    if os.environ.get("LLMCTL_TEST_INT4_KERNEL") != "native":  # the stand-in on every CPU, as the oracle's "auto"
        _Int4Emulation().set(True)
    sys.argv[0] = "llmctl"
    main()
