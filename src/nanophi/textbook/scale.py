"""The record-mapping stages past one process: datatrove pipelines over shards (`--tasks N --workers W`).

    reader (ShardReader) -> the stage's per-record function (RecordMap) -> ShardWriter -> OUT/00000.jsonl ...

The input (one JSONL or a folder of shards) is cut into `tasks` contiguous byte ranges aligned to line starts,
so shard r holds input lines in order and OUT/00000.jsonl, OUT/00001.jsonl, ... read in order are the input's
order: the same records, in the same order, as `--tasks 1`. Each task writes its shard to a temporary file and
renames it when done; datatrove marks the task complete only after that (OUT/.datatrove/completions/). A run
killed with -9 therefore leaves whole shards or none, and a rerun redoes only the unmarked tasks: no record is
lost or written twice. Per-shard counts go to OUT/.datatrove/counts/ and are summed into OUT/stats.json.

`textbook pool` reads a source rather than records: `run_source_stage` runs SourceReader (the stage's function of
(rank, world) -> rank's contiguous part of the source, in order) -> ShardWriter, with the same shards and resume.

datatrove is imported only here and only when a stage runs with --tasks > 1 (`pip install 'nanophi[data]'`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from nanophi.errors import UserError
from nanophi.textbook.records import read_jsonl, shard_files, write_jsonl_atomic, write_stats

DATA_EXTRA = "pip install 'nanophi[data]'"
WORKDIR = ".datatrove"

# (record) -> (record to keep or None, removal record or None); built once per task by a picklable factory
Mapper = Callable[[dict[str, Any]], tuple[dict[str, Any] | None, dict[str, Any] | None]]


def require_datatrove() -> None:
    # loguru (datatrove's logger) prints every local variable of a failing task by default: record texts and
    # all; a plain traceback says where, and the one-line error after it says what
    os.environ.setdefault("LOGURU_DIAGNOSE", "NO")
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise UserError(f"--tasks > 1 runs the stage on datatrove, which is not installed: {DATA_EXTRA}") from None


def byte_range(sizes: list[int], rank: int, world: int) -> tuple[int, int]:
    """Rank's share [start, end) of the concatenated inputs, before alignment to line starts."""
    total = sum(sizes)
    return rank * total // world, (rank + 1) * total // world


def _align(files: list[Path], sizes: list[int], pos: int) -> int:
    """The first line start at or after global byte `pos` (file starts are line starts)."""
    base = 0
    for path, size in zip(files, sizes, strict=True):
        if pos < base + size:
            local = pos - base
            if local == 0:
                return pos
            with open(path, "rb") as f:
                f.seek(local - 1)
                if f.read(1) == b"\n":
                    return pos
                f.readline()
                return base + min(f.tell(), size)
        base += size
    return base


def iter_range(files: list[Path], rank: int, world: int) -> Iterator[dict[str, Any]]:
    """The records whose lines start in rank's aligned byte range."""
    sizes = [p.stat().st_size for p in files]
    lo, hi = (_align(files, sizes, x) for x in byte_range(sizes, rank, world))
    base = 0
    for path, size in zip(files, sizes, strict=True):
        start, end = max(lo, base) - base, min(hi, base + size) - base
        if start < end:
            with open(path, "rb") as f:
                f.seek(start)
                while f.tell() < end:
                    at = f.tell()
                    line = f.readline()
                    if line.strip():
                        yield _parse(line, path, at)
        base += size


# (rank, world, counts) -> the records of rank's part of a source (`textbook pool`); counts filled as it goes
Source = Callable[[int, int, Counter], Iterator[dict[str, Any]]]


