"""Optional one-pass C++ kernels for the hot loops of quantization (NF4 codes; int4/int8 group codes; GPTQ's
column sweep) and
for decoding fp8 / NF4 weights without dequantizing them (``fp8_linear``, ``nf4_linear``: matrix-vector
products on the stored codes), compiled once with ``torch.utils.cpp_extension`` and cached
(``~/.cache/torch_extensions``).

The quantization kernels compute exactly what the eager torch code in ``llmctl.quant.formats`` computes —
same fp32 operations (multiply by the reciprocal for NF4 as bitsandbytes does, divide for int, round half
to even, fp16 scales rounded up) — in one pass over the input instead of a dozen, so they are an
accelerator, never a different result (tests/test_quant_formats.py checks byte equality). The decode
kernels equal the product with the dequantized weight up to fp32 summation order (tested).

Building takes 30 s to a few minutes and needs a C++ compiler, so it never happens behind a user's back:
``build()`` (``python -m llmctl.quant.native``, run by scripts/install.sh, or ``bench/quantize.py``)
compiles; afterwards ``get()`` loads the cached build and the formats and ``QuantWeight`` use it.
``LLMCTL_NATIVE=0`` turns it off.

Loading a library runs its code as the caller, and its path is predictable, so a library is loaded only
from folders nobody else can write (``_check_private``): otherwise ``get()`` and ``build()`` refuse with a
``UsageError`` saying which folder and how to fix it, rather than run without the kernels unannounced.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError

# The kernels' C++ (package data in kernels/, a file per kind of kernel), compiled as one translation unit in
# this order (each part uses what the parts before it define).
KERNEL_FILES = ("common", "quantize", "gptq", "fp8", "nf4", "int4", "int8", "dense", "gram", "decode_step")
_SOURCE = "".join((Path(__file__).parent / "kernels" / f"{k}.cpp").read_text(encoding="utf-8") for k in KERNEL_FILES)


def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists for this CPU (empty where there is none)."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
        line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        _CPU_FLAGS = frozenset(line.partition(":")[2].split())
    return _CPU_FLAGS


_CPU_FLAGS: frozenset[str] | None = None


def _flags() -> list[str]:
    """-O3, plus AVX2/FMA/F16C and AVX-512 (F, BW, VL, VNNI) when this CPU has them (the flags are part of
    the build's name, so a cached build only ever runs where it was built for)."""
    flags = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP pragmas in the header: serial without it
    cpu = cpu_flags()
    if {"avx2", "fma", "f16c"} <= cpu:
        flags += ["-mavx2", "-mfma", "-mf16c"]
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu:
            # the AVX-512 VNNI kernels (int4_paths: "avx512"); the compiler's own loops stay 256 bits wide
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"]
            if "avx512_bf16" in cpu:  # vdpbf16ps for bf16 weights (dense_linear, gram_bf16)
                flags.append("-mavx512bf16")
    return flags


_FLAGS = _flags()
_NAME = "llmctl_quant_" + hashlib.sha256((_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:10]
_module: Any = None
_failed = False


def _enabled() -> bool:
    return os.environ.get("LLMCTL_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _build_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    old = os.umask(0o077)  # the folders torch creates here are the caller's alone (_check_private)
    try:
        return Path(_get_build_directory(_NAME, False))
    finally:
        os.umask(old)


def _check_private(directory: Path) -> None:
    """Refuse a build folder another user could have written: the library in it, and every folder from it
    up to the extensions root (``TORCH_EXTENSIONS_DIR`` or torch's default), must be owned by the caller
    and not writable by group or others."""
    if not hasattr(os, "geteuid"):  # no POSIX owners and modes (Windows)
        return
    from torch.utils.cpp_extension import get_default_build_root

    env = os.environ.get("TORCH_EXTENSIONS_DIR")  # as torch reads it (_get_build_directory)
    root = Path(env if env is not None else get_default_build_root())
    library = directory / f"{_NAME}.so"
    paths = [library] if library.exists() else []
    for folder in (directory, *directory.parents):
        paths.append(folder)
        if folder == root:
            break
    for path in paths:
        st = path.stat()
        problem = (
            f"is owned by user id {st.st_uid}, not by you" if st.st_uid != os.geteuid()
            else f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            else None
        )  # fmt: skip
        if problem:
            raise UsageError(
                f"refusing to load llmctl's C++ kernels: {path} {problem}, so another user could have planted "
                f"the library; remove {directory} and rebuild (python -m llmctl.quant.native), point "
                "TORCH_EXTENSIONS_DIR at a folder only you can write, or set LLMCTL_NATIVE=0"
            )


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an flock on the build folder while building or loading.

    torch's own lock (``FileBaton``) is a file created with O_EXCL and removed when the build ends; a build
    that is killed (Ctrl-C, SIGKILL, a machine stopped mid-compile) leaves it behind and every later
    ``load_inline`` of that name waits for it forever. An flock is released by the kernel when its holder
    dies, so while we hold ours no other llmctl build is running and a leftover torch lock is stale."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock alone
        yield
        return
    with open(directory / "llmctl.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build() -> Any:
    """Compile (or load the cached) kernels; raises when no compiler is available."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load_inline

        directory = _build_dir()
        _check_private(directory)
        with _locked(directory):
            _module = load_inline(_NAME, cpp_sources=_SOURCE, functions=["nf4", "int_group", "gptq_sweep", "fp8_linear", "nf4_linear", "nf4_code_table", "int4_linear", "int4_dequant", "int8_linear", "dense_linear", "dense_rows_mode", "gram_bf16", "gram_bf16_available", "int4_paths", "decode_plan", "decode_free", "decode_step", "decode_tail", "decode_token"],
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(directory),
                                  verbose=False)  # fmt: skip
        _configure(_module)
    return _module


DENSE_ROWS_ENV = "LLMCTL_DENSE_ROWS"


def _configure(module: Any) -> None:
    """``LLMCTL_DENSE_ROWS=1|4`` overrides how ``dense_linear`` reads rows (one at a time front to back, or
    four at a time with prefetch; by default the CPU's vendor chooses: AMD 1, others 4) for comparisons."""
    value = os.environ.get(DENSE_ROWS_ENV, "").strip()
    if value:
        if value not in ("1", "4"):
            raise UsageError(f"{DENSE_ROWS_ENV} must be 1 or 4, got {value!r}; unset it for the CPU's default")
        module.dense_rows_mode(int(value))


def _load_built() -> Any:
    """The cached build imported as it is (no compiler, no torch lock), or None when there is none."""
    directory = _build_dir()
    library = directory / f"{_NAME}.so"
    if not library.is_file():
        return None
    _check_private(directory)
    import importlib.util

    import torch  # noqa: F401  (the extension links against libtorch)

    with _locked(directory):
        spec = importlib.util.spec_from_file_location(_NAME, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    _configure(module)
    return module


def get() -> Any:
    """The kernels when enabled and already built, else None (the formats then run eager torch)."""
    global _failed, _module
    if not _enabled():
        return None
    if _module is not None or _failed:
        return _module
    try:
        _module = _load_built()
    except UsageError:  # a library someone else could have planted: never loaded
        raise
    except Exception:  # a broken cache: eager torch computes the same bytes
        _failed = True
    return _module


if __name__ == "__main__":
    build()
    print(f"built {_NAME}")
