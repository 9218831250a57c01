"""Stage 1: the raw code pool that the filter later picks textbook-quality documents from.

phi-1 filtered The Stack and StackOverflow. Offline, the stand-in is the running interpreter's standard library
with its tests (`sysconfig.get_paths()["stdlib"]`, ~31 MB of .py for CPython 3.11): real, varied, licensed
(PSF-2.0) Python of every quality, from tutorial-clean modules to regression tests. Real corpora work the same way:

    folder of .py files          walked in sorted path order
    JSONL, .jsonl.gz, .jsonl.zst records with `text` or `content` (.zst needs `pip install zstandard`)
    .parquet file or folder      The Stack's columns (content, max_stars_repo_path, max_stars_repo_licenses, ...)
                                 or Stack v2 / python-edu style (text, blob_id, repo_name, path, detected_licenses)
    folder from save_to_disk     a Hugging Face dataset (`datasets.load_from_disk`)
    hf:ORG/NAME[:SPLIT]          streamed from the Hugging Face hub (online only; default split train)

Each record's licence and path (whichever of the known column names it has) go into the pool record's provenance.

A document is a whole file (`split="file"`) or one top-level function or class (`split="function"`, cut with
`ast` line spans, decorators included). Files that are not UTF-8 or do not parse are skipped and counted: both
are noise for a model learning to write Python 3. Order is sorted by path, so the pool is deterministic.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.records import make_record, read_jsonl, stats_path, write_jsonl_atomic, write_stats

log = logging.getLogger(__name__)

SPLITS = ("file", "function")
MIN_CHARS = 64  # shorter than a two-line function: nothing to learn from
MAX_CHARS = 100_000  # generated tables and giant test files; also keeps one document well inside a context
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})  # installed packages are not the stdlib
STDLIB_LICENCE = "PSF-2.0"
# The Stack (v1) names them max_stars_repo_*; Stack v2 / python-edu: path, repo_name, detected_licenses, blob_id
LICENCE_KEYS = ("licence", "license", "licenses", "max_stars_repo_licenses", "detected_licenses", "license_type")
PATH_KEYS = ("path", "max_stars_repo_path", "source")
REPO_KEYS = ("repo_name", "max_stars_repo_name", "repo")
TEXT_KEYS = ("text", "content")
HF_PREFIX = "hf:"
PARQUET_BATCH = 1024  # rows per pyarrow batch: a shard of The Stack is ~1 GB, never read whole


def stdlib_dir() -> Path:
    """The standard library folder of the running interpreter (tests included)."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_py_files(root: Path) -> Iterator[Path]:
    """Every .py file under `root` in sorted path order, skipping installed packages and caches."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def parse_python(text: str) -> ast.Module | None:
    """`ast.parse`, or None when the text is not Python 3 (syntax error, null bytes, too deep)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old files raise SyntaxWarning for invalid escapes; not our business
        try:
            return ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None


def split_top_level(text: str, tree: ast.Module) -> Iterator[tuple[str, str, int, int]]:
    """Yield (name, source, first line, last line) of each top-level function or class, decorators included."""
    lines = text.splitlines(keepends=True)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.end_lineno:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, "".join(lines[start - 1 : node.end_lineno]), start, node.end_lineno


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, list):
            v = v[0] if v else None
        if v:
            return v
    return None


def _missing(package: str, what: str) -> UserError:
    return UserError(f"{what} needs the '{package}' package, which is not installed: pip install {package}")


def _part(items: list[Any], rank: int, world: int, sizes: list[int] | None = None) -> list[Any]:
    """Rank's contiguous share of `items`, cut by `sizes` (bytes) when given so that tasks get similar work;
    read in rank order, the shares are `items` in order."""
    if world == 1:
        return items
    sizes = sizes if sizes is not None else [1] * len(items)
    total, start, out = max(1, sum(sizes)), 0, []
    for item, size in zip(items, sizes, strict=True):
        if start * world // total == rank:  # the share in which this item starts
            out.append(item)
        start += size
    return out