def _parse(line: bytes, path: Path, at: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        rec = None
    if not isinstance(rec, dict):
        raise UserError(f"{path}: the line at byte {at} is not a JSON record; the file is corrupt, regenerate it")
    return rec


def _steps() -> tuple[type, type, type, type]:
    """The three pipeline steps; defined on first use so that importing this module needs no datatrove."""
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep

    class ShardReader(PipelineStep):
        type, name = "nanophi", "shard reader"

        def __init__(self, files: list[str]) -> None:
            super().__init__()
            self.files = files

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            for rec in iter_range([Path(f) for f in self.files], rank, world_size):
                self.stat_update("read")
                yield Document(text=rec.get("text") or "", id=rec.get("id") or "", metadata={"record": rec})

    class RecordMap(PipelineStep):
        type, name = "nanophi", "record map"

        def __init__(self, make_mapper: Callable[[], Mapper], out: str) -> None:
            super().__init__()
            self.make_mapper, self.out = make_mapper, out

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            fn = self.make_mapper()
            removed: list[dict[str, Any]] = []
            counts = Counter()
            for doc in data:
                counts["n_in"] += 1
                kept, gone = fn(doc.metadata["record"])
                if gone is not None:
                    removed.append(gone)
                if kept is not None:
                    counts["n_out"] += 1
                    doc.metadata["record"] = kept
                    yield doc
            out = Path(self.out)
            write_jsonl_atomic(out / "removed" / f"{rank:05d}.jsonl", removed)
            write_stats(out / WORKDIR / "counts" / f"{rank:05d}.json", dict(counts))

    class SourceReader(PipelineStep):
        type, name = "nanophi", "source reader"

        def __init__(self, source: Source, out: str) -> None:
            super().__init__()
            self.source, self.out = source, out

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            counts: Counter = Counter()
            for rec in self.source(rank, world_size, counts):
                counts["n_out"] += 1
                yield Document(text=rec["text"], id=rec["id"], metadata={"record": rec})
            write_stats(Path(self.out) / WORKDIR / "counts" / f"{rank:05d}.json", dict(counts))

    class ShardWriter(PipelineStep):
        type, name = "nanophi", "shard writer"

        def __init__(self, out: str) -> None:
            super().__init__()
            self.out = out

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            # atomic: the shard appears whole when the task has read everything, before its completion marker
            write_jsonl_atomic(Path(self.out) / f"{rank:05d}.jsonl", (d.metadata["record"] for d in data))
            return iter(())

    return ShardReader, RecordMap, SourceReader, ShardWriter


def _check(tasks: int, workers: int, out: Path) -> None:
    require_datatrove()
    if tasks < 1 or workers < 1:
        raise UserError(f"--tasks and --workers must be at least 1, got {tasks} and {workers}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, but --tasks {tasks} writes a folder of shards there; give a folder")


def _execute(out: Path, pipeline: list[Any], *, tasks: int, workers: int, params: dict[str, Any]) -> Counter:
    """Run `pipeline` as `tasks` datatrove tasks into OUT (reusing finished shards of the same `params`); returns
    the per-shard counts summed."""
    from datatrove.executor import LocalPipelineExecutor

    work = out / WORKDIR
    prior = work / "params.json"
    if prior.exists() and json.loads(prior.read_text()) != params:  # other settings: nothing here is reusable
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    write_stats(prior, params)
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(work),
                          start_method="fork").run()
    total: Counter = Counter()
    for path in sorted((work / "counts").glob("*.json")):
        total.update(json.loads(path.read_text()))
    return total


def run_map_stage(stage: str, in_path: str | os.PathLike, out: str | os.PathLike, make_mapper: Callable[[], Mapper],
                  *, tasks: int, workers: int, params: dict[str, Any]) -> dict[str, Any]:
    """Run `make_mapper()`'s function over every record of `in_path` in `tasks` datatrove tasks, `workers` at
    once, into shards OUT/00000.jsonl...; returns (and writes to OUT/stats.json) the counts summed over shards."""
    out = Path(out)
    _check(tasks, workers, out)
    files = shard_files(in_path)
    params = {**params, "stage": stage, "tasks": tasks, "input": [str(f) for f in files]}
    ShardReader, RecordMap, _, ShardWriter = _steps()
    pipeline = [ShardReader([str(f) for f in files]), RecordMap(make_mapper, str(out)), ShardWriter(str(out))]
    total = _execute(out, pipeline, tasks=tasks, workers=workers, params=params)
    stats = {**params, "input": str(in_path), "workers": workers,
             "n_in": total["n_in"], "n_out": total["n_out"]}
    write_stats(out / "stats.json", stats)
    return stats


def run_source_stage(stage: str, source: Source, out: str | os.PathLike, *, tasks: int, workers: int,
                     params: dict[str, Any]) -> dict[str, Any]:
    """Write the records of `source` (split by rank, in order) as shards OUT/00000.jsonl... in `tasks` datatrove
    tasks; every count the source keeps is summed over shards into OUT/stats.json."""
    out = Path(out)
    _check(tasks, workers, out)
    params = {**params, "stage": stage, "tasks": tasks}
    _, _, SourceReader, ShardWriter = _steps()
    total = _execute(out, [SourceReader(source, str(out)), ShardWriter(str(out))], tasks=tasks, workers=workers,
                     params=params)
    stats = {**params, "workers": workers, **dict(sorted(total.items()))}
    write_stats(out / "stats.json", stats)
    return stats


def read_removed(out: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The removal records of a sharded stage, in shard order."""
    for path in sorted((Path(out) / "removed").glob("*.jsonl")):
        yield from read_jsonl(path)
