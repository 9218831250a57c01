"""Data sources: every kind of --data, the decoding rules, and Gutenberg download/caching against loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serve_gutenberg

from nanophi import sources
from nanophi.errors import UserError
from nanophi.sources import Document, iter_documents, iter_text_pieces, read_text, strip_gutenberg

BOOK = "It is a truth universally acknowledged,\nthat a single man… wants a wife.\n"
GUTENBERG_FILE = (
    "\ufeffThe Project Gutenberg eBook of Pride and Prejudice\r\n\r\n"
    "This eBook is for the use of anyone anywhere.\r\n\r\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***\r\n\r\n"
    + BOOK.replace("\n", "\r\n")
    + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK PRIDE AND PREJUDICE ***\r\n\r\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg™ electronic works\r\n"
)


def test_pydoc_is_the_default_and_sorted() -> None:
    docs = list(iter_documents(None))
    assert len(docs) > 50
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert [d.name for d in iter_documents("pydoc")] == names
    assert read_text(None) == "\n\n".join(d.text for d in docs)


def test_text_file_newlines_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\r\ntwo\rthree\n".encode())
    assert read_text(str(path)) == "one\ntwo\nthree\n"


def test_binary_file_names_offset(tmp_path: Path) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(b"abc\x00def")
    with pytest.raises(UserError, match=r"blob\.txt.*binary.*offset 3"):
        read_text(str(path))


def test_non_utf8_names_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8.*offset 3"):
        read_text(str(path))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(UserError, match="empty"):
            read_text(str(tmp_path / name))
    with pytest.raises(UserError, match="empty"):
        read_text(str(tmp_path))


def test_missing_path_lists_the_forms(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist.*gutenberg:<id>.*\.jsonl"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="gutenberg:<number>"):
        read_text("gutenberg:pride")


def test_directory_glob_sorted(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("markdown")
    docs = list(iter_documents(str(tmp_path)))
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/a.txt"]
    assert read_text(str(tmp_path)) == "first\n\nbee\n\nay"
    assert read_text(str(tmp_path), glob="*.md") == "markdown"
    with pytest.raises(UserError, match=r"\*\.rst"):
        read_text(str(tmp_path), glob="*.rst")


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "first\r\ndoc", "id": 1}), "", json.dumps({"text": "ünïcode ✓"})]
    path.write_text("\n".join(lines) + "\n")
    docs = list(iter_documents(str(path)))
    assert [d.text for d in docs] == ["first\ndoc", "ünïcode ✓"]
    assert docs[1].name.endswith("docs.jsonl:3")
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"docs\.jsonl:2 is not valid JSON"):
        read_text(str(path))
    path.write_text(json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(UserError, match=r'docs\.jsonl:1 has no string "text"'):
        read_text(str(path))


def test_large_file_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    lines = "".join(f"line {i}: naïve café 日本語 🙂\r\n" for i in range(40))
    text = lines + "é" * 100 + "🙂" * 50 + "\r\nend"  # the last line is longer than a chunk
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode())
    docs = list(iter_documents(str(path)))
    assert len(docs) > 10
    assert not docs[0].continues and all(d.continues for d in docs[1:])
    assert all(len(d.text.encode()) <= 2 * 64 for d in docs)
    assert "".join(iter_text_pieces(docs)) == text.replace("\r\n", "\n")


def test_bad_byte_offset_is_exact_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    data = b"x" * 30 + b"\n" + "é".encode() * 60 + b"\n" + b"\xff" + b"tail\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    bad_offset = data.index(b"\xff")
    with pytest.raises(UserError, match=f"offset {bad_offset}"):
        read_text(str(path))


def test_separator_goes_between_documents_only() -> None:
    docs = [Document("a", "one"), Document("a", " more", continues=True), Document("b", "two")]
    assert list(iter_text_pieces(docs)) == ["one", " more", "\n\ntwo"]


# ----------------------------------------------------------------------------------------------------------------
# Project Gutenberg


def test_strip_gutenberg_modern_and_old() -> None:
    text = sources.decode_text(GUTENBERG_FILE.encode(), "pg1342.txt")
    assert strip_gutenberg(text) == BOOK.strip()
    old = (
        "Project Gutenberg's Alice, by Lewis Carroll\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES ***\n\nDown the rabbit hole.\n\n"
        "End of Project Gutenberg's Alice's Adventures in Wonderland\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK ALICE ***\nlicence\n"
    )
    assert strip_gutenberg(old) == "Down the rabbit hole."
    assert strip_gutenberg("no markers here\n") == "no markers here"


@pytest.fixture
def gutenberg_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A loopback HTTP server holding book 1342 where gutenberg.org does; yields the list of paths requested."""
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    with serve_gutenberg(tmp_path, GUTENBERG_FILE, monkeypatch) as requests:
        yield requests


def test_gutenberg_download_then_cache(gutenberg_server: list[str], tmp_path: Path) -> None:
    assert read_text("gutenberg:1342") == BOOK.strip()
    assert gutenberg_server == ["/cache/epub/1342/pg1342.txt"]
    cached = tmp_path / "cache" / "gutenberg" / "pg1342.txt"
    assert cached.read_bytes() == GUTENBERG_FILE.encode()  # the raw file, cleaned on every read
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no leftover partial download
    assert read_text("gutenberg:1342") == BOOK.strip()
    assert len(gutenberg_server) == 1  # the second read came from the cache


def test_gutenberg_http_error(gutenberg_server: list[str]) -> None:
    with pytest.raises(UserError, match=r"could not download gutenberg:7 \(HTTP Error 404"):
        read_text("gutenberg:7")


def test_gutenberg_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on: connecting fails at once, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NANOPHI_GUTENBERG_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(UserError) as e:
        read_text("gutenberg:1342")
    message = str(e.value)
    assert message.startswith("could not download gutenberg:1342 (")
    assert f"download http://127.0.0.1:{port}/cache/epub/1342/pg1342.txt yourself" in message
    assert message.endswith("nanophi train --data FILE") and "\n" not in message