def _iter_parquet(files: list[Path], rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", "a parquet source") from None
    wanted = set(TEXT_KEYS + LICENCE_KEYS + PATH_KEYS + REPO_KEYS + ("blob_id",))
    # a task's unit is a row group (The Stack's shards hold many), so --tasks N splits even one big file
    groups, sizes = [], []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            groups.append((path, g))
            sizes.append(meta.row_group(g).total_byte_size)
    opened: dict[Path, Any] = {}
    for path, g in _part(groups, rank, world, sizes):
        pf = opened.setdefault(path, pq.ParquetFile(path))
        # read only the columns we use: The Stack carries dozens (star counts, dates, ...) per row
        columns = [c for c in pf.schema_arrow.names if c in wanted]
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[g], columns=columns):
            yield from batch.to_pylist()


def _iter_compressed_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    import gzip
    import io
    import json

    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise _missing("zstandard", f"{path} (a .zst file)") from None
        raw: Any = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    else:
        raw = gzip.open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as f:  # closing it closes the decompressor and the file
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}:{lineno}: not valid JSON; the file is corrupt") from None
                yield rec


def _import_datasets(what: str) -> Any:
    # datasets logs at INFO, on import, which of TensorFlow/JAX it found: noise between our lines
    logging.getLogger("datasets").setLevel(max(logging.WARNING, logging.getLogger("datasets").level))
    try:
        import datasets
    except ImportError:
        raise _missing("datasets", what) from None
    return datasets


def _iter_hf(source: str) -> Iterator[dict[str, Any]]:
    datasets = _import_datasets(source)
    name, _, split = source[len(HF_PREFIX):].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as e:  # offline, unknown name, gated: the hub says why in many ways; one line for the user
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{source}: cannot stream it from the Hugging Face hub ({why}); check the name and the "
                        "network, or pass a local copy (parquet files or a save_to_disk folder)") from None
    if first is not None:
        yield first
        yield from it


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file()


def _iter_saved_dataset(root: Path, rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]]:
    datasets = _import_datasets(f"{root} (a dataset saved with save_to_disk)")
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):  # saved with every split: the pool is the training split
        if "train" not in ds:
            raise UserError(f"{root}: a DatasetDict without a 'train' split (has {sorted(ds)}); save one split")
        ds = ds["train"]
    yield from ds.shard(world, rank, contiguous=True) if world > 1 else ds


def _iter_records(source: str, rank: int = 0, world: int = 1) -> Iterator[dict[str, Any]] | None:
    """The rows of a tabular source (JSONL, parquet, saved or hub dataset), or None for a folder of .py files.
    With world > 1, rank's contiguous part of them."""
    path = Path(source)
    streamed = source.startswith(HF_PREFIX) or path.suffix in (".gz", ".zst")
    if streamed and world > 1:  # a stream can only be read from its start
        raise UserError(f"{source}: a stream is read by one task; use --tasks 1, or give parquet/JSONL files")
    if source.startswith(HF_PREFIX):
        return _iter_hf(source)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _iter_saved_dataset(path, rank, world)
        parquet = sorted(path.rglob("*.parquet"))
        return _iter_parquet(parquet, rank, world) if parquet else None
    if not path.is_file():
        raise UserError(f"{source}: no such file or folder; give a folder of .py files, a JSONL or parquet file, "
                        "a save_to_disk folder or hf:ORG/NAME")
    if path.suffix == ".parquet":
        return _iter_parquet([path], rank, world)
    if streamed:
        return _iter_compressed_jsonl(path)
    if world > 1:
        from nanophi.textbook.scale import iter_range

        return iter_range([path], rank, world)
    return read_jsonl(path)


def _provenance(rec: dict[str, Any], licence: str) -> dict[str, Any]:
    prov = {"path": _first(rec, PATH_KEYS), "licence": _first(rec, LICENCE_KEYS) or licence}
    for key, value in (("repo", _first(rec, REPO_KEYS)), ("blob_id", rec.get("blob_id"))):
        if value:
            prov[key] = value
    return prov


