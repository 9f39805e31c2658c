"""Everything of llama-cpp-python that llmctl uses goes through here: the library itself (``load``), the
guard every ``Llama`` is built under (``load_guard``), its native output captured and read (``captured_native_output``,
``log_detail``), a vocabulary probed in a child process before the parent loads it (``probe_vocabulary``),
and ggml's own C quantizer library (``ggml_base_library``). The tokenizer, the llama.cpp chat backend, the
eval scorer and the GGUF writer call these, never ``import llama_cpp`` themselves.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.errors import FormatError


def load() -> Any:
    """The ``llama_cpp`` module (llama-cpp-python, a dependency of llmctl)."""
    import llama_cpp

    return llama_cpp


def ggml_base_library() -> Path:
    """Where llama-cpp-python keeps libggml-base (ggml's C functions, e.g. ``ggml_quantize_chunk``)."""
    return Path(load().__file__).parent / "lib" / "libggml-base.so"


@contextlib.contextmanager
def load_guard() -> Iterator[None]:
    """While a ``llama_cpp.Llama`` is built (not thread-safe: build models from one thread at a time):

    * **plain CPU kernels**: no CPU "extra" buffer types (AMX, repacked weights). On AMX-capable Xeons under
      a VM (this project's machines) the AMX matmul kills the process with SIGSEGV at the first multi-token
      decode; the plain kernels compute the same numbers. llama-cpp-python has no keyword for
      ``use_extra_bufts``, so its default model parameters are wrapped.
    * **no chat templates**: llama-cpp-python compiles every ``tokenizer.chat_template*`` value of the file
      with jinja2, unbounded and outside llmctl's sandbox, for chat handlers llmctl never uses (a 2.4 MB
      template took 2.9 GB and 60 s; a syntax error in a named one raised). The metadata it reads leaves them
      out; llmctl renders the model's template itself (``chat_template``).
    """
    import llama_cpp._internals as internals
    import llama_cpp.llama as ll

    module = ll.llama_cpp
    orig_params = module.llama_model_default_params
    orig_metadata = internals.LlamaModel.metadata

    def params():  # type: ignore[no-untyped-def]
        p = orig_params()
        p.use_extra_bufts = False
        return p

    def metadata(model):  # type: ignore[no-untyped-def]
        return {k: v for k, v in orig_metadata(model).items() if not k.startswith("tokenizer.chat_template")}

    module.llama_model_default_params = params
    internals.LlamaModel.metadata = metadata
    try:
        yield
    finally:
        module.llama_model_default_params = orig_params
        internals.LlamaModel.metadata = orig_metadata


PROBE_TIMEOUT_S = 300.0
_PROBED: set[tuple[Any, ...]] = set()


def probe_vocabulary(path: Path) -> None:
    """Load the vocabulary in a forked child first, once per file and process. llama.cpp still aborts on some
    files ``check_vocabulary`` lets through (a ``GGML_ASSERT``, an uncaught C++ exception: exit 134, nothing
    printed); then only the child dies, and its log says why. Where there is no ``fork`` it is skipped."""
    llama_cpp = load()

    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _PROBED or not hasattr(os, "fork"):
        return
    with tempfile.TemporaryFile() as log:
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork() in a process with threads
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                pid = os.fork()
            except OSError:  # no process to spare: load without the safety net
                return
        if pid == 0:  # the child: load, answer with the exit status, never return to the caller
            code = 4
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os.environ["GGML_NO_BACKTRACE"] = "1"  # no gdb attaching itself to print a backtrace
                faulthandler.disable()  # a crash here is an answer, not one to dump a traceback for

                def write_log(level: int, text: bytes, data: Any) -> None:  # every level, straight to fd 2
                    os.write(2, text)

                callback = llama_cpp.llama_log_callback(write_log)
                llama_cpp.llama_log_set(callback, None)
                params = llama_cpp.llama_model_default_params()
                params.vocab_only = True
                code = 0 if llama_cpp.llama_model_load_from_file(os.fsencode(path), params) else 3
            finally:
                os._exit(code)
        status = _wait_child(pid, PROBE_TIMEOUT_S)
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    if status is None:
        raise FormatError(
            f"{path}: llama.cpp took more than {PROBE_TIMEOUT_S:g} s to read the vocabulary; the file is "
            "corrupt or hostile — re-download it"
        )
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        raise FormatError(
            f"{path}: llama.cpp crashes reading the vocabulary ({signal.Signals(-code).name}: "
            f"{log_detail(text) or 'no message'}); the file is corrupt or hostile — re-download it"
        )
    if code == 3:
        raise FormatError(f"{path}: llama.cpp cannot load the vocabulary ({log_detail(text)})")
    if code == 0:
        _PROBED.add(key)
    # any other status: the probe itself failed in Python; the load in this process reports what it finds


def _wait_child(pid: int, timeout_s: float) -> int | None:
    """The wait status of child ``pid``; ``None`` (the child killed) past ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    done = 0
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
    finally:
        if not done:  # timed out or interrupted
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def close_quietly(llm: Any) -> None:
    with captured_native_output():
        llm.close()


class _Captured:
    text = ""


@contextlib.contextmanager
def captured_native_output() -> Iterator[_Captured]:
    """Capture what llama.cpp prints: its log callback writes to ``sys.stderr``, native code to fd 2."""
    cap = _Captured()
    py_err = io.StringIO()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        with contextlib.redirect_stderr(py_err):
            yield cap
        cap.text = py_err.getvalue()
        return
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stderr(py_err):
                yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            native.seek(0)
            cap.text = py_err.getvalue() + native.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


_ASSERTION = re.compile(r"([\w.+-]+\.(?:c|cc|cpp|h):\d+: .*)")  # ggml_abort: "path/file.cpp:123: message"
_WHAT = re.compile(r"terminate called after throwing an instance of '([^']*)'\s*what\(\):\s*(.*)")


def log_detail(text: str) -> str:
    """What a llama.cpp log says went wrong, on one line: a failed assertion (file and line, without the
    build's path), an uncaught C++ exception, the loader's error, else the last line."""
    if m := _ASSERTION.search(text):
        return m.group(1).strip()
    if m := _WHAT.search(text):
        return f"uncaught {m.group(1)}: {m.group(2).strip()}"
    errors = [ln for ln in text.splitlines() if "error loading model: " in ln]
    if errors:
        return errors[-1].rsplit("error loading model: ", 1)[1].strip()
    return _last_line(text)


# ---- entry point ---------------------------------------------------------------------------------
