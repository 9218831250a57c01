"""prepare: split, dtype, meta, the content-hash cache, exact byte counts, streaming, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanophi import prepare as prep
from nanophi import sources
from nanophi.bench import bench_prepare
from nanophi.cli import main
from nanophi.errors import UserError
from nanophi.prepare import open_prepared, prepare, token_dtype
from nanophi.sources import read_text
from nanophi.tokenizer import BPETokenizer, HFTokenizer

PARAGRAPH = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want "
    "of a wife. Naïve café owners — “quoted” — say 日本語 and 🙂 too.\n"
)


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory of three small documents with multi-byte characters; NANOPHI_CACHE points into tmp_path."""
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"Document {i}.\n" + PARAGRAPH * (10 + i))
    return root


def all_tokens(data: prep.PreparedData) -> list[int]:
    return np.concatenate([data.train, data.val]).tolist()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_split_meta_and_exact_bytes(corpus: Path, kind: str) -> None:
    data = prepare(str(corpus), tokenizer=kind, vocab_size=300, val_fraction=0.1)
    text = read_text(str(corpus))
    m = data.meta
    n = m["n_tokens"]
    assert (m["train_tokens"], m["val_tokens"]) == (int(n * 0.9), n - int(n * 0.9))
    assert len(data.train) == m["train_tokens"] and len(data.val) == m["val_tokens"]
    assert data.dtype == np.uint16 and data.train.dtype == np.uint16
    assert isinstance(data.train, np.memmap) and not data.train.flags.writeable
    assert data.tokenizer.kind == kind and data.vocab_size == data.tokenizer.vocab_size
    # the tokens are the corpus, exactly: documents joined by a blank line, nothing added
    assert data.tokenizer.decode(all_tokens(data)) == text
    # val_bytes is the UTF-8 size of what the val tokens stand for (a BPE split can cut inside a character)
    lengths = data.tokenizer.token_byte_lengths()
    assert data.val_bytes == int(lengths[np.asarray(data.val)].sum())
    assert m["train_bytes"] + m["val_bytes"] == len(text.encode()) == m["corpus_bytes"]
    if kind == "char":
        assert data.val_bytes == len(data.tokenizer.decode(data.val.tolist()).encode())
    required = "source sha256 tokenizer vocab_size dtype n_tokens val_bytes train_bytes val_fraction documents"
    assert set(required.split()) | {"created", "nanophi_version"} <= m.keys()
    assert m["documents"] == 3 and m["source"] == str(corpus.resolve())
    assert data.dir.parent == corpus.parent / "cache" / "prepared" and data.dir.name == m["sha256"][:16]
    assert json.loads((data.dir / "meta.json").read_text()) == m


def test_cache_hit_and_key(corpus: Path) -> None:
    first = prepare(str(corpus))
    mtime = (first.dir / "train.bin").stat().st_mtime_ns
    second = prepare(str(corpus))
    assert second.dir == first.dir and second.meta == first.meta
    assert (second.dir / "train.bin").stat().st_mtime_ns == mtime  # not tokenized again
    assert prepare(str(corpus), vocab_size=123).dir == first.dir  # char vocabularies ignore --vocab-size
    assert prepare(str(corpus), val_fraction=0.2).dir != first.dir
    (corpus / "doc0.txt").write_text("changed " + (corpus / "doc0.txt").read_text())
    assert prepare(str(corpus)).dir != first.dir
    leftovers = [p.name for p in first.dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temporary directories were renamed or removed


def test_explicit_out_dir_and_replacing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = prepare(str(corpus), out_dir=out)
    assert a.dir == out and open_prepared(out).meta == a.meta
    b = prepare(str(corpus), out_dir=out, val_fraction=0.5)  # a different preparation replaces the old one
    assert b.meta["val_fraction"] == 0.5 and open_prepared(out).meta["sha256"] == b.meta["sha256"]
    other = tmp_path / "not-data"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="holds something else"):
        prepare(str(corpus), out_dir=other)
    assert (other / "keep.txt").read_text() == "mine"


def test_dtype_choice(corpus: Path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # A pretrained tokenizer with ids above 65535 (word-level, so the ids are easy to check) needs uint32.
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(read_text(str(corpus)).split()))
    vocab = {f"<unused{i}>": i for i in range(1 << 16)} | {w: (1 << 16) + i for i, w in enumerate(words)}
    rust = Tokenizer(models.WordLevel(vocab, unk_token="<unused0>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    data = prepare(str(corpus), tokenizer_obj=HFTokenizer(rust))
    assert data.dtype == np.uint32 and data.meta["tokenizer"] == "hf"
    assert min(all_tokens(data)) >= 1 << 16
    assert data.tokenizer.decode(all_tokens(data)) == " ".join(read_text(str(corpus)).split())


def test_pretrained_tokenizer_obj_is_used_and_keyed(corpus: Path) -> None:
    tok = BPETokenizer.train([PARAGRAPH * 3], vocab_size=280)
    data = prepare(str(corpus), tokenizer_obj=tok)
    assert data.vocab_size == tok.vocab_size
    assert data.train[:50].tolist() == tok.encode(read_text(str(corpus)))[:50]
    other = BPETokenizer.train([PARAGRAPH * 3], vocab_size=300)
    assert prepare(str(corpus), tokenizer_obj=other).dir != data.dir


def test_streams_through_small_chunks(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tiny file chunks, segments and batches, the tokens still spell the corpus exactly."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)
    monkeypatch.setattr(prep, "SEGMENT_CHARS", 37)
    monkeypatch.setattr(prep, "BATCH_CHARS", 200)
    monkeypatch.setattr(prep, "READ_TOKENS", 64)
    text = read_text(str(corpus))
    for kind in ("char", "bpe"):
        data = prepare(str(corpus), tokenizer=kind, vocab_size=300)
        assert data.tokenizer.decode(all_tokens(data)) == text
        assert data.meta["train_bytes"] + data.val_bytes == len(text.encode())
    # the encode_batch path (tokenizers without encode_array)
    data = prepare(str(corpus), tokenizer_obj=HFTokenizer(BPETokenizer.train([text], vocab_size=290).tokenizer))
    assert data.tokenizer.decode(all_tokens(data)) == text


def test_errors(corpus: Path, tmp_path: Path) -> None:
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(UserError, match="--val-fraction"):
            prepare(str(corpus), val_fraction=bad)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    with pytest.raises(UserError, match="too small: 3 tokens"):
        prepare(str(tiny))
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "prepared").iterdir())


def test_open_prepared_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="meta.json is missing"):
        open_prepared(tmp_path / "nowhere")
    data = prepare(str(corpus))
    (data.dir / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="truncated"):
        open_prepared(data.dir)
    (data.dir / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        open_prepared(data.dir)
    (data.dir / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="corrupt"):
        open_prepared(data.dir)


def test_cli(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "o"
    argv = ["--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300", "--val-fraction", "0.2"]
    assert main(["prepare", *argv, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and out.startswith(f"{out_dir}: ")
    meta = open_prepared(out_dir).meta
    assert f"{meta['n_tokens']:,} tokens" in out and "vocab 300 (bpe)" in out and meta["val_fraction"] == 0.2
    assert main(["prepare", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_prepare_grows_corpus(corpus: Path) -> None:
    result = bench_prepare(str(corpus), tokenizer="char", megabytes=0.2)
    assert result["megabytes"] == pytest.approx(0.2, abs=0.01)
    assert result["tokens"] > 0 and result["mb_per_s"] > 0 and result["peak_rss_mb"] > 0
