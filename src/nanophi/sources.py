"""Where text comes from: one function per data source, every one yielding `Document`s.

A source is a string, the same one the user passes as `--data`:

    pydoc (or nothing)   the CPython documentation topics shipped with Python (offline, ~465K characters)
    gutenberg:<id>       a Project Gutenberg book, downloaded once and cached, header and licence stripped
    FILE.jsonl           one JSON object per line, its "text" field is a document
    DIR                  every file under DIR matching --glob (default **/*.txt), in sorted order
    FILE                 any other existing file, read as UTF-8 text

All text is decoded the same way (strict UTF-8, BOM dropped, \\r\\n and \\r turned into \\n) so the same corpus
gives the same tokens on every platform. Large files are streamed in chunks of a few MB, so reading a corpus
never needs memory proportional to its size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nanophi.errors import UserError

log = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n"  # between documents, so one article's last line doesn't run into the next's title
CHUNK_BYTES = 4 * 1024 * 1024  # a file bigger than this is yielded in pieces of about this size
DEFAULT_GLOB = "**/*.txt"
GUTENBERG_URL = "https://www.gutenberg.org"  # overridden by $NANOPHI_GUTENBERG_URL (tests point it at loopback)
DOWNLOAD_TIMEOUT_S = 30.0
UTF8_BOM = "\ufeff"

SOURCE_FORMS = (
    "pydoc (the CPython docs, the default), gutenberg:<id> (a Project Gutenberg book), "
    'a .jsonl file with a "text" field per line, a directory (files matching --glob), or a text file'
)


@dataclass(frozen=True)
class Document:
    """One unit of text. `continues` marks a later chunk of the same file: join it with no separator."""

    name: str
    text: str
    continues: bool = False


# ----------------------------------------------------------------------------------------------------------------
# the public entry points


def iter_documents(
    source: str | None, *, glob: str = DEFAULT_GLOB, cache_dir: Path | None = None
) -> Iterator[Document]:
    """Yield the documents of `source` one at a time; raise UserError if it holds no text at all."""
    found_text = False
    for doc in _dispatch(source, glob=glob, cache_dir=cache_dir):
        found_text = found_text or (doc.text != "" and not doc.text.isspace())
        yield doc
    if not found_text:
        raise UserError(f"the corpus {source or 'pydoc'!r} is empty (no text in it); pass a source with text")


def iter_text_pieces(documents: Iterable[Document]) -> Iterator[str]:
    """The corpus as consecutive pieces of text: concatenated, they equal `read_text` exactly.

    The separator goes at the front of the next document rather than into a piece of its own, so a tokenizer
    fed piece by piece never sees a tiny piece.
    """
    first = True
    for doc in documents:
        if first or doc.continues:
            yield doc.text
        else:
            yield DOCUMENT_SEPARATOR + doc.text
        first = False


def read_text(source: str | None, *, glob: str = DEFAULT_GLOB) -> str:
    """The whole corpus as one string, documents separated by a blank line."""
    return "".join(iter_text_pieces(iter_documents(source, glob=glob)))


def cache_root() -> Path:
    """Where nanophi keeps downloads and prepared data: $NANOPHI_CACHE, else ~/.cache/nanophi."""
    env = os.environ.get("NANOPHI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanophi"


def _dispatch(source: str | None, *, glob: str, cache_dir: Path | None) -> Iterator[Document]:
    if source is None or source == "pydoc":
        return pydoc_documents()
    if source.startswith("gutenberg:"):
        book = source.removeprefix("gutenberg:")
        if not book.isdigit():
            raise UserError(f"{source!r} is not a Gutenberg book; write gutenberg:<number>, e.g. gutenberg:1342")
        return gutenberg_documents(int(book), cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return directory_documents(path, glob=glob)
    if path.is_file():
        return jsonl_documents(path) if path.suffix == ".jsonl" else file_documents(path)
    raise UserError(f"data source {source!r} does not exist; a source is one of: {SOURCE_FORMS}")


# ----------------------------------------------------------------------------------------------------------------
# the sources


def pydoc_documents() -> Iterator[Document]:
    """The CPython documentation topics (`pydoc_data.topics`), one document per topic, sorted by name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(name, normalize_newlines(topics[name]))