def _iter_raw(source: str | None, licence: str, stats: dict[str, Any], rank: int = 0,
              world: int = 1) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (text, provenance) per raw file/record of the source (rank's part of it); count undecodable files
    in `stats`."""
    rows = None if source is None else _iter_records(source, rank, world)
    if rows is None:
        root = stdlib_dir() if source is None else Path(source)
        if source is None:
            licence = STDLIB_LICENCE
        stats["source"] = f"stdlib:{root}" if source is None else str(root)
        files = list(iter_py_files(root))
        for path in _part(files, rank, world, [f.stat().st_size for f in files] if world > 1 else None):
            stats["n_files"] += 1
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                stats["skipped_non_utf8"] += 1
                continue
            except OSError as e:  # unreadable file (permissions, broken link): skip, but say so
                log.warning("skipping %s: %s", path, e)
                stats["skipped_unreadable"] += 1
                continue
            yield text, {"path": path.relative_to(root).as_posix(), "licence": licence}
        return
    stats["source"] = str(source)
    for rec in rows:
        stats["n_files"] += 1
        text = next((rec[k] for k in TEXT_KEYS if isinstance(rec.get(k), str)), None)
        if text is None:
            stats["skipped_no_text"] += 1
            continue
        yield text, _provenance(rec, licence)


def iter_pool(
    source: str | None,
    *,
    split: str = "file",
    min_chars: int = MIN_CHARS,
    max_chars: int = MAX_CHARS,
    licence: str = "unknown",
    stats: dict[str, Any] | None = None,
    rank: int = 0,
    world: int = 1,
) -> Iterator[dict[str, Any]]:
    """Yield pool records from `source` (None: the stdlib), or from rank's part of it when `world` > 1.
    Counters go into `stats` if given."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    st: dict[str, Any] = stats if stats is not None else {}
    for key in ("n_files", "skipped_non_utf8", "skipped_unreadable", "skipped_no_text", "skipped_unparsable",
                "skipped_short", "skipped_long"):
        st.setdefault(key, 0)
    for text, prov in _iter_raw(source, licence, st, rank, world):
        tree = parse_python(text)
        if tree is None:
            st["skipped_unparsable"] += 1
            continue
        if split == "file":
            pieces = [(None, text, 1, text.count("\n") + 1)]
        else:
            pieces = list(split_top_level(text, tree))
        for name, piece, first, last in pieces:
            if len(piece) < min_chars:
                st["skipped_short"] += 1
                continue
            if len(piece) > max_chars:
                st["skipped_long"] += 1
                continue
            p = {"stage": "pool", "source": st.get("source"), **prov, "split": split}
            if name is not None:
                p.update(name=name, lines=[first, last])
            yield make_record(piece, p)


def build_pool(
    source: str | None,
    out: str | os.PathLike,
    *,
    split: str = "file",
    max_docs: int | None = None,
    min_chars: int = MIN_CHARS,
    max_chars: int = MAX_CHARS,
    licence: str = "unknown",
) -> dict[str, Any]:
    """Write the pool to `out` (JSONL) and its stats beside it; returns the stats.

    `source`: None for the interpreter's stdlib, or any source in the module docstring.
    `licence` labels a folder or JSONL source whose records do not name their own (the stdlib is PSF-2.0).
    """
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"stage": "pool", "split": split, "min_chars": min_chars, "max_chars": max_chars}
    chars = 0

    def capped() -> Iterator[dict[str, Any]]:
        nonlocal chars
        for i, rec in enumerate(iter_pool(source, split=split, min_chars=min_chars, max_chars=max_chars,
                                          licence=licence, stats=stats)):
            if max_docs is not None and i >= max_docs:
                stats["stopped_at_max_docs"] = max_docs
                return
            chars += len(rec["text"])
            yield rec

    n = write_jsonl_atomic(out, capped())
    stats.update(n_in=stats["n_files"], n_out=n, chars=chars, seconds=round(time.perf_counter() - t0, 3))
    write_stats(stats_path(out), stats)
    log.info("pool: %d documents (%d chars) from %d files in %.1f s", n, chars, stats["n_files"], stats["seconds"])
    return stats


