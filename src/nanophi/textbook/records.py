"""Record I/O shared by every pipeline stage.

A record is a JSON object on one line with at least:
    id          stable hash of the content (`record_id(text)`), so reruns and resumes agree on identity
    text        the document
    provenance  where it came from: stage, source, licence, seed, template_version, teacher, ...

Two ways to write: `write_jsonl_atomic` for a stage that recomputes its whole output (a rerun replaces the
file in one rename, so a reader never sees half of it), and `append_jsonl` for stages that pay per record
(LLM calls): flushed and fsynced per batch, so a killed run loses at most the batch in flight and the next
run resumes. A run killed mid-write can leave a partial last line; `read_jsonl` skips it and `append_jsonl`
cuts it off before appending.

Each stage's numbers go to a sidecar beside its output: `OUT.jsonl` -> `OUT.stats.json` (`stats_path`), and
removals to `OUT.removed.jsonl` (`sidecar_path`), so several stages can share one folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from nanophi.errors import UserError

log = logging.getLogger(__name__)

ID_HEX_CHARS = 16  # 64 bits of sha256: collisions are negligible below billions of records


def record_id(text: str) -> str:
    """Stable id of a document: a prefix of the sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def make_record(text: str, provenance: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A record with the content-hash id; extra fields go after `provenance`."""
    return {"id": record_id(text), "text": text, "provenance": provenance, **fields}


def sidecar_path(out: str | os.PathLike, kind: str, suffix: str = ".jsonl") -> Path:
    """`dir/name.jsonl`, "removed" -> `dir/name.removed.jsonl`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{kind}{suffix}")


def stats_path(out: str | os.PathLike) -> Path:
    """Where a stage writing `out` keeps its stats: `dir/name.stats.json`."""
    return sidecar_path(out, "stats", ".json")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path or run the stage that writes it first")


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSONL file, skipping blank lines and a partial final line from a killed run.

    A malformed line anywhere else means the file is corrupt and raises `UserError`.
    """
    path = Path(path)
    _require_file(path)
    with open(path, "rb") as f:
        pending: bytes | None = None  # hold one line back so we know which line is the last
        lineno = 0
        for raw in f:
            if pending is not None:
                yield _parse_line(pending, path, lineno, last=False)
            lineno += 1
            pending = raw if raw.strip() else None
        if pending is not None:
            rec = _parse_line(pending, path, lineno, last=True)
            if rec is not None:
                yield rec


SHARD_GLOB = "[0-9][0-9][0-9][0-9][0-9].jsonl"  # OUT/00000.jsonl ...: the shards a `--tasks N` stage writes


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The JSONL files a path stands for: itself, or a folder's shards in order (see `nanophi.textbook.scale`)."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob(SHARD_GLOB))
        if not shards:
            raise UserError(f"{path}: a folder without shards (00000.jsonl, ...); run the stage that writes it first")
        return shards
    _require_file(path)
    return [path]


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of one JSONL file or, in order, of every shard in a folder written with `--tasks N`."""
    for shard in shard_files(path):
        yield from read_jsonl(shard)


def _parse_line(raw: bytes, path: Path, lineno: int, *, last: bool) -> Any:
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            raise ValueError("a record must be a JSON object")
        return rec
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if last and not raw.endswith(b"\n"):
            log.warning("%s: skipping a partial last line (%d bytes) left by an interrupted run", path, len(raw))
            return None
        raise UserError(f"{path}:{lineno}: not valid JSON; the file is corrupt, regenerate it") from None


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _cut_partial_tail(path: Path) -> None:
    """Drop bytes after the last newline (a line a killed run did not finish), so appends start clean."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline; files are appended line by line so this is short.
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        log.warning("%s: cutting a partial last line (%d bytes) before appending", path, size - keep)
        f.truncate(keep)


def _write_durably(f: IO[str], records: Iterable[dict[str, Any]]) -> int:
    """One JSON line per record, then flush and fsync; returns how many were written."""
    n = 0
    for rec in records:
        f.write(_dumps(rec) + "\n")
        n += 1
    f.flush()
    os.fsync(f.fileno())
    return n


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Append records as one batch, then flush and fsync; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _cut_partial_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        return _write_durably(f, records)


def _tmp_path(path: Path) -> Path:
    # Beside the target so os.replace stays on one filesystem; pid-unique so two runs cannot share it.
    # (Not mkstemp: its 0600 mode would survive the rename and make outputs private to one user.)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write all records to a temporary file beside `path`, then rename it over `path`; returns the count.

    `records` may be a generator: it is streamed, never held in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            n = _write_durably(f, records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_stats(path: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Write a stage's stats as pretty JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read a stats.json written by `write_stats`."""
    path = Path(path)
    _require_file(path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)
