"""Writing outputs so that no reader sees half of one and no link planted beside one redirects it.

* ``write_text`` / ``write_bytes`` — a file written to a temporary file that ``mkstemp`` creates
  (``O_CREAT | O_EXCL``: a symlink or file planted at the name makes it pick another) in the target's
  folder, then renamed over the target.
* ``private_dir`` — a ``.NAME.KIND-PID`` folder beside an output, made with ``mkdir`` mode 0700 (which
  never follows a link at that name), for what is written before the rename: only its owner can create
  or swap anything inside it.
* ``replace`` — puts a finished folder at an output that exists: one ``renameat2(RENAME_EXCHANGE)``
  where the kernel has it (the old output is never missing), else two renames, after which
  ``llmctl.quantize.convert.remove_dead_runs`` restores an orphaned ``.NAME.old-PID`` if the process died in
  between.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, never half-written, never through a link planted at the temporary name."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes, *, public: bool = False) -> None:
    """``data`` at ``path``, never half-written, never through a link planted at the temporary name.
    The file is private (0600, as ``mkstemp`` makes it) unless ``public``: then the mode ``open()`` would
    give a new file (0666 less the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if public:
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_dir(out: Path, kind: str) -> Path:
    """A new ``.NAME.KIND-PID`` folder (mode 0700) beside ``out``. One of this process's own earlier folders
    there (a reused PID) is removed first; FileExistsError when a link or another's file holds the name."""
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise
        shutil.rmtree(path)
        os.mkdir(path, 0o700)
    return path


def _renameat2():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2 if name else None
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the kernel or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here
        return False
    raise OSError(err, os.strerror(err), str(a))


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing an existing ``out`` (see module doc). A folder made
    by ``private_dir`` (0700 while it is written) gets the mode ``mkdir`` would give it (0777 less the
    umask) first: an output is for others to read, as any folder the user makes."""
    if tmp.is_dir() and not tmp.is_symlink():
        os.chmod(tmp, 0o777 & ~_umask())
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    if exchange(tmp, out):  # tmp now holds the old output
        _remove(tmp)
        return
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, trash)
    os.replace(tmp, out)
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