class PoolSource:
    """Rank's part of a pool for `nanophi.textbook.scale.run_source_stage` (--tasks > 1); picklable."""

    def __init__(self, source: str | None, **options: Any) -> None:
        self.source, self.options = source, options

    def __call__(self, rank: int, world: int, counts: Any) -> Iterator[dict[str, Any]]:
        stats: dict[str, Any] = {}
        yield from iter_pool(self.source, stats=stats, rank=rank, world=world, **self.options)
        counts.update({k: v for k, v in stats.items() if isinstance(v, int)})


def build_pool_sharded(source: str | None, out: str | os.PathLike, *, tasks: int, workers: int,
                       split: str = "file", min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS,
                       licence: str = "unknown", executor: Any = None) -> dict[str, Any]:
    """`build_pool` over datatrove tasks into shards OUT/00000.jsonl...: task r reads the r-th contiguous part
    of the source's files (parquet: row groups; JSONL: line-aligned byte ranges), so the shards read in order
    are the pool of `--tasks 1`."""
    from nanophi.textbook.scale import LOCAL, run_source_stage

    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if source is not None:
        # the source checks (no such path, a stream split into tasks) fail here as one line, not in every task
        _iter_records(source, 0, tasks)
    t0 = time.perf_counter()
    options = {"split": split, "min_chars": min_chars, "max_chars": max_chars, "licence": licence}
    stats = run_source_stage("pool", PoolSource(source, **options), out, tasks=tasks, workers=workers,
                             params={"source": str(source) if source else f"stdlib:{stdlib_dir()}", **options},
                             executor=executor or LOCAL)
    if stats.get("submitted"):
        return stats
    stats["n_in"] = stats.get("n_files", 0)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    write_stats(Path(out) / "stats.json", stats)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=None,
                        help="folder of .py files, JSONL(.gz/.zst) or parquet file/folder with 'text'/'content', a "
                             "save_to_disk folder, or hf:ORG/NAME[:SPLIT] (default: this Python's stdlib)")
    parser.add_argument("--out", required=True, help="output JSONL of pool documents")
    parser.add_argument("--split", choices=SPLITS, default="file",
                        help="one document per file, or per top-level function/class")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--min-chars", type=int, default=MIN_CHARS, help="drop shorter documents")
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS, help="drop longer documents")
    parser.add_argument("--licence", default="unknown", help="licence of a folder/JSONL source without its own")
    from nanophi.textbook.scale import add_scale_arguments

    add_scale_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "tasks", 1) > 1:
        if args.max_docs is not None:
            raise UserError("--max-docs stops one pass at a count; run it with --tasks 1")
        from nanophi.textbook.scale import executor_from_args, submitted_message

        stats = build_pool_sharded(args.source, args.out, tasks=args.tasks, workers=args.workers, split=args.split,
                                   min_chars=args.min_chars, max_chars=args.max_chars, licence=args.licence,
                                   executor=executor_from_args(args))
        if (line := submitted_message(stats, args.out)) is not None:
            print(line)
            return 0
        print(f"pool: {stats['n_out']} documents from {stats['n_files']} files -> {args.out}/ ({args.tasks} "
              f"shards, {stats['seconds']} s)")
        return 0
    stats = build_pool(args.source, args.out, split=args.split, max_docs=args.max_docs,
                       min_chars=args.min_chars, max_chars=args.max_chars, licence=args.licence)
    print(f"pool: {stats['n_out']} documents from {stats['n_files']} files -> {args.out} "
          f"(non-UTF-8 {stats['skipped_non_utf8']}, unparsable {stats['skipped_unparsable']}, "
          f"{stats['seconds']} s)")
    return 0