def file_documents(path: Path, *, name: str | None = None) -> Iterator[Document]:
    """One text file as one document, or as several `continues` chunks if it is larger than CHUNK_BYTES."""
    name = name or str(path)
    with open(path, "rb") as f:
        for i, (offset, chunk) in enumerate(_read_chunks(f, CHUNK_BYTES)):
            yield Document(name, decode_text(chunk, name, offset), continues=i > 0)


def directory_documents(root: Path, *, glob: str = DEFAULT_GLOB) -> Iterator[Document]:
    """Every file under `root` matching `glob`, in sorted path order so the corpus is the same on every run."""
    files = sorted((p for p in root.glob(glob) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"no files under {root} match --glob {glob!r}; pass a different --glob (e.g. '**/*.md')")
    for path in files:
        yield from file_documents(path, name=path.relative_to(root).as_posix())


def jsonl_documents(path: Path) -> Iterator[Document]:
    """One document per line of a JSON Lines file, from its "text" field; blank lines are skipped."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_text(raw, str(path), offset)
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}); each line must be an object") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{where} has no string "text" field; each line must be {{"text": "..."}}')
            yield Document(where, normalize_newlines(record["text"]))


def gutenberg_documents(book_id: int, cache_dir: Path | None = None) -> Iterator[Document]:
    """A Project Gutenberg book as one document, without Gutenberg's header and licence footer."""
    path = download_gutenberg(book_id, cache_dir)
    text = decode_text(path.read_bytes(), str(path))
    yield Document(f"gutenberg:{book_id}", strip_gutenberg(text))


# ----------------------------------------------------------------------------------------------------------------
# Project Gutenberg

# Modern books say "*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***", older ones "THIS" and "EBook"/"E-Book".
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
# Older books also end the text with "End of (the) Project Gutenberg's <Title>" before the END marker.
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (?:the )?Project Gutenberg\b)", re.I | re.M
)


def strip_gutenberg(text: str) -> str:
    """The book between Gutenberg's START and END marker lines (the licence is not part of the book)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def gutenberg_url(book_id: int) -> str:
    base = os.environ.get("NANOPHI_GUTENBERG_URL", GUTENBERG_URL).rstrip("/")
    return f"{base}/cache/epub/{book_id}/pg{book_id}.txt"


def download_gutenberg(book_id: int, cache_dir: Path | None = None) -> Path:
    """The raw book file, downloaded on first use into the cache and reused afterwards."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "gutenberg"
    path = cache_dir / f"pg{book_id}.txt"
    if path.is_file():
        return path
    url = gutenberg_url(book_id)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and resets are all OSErrors
        is_url_error = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
        reason = e.reason if is_url_error else e
        raise UserError(
            f"could not download gutenberg:{book_id} ({reason}); download {url} yourself and pass its path: "
            f"nanophi train --data FILE"
        ) from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the final name and rename, so an interrupted download never looks like a cached book.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".pg{book_id}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------------
# decoding


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_text(data: bytes, name: str, offset: int = 0) -> str:
    """Strict UTF-8 text with newlines normalised; `offset` is where `data` starts in its file (for errors)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(
            f"{name} looks binary (a NUL byte at byte offset {offset + nul}); pass text files only "
            f"(use --glob to select them in a directory)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{name} is not UTF-8 (invalid byte {data[e.start]:#04x} at byte offset {offset + e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if offset == 0 and text.startswith(UTF8_BOM):
        text = text[1:]
    return normalize_newlines(text)


def _read_chunks(f: BinaryIO, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of about `size` bytes, cut after a newline, never inside a UTF-8 character."""
    offset, carry = 0, b""
    while True:
        block = f.read(size)
        buf = carry + block
        if not block:  # end of file: whatever is left is the last piece
            if buf:
                yield offset, buf
            return
        cut = _cut_point(buf)
        yield offset, buf[:cut]
        offset += cut
        carry = buf[cut:]


def _cut_point(buf: bytes) -> int:
    newline = buf.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    # No newline in a whole chunk: cut before a character start, never inside one, and never between \r and \n.
    cut = len(buf)
    for _ in range(3):  # a UTF-8 character has at most 3 continuation bytes (0b10xxxxxx)
        if cut > 1 and buf[cut - 1] & 0xC0 == 0x80:
            cut -= 1
        else:
            break
    if cut > 1 and buf[cut - 1] & 0xC0 == 0xC0:  # the lead byte of the character we stopped at goes with it
        cut -= 1
    if cut > 1 and buf[cut - 1 : cut] == b"\r":
        cut -= 1
    return cut
