"""Corpus -> tokenizer + train/val token files, cached by content hash (nanoGPT's prepare.py, for any source).

    nanophi prepare --data books/ --tokenizer bpe --vocab-size 8192

writes, into $NANOPHI_CACHE/prepared/<hash>/ (or --out DIR):

    train.bin, val.bin   flat token ids (uint16 when the vocabulary fits, else uint32): the first
                         (1 - val_fraction) of the corpus's tokens, then the rest, contiguous as in nanoGPT
    tokenizer/           the tokenizer, loadable with `nanophi.tokenizer.load_tokenizer`
    meta.json            what was prepared from what (written last: its presence marks a complete preparation)

The hash covers the text, the tokenizer settings and the split, so preparing the same thing twice is free and
changing any of them prepares afresh. Work happens in a temporary directory renamed into place at the end, so a
crash never leaves a half-written entry. Memory stays flat in the corpus size: the source is streamed in batches
of pieces through `encode_batch` (multi-threaded for BPE) and the tokens are appended to a file.

Byte-level BPE is trained on the first BPE_TRAIN_SAMPLE_BYTES of the corpus only: merges learnt from 10 MB of
text barely differ from those learnt from all of it, and training time and memory grow with the sample.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import nanophi
from nanophi.errors import UserError
from nanophi.sources import DEFAULT_GLOB, Document, cache_root, iter_documents, iter_text_pieces
from nanophi.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

PREPARE_FORMAT = 1  # bump when the layout changes, so old cache entries are not mistaken for new ones
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
BPE_TRAIN_SAMPLE_BYTES = 10_000_000
SEGMENT_CHARS = 1 << 18  # pieces are cut to at most this many characters before encoding...
BATCH_CHARS = 8 << 20  # ...and handed to encode_batch this many characters at a time (one batch in memory)
IN_FLIGHT_PER_WORKER = 4  # segments queued per encoding thread: enough to keep it busy, few enough for memory
READ_TOKENS = 1 << 22  # tokens per read when splitting and counting bytes
MIN_SPLIT_TOKENS = 2  # the smallest train or val split `prepare` accepts; the trainer checks block_size
MB = 1_000_000


@dataclass
class PreparedData:
    """A prepared corpus: its directory, meta.json, tokenizer, and train/val tokens as read-only memmaps."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    _train: np.memmap | None = field(default=None, init=False, repr=False)
    _val: np.memmap | None = field(default=None, init=False, repr=False)

    @property
    def train(self) -> np.memmap:
        if self._train is None:
            self._train = np.memmap(self.dir / "train.bin", dtype=self.dtype, mode="r")
        return self._train

    @property
    def val(self) -> np.memmap:
        if self._val is None:
            self._val = np.memmap(self.dir / "val.bin", dtype=self.dtype, mode="r")
        return self._val

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes the val tokens decode to: val loss (nats/token) * val_tokens / val_bytes / ln 2 = bits/byte."""
        return int(self.meta["val_bytes"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])


class _PhaseTimer:
    """Wall-clock and CPU seconds of each phase of `prepare` (recorded in meta.json, read by bench.bench_prepare)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = round(time.perf_counter() - wall, 3)
        self.cpu[name] = round(time.process_time() - cpu, 3)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------------------------
# prepare


