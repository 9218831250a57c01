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

Where the tasks run is `ExecutorOptions` (`--executor local|slurm|ray`): datatrove's LocalPipelineExecutor
(processes on this machine), SlurmPipelineExecutor (an sbatch job array; the command returns once submitted and a
rerun after the jobs end collects stats.json) or RayPipelineExecutor (a Ray cluster). A stage of several
pipelines (dedup: signatures -> buckets -> clusters -> filter) chains them with datatrove's `depends`.

datatrove is imported only here and only when a stage runs with --tasks > 1 (`pip install 'nanophi[data]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
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


def pipeline_steps() -> tuple[type, type, type, type]:
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
            # a factory with `batch = n` maps lists of n records (a classifier scores a batch at once)
            batch = getattr(self.make_mapper, "batch", None)
            removed: list[dict[str, Any]] = []
            counts = Counter()
            docs = iter(data)
            while chunk := list(itertools.islice(docs, batch or 1)):
                counts["n_in"] += len(chunk)
                results = fn([d.metadata["record"] for d in chunk]) if batch else [fn(chunk[0].metadata["record"])]
                for doc, (kept, gone) in zip(chunk, results, strict=True):
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


EXECUTORS = ("local", "slurm", "ray")


def _seconds(hms: str) -> int:
    """'HH:MM:SS' (or 'MM:SS', 'SS') -> seconds."""
    parts = hms.split(":")
    if not 1 <= len(parts) <= 3 or not all(x.isdigit() for x in parts):
        raise UserError(f"--time must be HH:MM:SS, got {hms!r}")
    return sum(int(x) * 60**i for i, x in enumerate(reversed(parts)))


@dataclass(frozen=True)
class ExecutorOptions:
    """Where a stage's datatrove tasks run (`--executor`); the other fields matter on Slurm and Ray only."""

    kind: str = "local"
    """local: processes on this machine; slurm: an sbatch job array; ray: tasks on a Ray cluster."""
    partition: str | None = None
    """slurm: the partition to submit to (required there)."""
    time: str = "04:00:00"
    """slurm/ray: wall-clock limit of one task, HH:MM:SS."""
    cpus_per_task: int = 1
    """slurm/ray: cores each task gets."""
    mem_per_cpu_gb: float = 2.0
    """slurm/ray: memory per core."""
    env_command: str | None = None
    """slurm: the shell line that sets up Python on a node (default: activate this interpreter's venv)."""

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.kind!r}")
        if self.kind == "slurm" and not self.partition:
            raise UserError("--executor slurm needs --partition NAME (sinfo lists them)")
        if self.cpus_per_task < 1 or not self.mem_per_cpu_gb > 0:
            raise UserError(f"--cpus-per-task and --mem-per-cpu-gb must be positive, got {self.cpus_per_task} "
                            f"and {self.mem_per_cpu_gb}")
        _seconds(self.time)

    def check_available(self) -> None:
        """Refuse in one line an executor this machine cannot drive: no `sbatch` on PATH, or ray not installed
        (before a stage spends time on anything)."""
        if self.kind == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--executor slurm submits with sbatch, which is not on PATH: run on a Slurm login node")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray needs ray, which is not installed: pip install 'ray[default]'")


LOCAL = ExecutorOptions()


def make_executor(opts: ExecutorOptions, pipeline: list[Any], *, tasks: int, workers: int, logging_dir: str,
                  depends: Any = None, job_name: str = "nanophi") -> Any:
    """The datatrove executor of `opts.kind` for `pipeline` (not run). Refuses in one line an executor this
    machine cannot drive: no `sbatch` on PATH, or ray not installed."""
    opts.check_available()
    if opts.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: the stage's functions (closures, sklearn models) reach the workers without pickling
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=logging_dir,
                                     depends=depends, start_method="fork")
    if opts.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        env = opts.env_command or (f"source {sys.prefix}/bin/activate" if sys.prefix != sys.base_prefix else None)
        return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, time=opts.time,
                                     partition=opts.partition, cpus_per_task=opts.cpus_per_task,
                                     mem_per_cpu_gb=opts.mem_per_cpu_gb, job_name=job_name,
                                     logging_dir=logging_dir, depends=depends, env_command=env)
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends,
                               cpus_per_task=opts.cpus_per_task, mem_per_cpu_gb=opts.mem_per_cpu_gb,
                               time=_seconds(opts.time))


def add_scale_arguments(parser: argparse.ArgumentParser, *, workers_help: str | None = None) -> None:
    """--tasks, --workers and the executor's options, the same in every stage that runs on datatrove."""
    parser.add_argument("--tasks", type=int, default=1,
                        help="> 1: run as datatrove tasks into a folder of shards --out/00000.jsonl... (needs "
                             "nanophi[data])")
    parser.add_argument("--workers", type=int, default=1,
                        help=workers_help or "with --tasks: tasks run at once (processes, or Slurm array tasks)")
    add_executor_arguments(parser)


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="with --tasks: where tasks run (local processes, a Slurm job array, a Ray cluster)")
    parser.add_argument("--partition", default=None, help="--executor slurm: the partition")
    parser.add_argument("--time", default=ExecutorOptions.time, help="slurm/ray: time limit per task, HH:MM:SS")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="slurm/ray: cores per task")
    parser.add_argument("--mem-per-cpu-gb", type=float, default=2.0, help="slurm/ray: memory per core (GB)")
    parser.add_argument("--env-command", default=None,
                        help="slurm: shell line that sets up Python on a node (default: activate this venv)")


def executor_from_args(args: argparse.Namespace) -> ExecutorOptions:
    return ExecutorOptions(kind=getattr(args, "executor", "local"), partition=getattr(args, "partition", None),
                           time=getattr(args, "time", ExecutorOptions.time),
                           cpus_per_task=getattr(args, "cpus_per_task", 1),
                           mem_per_cpu_gb=getattr(args, "mem_per_cpu_gb", 2.0),
                           env_command=getattr(args, "env_command", None))


def submitted_message(stats: dict[str, Any], out: str | os.PathLike) -> str | None:
    """The line a CLI prints instead of counts when the tasks were submitted, not run (Slurm)."""
    if not stats.get("submitted"):
        return None
    return (f"{stats['stage']}: submitted to {stats['executor']} (logs in {Path(out) / WORKDIR}); rerun this "
            "command when the jobs finish: finished tasks are skipped and OUT/stats.json is written")


def check_stage(tasks: int, workers: int, out: Path) -> None:
    require_datatrove()
    if tasks < 1 or workers < 1:
        raise UserError(f"--tasks and --workers must be at least 1, got {tasks} and {workers}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, but --tasks {tasks} writes a folder of shards there; give a folder")


def prepare_workdir(out: Path, params: dict[str, Any]) -> Path:
    """OUT/.datatrove, emptied first when it holds a run with other `params` (nothing there is reusable)."""
    work = out / WORKDIR
    prior = work / "params.json"
    if prior.exists() and json.loads(prior.read_text()) != params:
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    write_stats(prior, params)
    # shards a killed run was writing (write_jsonl_atomic's temporaries); their tasks are not marked done
    for tmp in [*out.glob(".*.tmp"), *out.glob("removed/.*.tmp")]:
        tmp.unlink(missing_ok=True)
    return work


def run_chain(stages: list[tuple[str, list[Any], int, str]], *, workers: int, executor: ExecutorOptions) -> bool:
    """Run pipelines one after another, each (name, pipeline, tasks, logging_dir) depending on the one before;
    True when every task of the last is complete (always, unless the executor only submitted them)."""
    last = None
    for name, pipeline, tasks, logging_dir in stages:
        last = make_executor(executor, pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                             depends=last, job_name=f"nanophi-{name}")
    last.run()  # runs (or submits) its dependencies first
    return all(last.is_rank_completed(r) for r in range(last.world_size))


def sum_counts(folder: Path) -> Counter:
    total: Counter = Counter()
    for path in sorted(folder.glob("*.json")):
        total.update(json.loads(path.read_text()))
    return total


def _execute(out: Path, pipeline: list[Any], *, tasks: int, workers: int, params: dict[str, Any],
             executor: ExecutorOptions) -> Counter | None:
    """Run `pipeline` as `tasks` datatrove tasks into OUT (reusing finished shards of the same `params`); returns
    the per-shard counts summed, or None when the tasks were submitted and have not all finished."""
    work = prepare_workdir(out, params)
    if not run_chain([("stage", pipeline, tasks, str(work))], workers=workers, executor=executor):
        return None
    return sum_counts(work / "counts")


def submitted_stats(params: dict[str, Any], executor: ExecutorOptions) -> dict[str, Any]:
    return {**params, "submitted": True, "executor": executor.kind, "n_in": None, "n_out": None}


def run_map_stage(stage: str, in_path: str | os.PathLike, out: str | os.PathLike, make_mapper: Callable[[], Mapper],
                  *, tasks: int, workers: int, params: dict[str, Any], executor: ExecutorOptions = LOCAL
                  ) -> dict[str, Any]:
    """Run `make_mapper()`'s function over every record of `in_path` in `tasks` datatrove tasks, `workers` at
    once, into shards OUT/00000.jsonl...; returns (and writes to OUT/stats.json) the counts summed over shards
    (or, when `executor` only submitted the tasks, `submitted: True`)."""
    out = Path(out)
    check_stage(tasks, workers, out)
    files = shard_files(in_path)
    params = {**params, "stage": stage, "tasks": tasks, "input": [str(f) for f in files]}
    ShardReader, RecordMap, _, ShardWriter = pipeline_steps()
    pipeline = [ShardReader([str(f) for f in files]), RecordMap(make_mapper, str(out)), ShardWriter(str(out))]
    total = _execute(out, pipeline, tasks=tasks, workers=workers, params=params, executor=executor)
    if total is None:
        return submitted_stats(params, executor)
    stats = {**params, "input": str(in_path), "workers": workers,
             "n_in": total["n_in"], "n_out": total["n_out"]}
    write_stats(out / "stats.json", stats)
    return stats


def run_source_stage(stage: str, source: Source, out: str | os.PathLike, *, tasks: int, workers: int,
                     params: dict[str, Any], executor: ExecutorOptions = LOCAL) -> dict[str, Any]:
    """Write the records of `source` (split by rank, in order) as shards OUT/00000.jsonl... in `tasks` datatrove
    tasks; every count the source keeps is summed over shards into OUT/stats.json."""
    out = Path(out)
    check_stage(tasks, workers, out)
    params = {**params, "stage": stage, "tasks": tasks}
    _, _, SourceReader, ShardWriter = pipeline_steps()
    total = _execute(out, [SourceReader(source, str(out)), ShardWriter(str(out))], tasks=tasks, workers=workers,
                     params=params, executor=executor)
    if total is None:
        return submitted_stats(params, executor)
    stats = {**params, "workers": workers, **dict(sorted(total.items()))}
    write_stats(out / "stats.json", stats)
    return stats


def read_removed(out: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The removal records of a sharded stage, in shard order."""
    for path in sorted((Path(out) / "removed").glob("*.jsonl")):
        yield from read_jsonl(path)