def prepare(
    source: str | None = None,
    *,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    glob: str = DEFAULT_GLOB,
    out_dir: Path | None = None,
    tokenizer_obj: Tokenizer | None = None,
) -> PreparedData:
    """Tokenize `source` into train/val token files, or return the cached preparation of the same inputs.

    `tokenizer_obj` (e.g. a pretrained model's tokenizer) is used as is instead of training a `tokenizer`.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}; e.g. 0.1")
    from nanophi.config import MAX_VOCAB, check_range

    check_range("vocab_size", vocab_size, 2, MAX_VOCAB)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory; pass an empty or new --out")
    try:
        return _prepare(source, tokenizer, vocab_size, val_fraction, glob, out_dir, tokenizer_obj)
    except OSError as e:
        from nanophi.checkpoint import DISK_ERRNOS

        if e.errno not in DISK_ERRNOS:
            raise
        raise UserError(f"cannot write prepared data to {e.filename or out_dir or cache_root()}: {e.strerror}; "
                        "free space, or choose a writable --out (or $NANOPHI_CACHE)") from None


def _prepare(
    source: str | None,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    glob: str,
    out_dir: Path | None,
    tokenizer_obj: Tokenizer | None,
) -> PreparedData:
    timer = _PhaseTimer()
    with timer.phase("hash"):
        corpus = _scan_corpus(source, glob)
    kind = tokenizer_obj.kind if tokenizer_obj is not None else tokenizer
    key = _cache_key(corpus["sha256"], kind, vocab_size, val_fraction, tokenizer_obj)
    out = Path(out_dir) if out_dir is not None else cache_root() / "prepared" / key[:16]

    existing = _read_meta(out)
    if existing is not None and existing.get("sha256") == key:
        log.info("using prepared data in %s", out)
        return open_prepared(out)
    if existing is None and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and holds something else than prepared data; pass an empty or new --out")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        meta = _prepare_into(tmp, source, glob, kind, vocab_size, val_fraction, tokenizer_obj, corpus, timer)
        meta = {"sha256": key, **meta}
        # meta.json last: a directory without it is an unfinished preparation.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _install(tmp, out, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_prepared(out)


def _prepare_into(
    tmp: Path,
    source: str | None,
    glob: str,
    kind: str,
    vocab_size: int,
    val_fraction: float,
    tokenizer_obj: Tokenizer | None,
    corpus: dict[str, Any],
    timer: _PhaseTimer,
) -> dict[str, Any]:
    trained_bpe = kind == "bpe" and tokenizer_obj is None
    with timer.phase("train_tokenizer"):
        if tokenizer_obj is not None:
            tok = tokenizer_obj
        else:
            sample = _pieces(source, glob)
            if kind == "bpe":
                log.info("training a %d-token BPE on the first %.0f MB", vocab_size, BPE_TRAIN_SAMPLE_BYTES / MB)
                sample = _first_bytes(sample, BPE_TRAIN_SAMPLE_BYTES)
            tok = train_tokenizer(kind, sample, vocab_size)
        tok.save(tmp / TOKENIZER_DIR)

    dtype = token_dtype(tok.vocab_size)
    all_path = tmp / "tokens.bin"
    with timer.phase("encode"):
        log.info("tokenizing %.1f MB with the %s tokenizer (%d tokens)", corpus["bytes"] / MB, kind, tok.vocab_size)
        n_tokens = _encode_to_file(tok, _pieces(source, glob), all_path, dtype)

    n_train = int(n_tokens * (1 - val_fraction))
    n_val = n_tokens - n_train
    if min(n_train, n_val) < MIN_SPLIT_TOKENS:
        raise UserError(
            f"the corpus is too small: {n_tokens} tokens give {n_train} train and {n_val} val tokens "
            f"(need at least {MIN_SPLIT_TOKENS} each); pass more text or change --val-fraction"
        )
    with timer.phase("split"):
        lengths = tok.token_byte_lengths()
        train_bytes = _count_bytes(all_path, dtype, 0, n_train, lengths)
        val_bytes = _split_tail(all_path, tmp / "val.bin", dtype, n_train, lengths)
        os.truncate(all_path, n_train * dtype.itemsize)  # what remains of tokens.bin is exactly the train split
        os.rename(all_path, tmp / "train.bin")
    if train_bytes + val_bytes != corpus["bytes"]:
        log.debug("tokens decode to %d bytes, the corpus has %d", train_bytes + val_bytes, corpus["bytes"])

    return {
        "source": _describe(source),
        "content_sha256": corpus["sha256"],
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "corpus_bytes": corpus["bytes"],
        "val_fraction": val_fraction,
        "documents": corpus["documents"],
        "glob": glob,
        "bpe_train_bytes": min(corpus["bytes"], BPE_TRAIN_SAMPLE_BYTES) if trained_bpe else None,
        "timings_s": timer.wall,
        "cpu_s": timer.cpu,  # CPU seconds over wall seconds: how many cores a phase kept busy
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nanophi_version": nanophi.__version__,
        "format": PREPARE_FORMAT,
    }


def open_prepared(directory: Path) -> PreparedData:
    """A preparation written by `prepare`; UserError if `directory` doesn't hold a complete, readable one."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise UserError(f"{directory} holds no prepared data ({META_FILE} is missing); run nanophi prepare first")
    meta = _read_meta(directory)
    if meta is None:
        raise UserError(f"{directory / META_FILE} is not readable JSON; delete {directory} and prepare again")
    required = ("dtype", "vocab_size", "train_tokens", "val_tokens", "val_bytes")
    missing = [k for k in required if k not in meta]
    if missing:
        raise UserError(f"{directory / META_FILE} is corrupt (no {', '.join(missing)}); delete it and prepare again")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(
                f"{path} is missing or truncated (expected {expected} bytes); delete {directory} and prepare again"
            )
    return PreparedData(directory, meta, load_tokenizer(directory / TOKENIZER_DIR))


# ----------------------------------------------------------------------------------------------------------------
# the passes over the corpus


def _pieces(source: str | None, glob: str) -> Iterator[str]:
    return iter_text_pieces(iter_documents(source, glob=glob))


def _scan_corpus(source: str | None, glob: str) -> dict[str, Any]:
    """First pass: the hash of the exact text `prepare` will tokenize, its size, and its number of documents."""
    h, n_bytes, n_docs = hashlib.sha256(), 0, 0

    def counted(docs: Iterable[Document]) -> Iterator[Document]:
        nonlocal n_docs
        for doc in docs:
            n_docs += not doc.continues
            yield doc

    for piece in iter_text_pieces(counted(iter_documents(source, glob=glob))):
        data = piece.encode("utf-8", "surrogatepass")
        h.update(data)
        n_bytes += len(data)
    return {"sha256": h.hexdigest(), "bytes": n_bytes, "documents": n_docs}


def _cache_key(content_sha: str, kind: str, vocab_size: int, val_fraction: float, tok: Tokenizer | None) -> str:
    tokenizer_files = None
    if tok is not None:
        with tempfile.TemporaryDirectory(prefix="nanophi-tok-") as d:
            tok.save(Path(d))
            files = sorted(p for p in Path(d).rglob("*") if p.is_file())
            tokenizer_files = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    settings = {
        "format": PREPARE_FORMAT,
        "content": content_sha,
        "tokenizer": kind,
        # char and gpt2 vocabularies don't depend on --vocab-size: don't let it split their cache entries
        "vocab_size": vocab_size if kind == "bpe" and tok is None else None,
        "val_fraction": val_fraction,
        "tokenizer_files": tokenizer_files,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _first_bytes(pieces: Iterable[str], limit: int) -> Iterator[str]:
    """The pieces until about `limit` UTF-8 bytes have passed (whole pieces: BPE training wants whole words)."""
    seen = 0
    for piece in pieces:
        yield piece
        seen += len(piece.encode("utf-8", "surrogatepass"))
        if seen >= limit:
            return


def _segments(pieces: Iterable[str], max_chars: int) -> Iterator[str]:
    """Pieces cut to at most `max_chars`, preferably after a newline, so a batch spreads over all cores."""
    for piece in pieces:
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars) + 1 or max_chars
            yield piece[:cut]
            piece = piece[cut:]
        if piece:
            yield piece


def _batches(segments: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for seg in segments:
        batch.append(seg)
        size += len(seg)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_to_file(tok: Tokenizer, pieces: Iterable[str], path: Path, dtype: np.dtype) -> int:
    """Second pass: encode the corpus segment by segment, appending the ids to `path`; returns the token count.

    Tokenizers with a thread-safe `encode_array` (char, bpe, gpt2) encode on a pool of threads while this thread
    reads the next segments and writes finished ones, with a bounded number in flight so memory stays flat.
    Others go through `encode_batch` a batch at a time.
    """
    n = 0
    segments = _segments(pieces, SEGMENT_CHARS)
    encode_array = getattr(tok, "encode_array", None)
    with open(path, "wb") as f:

        def write(ids: np.ndarray) -> None:
            nonlocal n
            np.asarray(ids).astype(dtype, copy=False).tofile(f)
            n += len(ids)

        if encode_array is None:
            for batch in _batches(segments, BATCH_CHARS):
                for ids in tok.encode_batch(batch):
                    write(np.array(ids, dtype=dtype))
            return n
        workers = os.cpu_count() or 1
        in_flight: deque[Future[np.ndarray]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="nanophi-encode") as pool:
            for seg in segments:
                in_flight.append(pool.submit(encode_array, seg))
                if len(in_flight) >= IN_FLIGHT_PER_WORKER * workers:
                    write(in_flight.popleft().result())
            while in_flight:
                write(in_flight.popleft().result())
    return n


def _count_bytes(path: Path, dtype: np.dtype, start: int, stop: int, lengths: np.ndarray) -> int:
    total = 0
    with open(path, "rb") as f:
        for lo in range(start, stop, READ_TOKENS):
            f.seek(lo * dtype.itemsize)
            ids = np.fromfile(f, dtype=dtype, count=min(READ_TOKENS, stop - lo))
            total += int(lengths[ids].sum())
    return total


def _split_tail(src: Path, dst: Path, dtype: np.dtype, start: int, lengths: np.ndarray) -> int:
    """Copy the tokens of `src` from `start` on into `dst`; returns the UTF-8 bytes they decode to."""
    total = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fin.seek(start * dtype.itemsize)
        while True:
            ids = np.fromfile(fin, dtype=dtype, count=READ_TOKENS)
            if ids.size == 0:
                return total
            ids.tofile(fout)
            total += int(lengths[ids].sum())


# ----------------------------------------------------------------------------------------------------------------
# the cache directory


def _read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _install(tmp: Path, out: Path, key: str) -> None:
    """Move the finished `tmp` to `out`, replacing an older preparation there, atomically for readers."""
    try:
        os.rename(tmp, out)  # succeeds when `out` is absent or an empty directory
        return
    except OSError:
        pass
    existing = _read_meta(out)
    if existing is not None and existing.get("sha256") == key:
        return  # another process prepared the same thing first; keep theirs
    if existing is None:
        raise UserError(f"{out} exists and holds something else than prepared data; pass an empty or new --out")
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _describe(source: str | None) -> str:
    if source is None:
        return "pydoc"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--data", default=None, help="pydoc (default), gutenberg:<id>, a text/.jsonl file or a directory")
    add("--glob", default=DEFAULT_GLOB, help="which files of a --data directory to read (default: %(default)s)")
    add("--tokenizer", default="char", choices=["char", "bpe", "gpt2"], help="how to split text into tokens")
    add("--vocab-size", type=int, default=4096, help="vocabulary size of a trained BPE (default: %(default)s)")
    add("--val-fraction", type=float, default=0.1, help="last fraction of the tokens held out for validation")
    add("--out", type=Path, default=None, help="output directory (default: $NANOPHI_CACHE/prepared/<hash>)")


def run(args: argparse.Namespace) -> int:
    data = prepare(
        args.data,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        glob=args.glob,
        out_dir=args.out,
    )
    m = data.meta
    print(
        f"{data.dir}: {m['n_tokens']:,} tokens ({m['train_tokens']:,} train, {m['val_tokens']:,} val), "
        f"vocab {m['vocab_size']:,} ({m['tokenizer']})"
    )
    return 0
