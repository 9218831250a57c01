"""`textbook dedup --tasks N`: the dedup of `nanophi.textbook.dedup` on datatrove's MinHash pipeline.

    signatures (N tasks)   per document: the MinHash of --tasks 1 (same shingles, permutations, seed) cut into
                           the bands of the LSH --tasks 1 builds, plus one more "band": the exact key
                           -> datatrove's bucket files, sorted, on disk; the whole signature beside them
    buckets (B+1 tasks)    datatrove's MinhashDedupBuckets: one task per band merges the sorted files and
                           writes the runs of documents that share the band (candidates; the last: exact copies)
    clusters (1 task)      `FirstOccurrence` below: walks the candidates in input order and removes a document
                           whose kept candidate has estimated Jaccard >= threshold (or whose text it repeats)
    filter (N tasks)       datatrove's MinhashDedupFilter drops the removed documents from each shard

Nothing holds every signature in memory: the signatures and candidate runs are files, and the cluster step keeps
only the documents that share a band with another. datatrove's own MinhashDedupCluster merges candidates
transitively and keeps the largest cluster's root, unverified; the cluster step here replaces it so that the kept
ids are those of --tasks 1 (which keeps the first occurrence and checks each candidate's estimated Jaccard),
and every removal names the id it duplicates, as there.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nanophi.textbook.records import shard_files, write_jsonl_atomic, write_stats
from nanophi.textbook.scale import (LOCAL, ExecutorOptions, check_stage, pipeline_steps, prepare_workdir, run_chain,
                                    submitted_stats, sum_counts)
from nanophi.textbook.shingling import LSH_SLACK, WORD, exact_key, shingles

Node = tuple[int, int]  # (task rank, document index in its shard): input order


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of the MinHashLSH that --tasks 1 builds for `threshold`."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(max(0.05, threshold - LSH_SLACK), num_perm, 0.5, 0.5)


def _minhash_config(ngram: int, bands: int, rows: int, seed: int) -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    # 32-bit values: datasketch's default scheme; the extra bucket holds the exact key
    return MinhashConfig(n_grams=ngram, num_buckets=bands + 1, hashes_per_bucket=rows, seed=seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


def _classes() -> tuple[type, type]:
    """The signature and cluster steps; defined on first use so that importing this module needs no datatrove."""
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CodeWords(WordTokenizer):
        """The word tokens of --tasks 1 (datatrove's default English tokenizer needs spaCy)."""

        def word_tokenize(self, text: str) -> list[str]:
            return WORD.findall(text.lower())

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    class Signature(MinhashDedupSignature):
        """datatrove's signature step with the sketch of --tasks 1: datasketch's MinHash over `dedup.shingles`."""

        name = "nanophi minhash signatures"

        def __init__(self, folder: str, config: Any, num_perm: int, bands: int) -> None:
            super().__init__(os.path.join(folder, "sigs"), config, language=CodeWords())
            self.folder, self.num_perm, self.bands = folder, num_perm, bands

        def get_shingles(self, text: str) -> np.ndarray:
            # datatrove hands these to get_signature; the text itself, shingled there as --tasks 1 does
            return np.array([text], dtype=object)

        def get_signature(self, text: np.ndarray) -> list[list[int]]:
            mh = self._template.copy()
            mh.update_batch(list(shingles(text[0], self.config.n_grams)))
            sig = mh.hashvalues.astype(np.uint32)
            self._full.write(sig.tobytes())
            rows = self.config.hashes_per_bucket
            bands = [sig[i * rows : (i + 1) * rows].tolist() for i in range(self.bands)]
            key = bytes.fromhex(exact_key(text[0]))  # 32 bytes; `rows` x 4 of them make the exact "band"
            return [*bands, list(struct.unpack(f"<{rows}I", (key * (1 + 4 * rows // len(key)))[: 4 * rows]))]

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Any:
            from datasketch import MinHash

            self._template = MinHash(num_perm=self.num_perm, seed=self.config.seed)
            folder = Path(self.folder)
            (folder / "full").mkdir(parents=True, exist_ok=True)
            ids: list[str] = []

            def tap(docs: Any) -> Iterator[Any]:
                for doc in docs:
                    ids.append(doc.id)
                    yield doc

            with open(folder / "full" / f"{rank:05d}.u32", "wb") as self._full:
                super().run(tap(data), rank, world_size)
            write_jsonl_atomic(folder / "ids" / f"{rank:05d}.jsonl", ({"id": i} for i in ids))
            write_stats(folder / "counts" / f"{rank:05d}.json", {"n_in": len(ids)})

    class FirstOccurrence(PipelineStep):
        """Replaces MinhashDedupCluster: --tasks 1's decisions, from the candidate runs, in input order."""

        type, name = "nanophi", "first occurrence"

        def __init__(self, folder: str, out: str, *, tasks: int, bands: int, num_perm: int, threshold: float
                     ) -> None:
            super().__init__()
            self.folder, self.out, self.tasks = folder, out, tasks
            self.bands, self.num_perm, self.threshold = bands, num_perm, threshold

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Any:
            folder = Path(self.folder)
            runs: list[list[Node]] = []  # documents sharing one band value (or, last bucket, one exact key)
            near_of: dict[Node, list[int]] = {}
            exact_runs: list[list[Node]] = []
            for path in sorted((folder / "dups").glob("*.dups")):
                exact = int(path.name.split("_")[0]) == self.bands
                for run_ in _runs(path):
                    if exact:
                        exact_runs.append(run_)
                    else:
                        for node in run_:
                            near_of.setdefault(node, []).append(len(runs))
                        runs.append(run_)
            sigs = [np.memmap(p, dtype=np.uint32, mode="r").reshape(-1, self.num_perm) if p.stat().st_size else
                    np.zeros((0, self.num_perm), np.uint32)
                    for p in (folder / "full" / f"{r:05d}.u32" for r in range(self.tasks))]
            sig = lambda n: sigs[n[0]][n[1]]  # noqa: E731
            copy_of: dict[Node, Node] = {}
            for run_ in exact_runs:  # a 32-bit x rows key collision must also agree on all num_perm hashes
                for i, node in enumerate(run_[1:], 1):
                    first = next((m for m in run_[:i] if np.array_equal(sig(m), sig(node))), None)
                    if first is not None:
                        copy_of[node] = first
            removed: dict[Node, tuple[str, Node, float]] = {}
            for node in sorted(set(copy_of) | set(near_of)):  # input order, as --tasks 1 streams
                if node in copy_of:
                    removed[node] = ("exact", copy_of[node], 1.0)
                    continue
                # candidates: earlier documents sharing a band, still kept (what --tasks 1's LSH holds)
                cands = sorted({m for g in near_of.get(node, ()) for m in runs[g] if m < node and m not in removed})
                if not cands:
                    continue
                agree = (np.stack([sig(m) for m in cands]) == sig(node)).sum(axis=1)
                best = int(np.argmax(agree))  # ties: the earliest
                j = float(agree[best]) / self.num_perm
                if j >= self.threshold:
                    removed[node] = ("near", cands[best], round(j, 4))
            self._write(removed)

        def _write(self, removed: dict[Node, tuple[str, Node, float]]) -> None:
            folder, out = Path(self.folder), Path(self.out)
            wanted = {n for n in removed} | {dup for _, dup, _ in removed.values()}
            names: dict[Node, str] = {}
            for r in range(self.tasks):
                need = {i for rr, i in wanted if rr == r}
                if need:
                    with open(folder / "ids" / f"{r:05d}.jsonl", "rb") as f:
                        for i, line in enumerate(f):
                            if i in need:
                                names[(r, i)] = json.loads(line)["id"]
            (folder / "remove").mkdir(parents=True, exist_ok=True)
            counts = {"exact": 0, "near": 0}
            for r in range(self.tasks):
                mine = sorted(n for n in removed if n[0] == r)
                with open(folder / "remove" / f"{r:06d}.remove", "wb") as f:  # MinhashDedupFilter's format
                    f.write(b"".join(struct.pack("<I", i) for _, i in mine))
                rows = []
                for n in mine:
                    reason, dup, j = removed[n]
                    counts[reason] += 1
                    rows.append({"id": names[n], "reason": reason, "duplicate_of": names[dup], "jaccard": j})
                write_jsonl_atomic(out / "removed" / f"{r:05d}.jsonl", rows)
            write_stats(folder / "removed.json", counts)

    return Signature, FirstOccurrence


def _runs(path: Path) -> Iterator[list[Node]]:
    """The runs of one .dups file: MinhashDedupBuckets writes (prev, next) for consecutive documents with the same
    band value, and a document has one value per band, so pairs chain exactly within a run."""
    data = np.fromfile(path, dtype="<u4").reshape(-1, 4)
    cur: list[Node] = []
    for f1, d1, f2, d2 in data.tolist():
        a, b = (f1, d1), (f2, d2)
        if cur and cur[-1] == a:
            cur.append(b)
        else:
            if cur:
                yield cur
            cur = [a, b]
    if cur:
        yield cur


def dedup_sharded(in_path: str | os.PathLike, out: str | os.PathLike, *, tasks: int, workers: int,
                  threshold: float = 0.7, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                  executor: ExecutorOptions = LOCAL) -> dict[str, Any]:
    """`dedup` as datatrove tasks: shards OUT/00000.jsonl... with the records --tasks 1 keeps, removals (with the
    id each duplicates) in OUT/removed/, counts in OUT/stats.json."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

    from nanophi.errors import UserError

    if not 0.0 < threshold <= 1.0:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    out = Path(out)
    check_stage(tasks, workers, out)
    files = [str(f) for f in shard_files(in_path)]
    bands, rows = lsh_bands(threshold, num_perm)
    params = {"stage": "dedup", "tasks": tasks, "input": files, "threshold": threshold, "num_perm": num_perm,
              "ngram": ngram, "seed": seed, "bands": bands, "rows": rows}
    work = prepare_workdir(out, params)
    folder = str(work / "dedup")
    config = _minhash_config(ngram, bands, rows, seed)
    Signature, FirstOccurrence = _classes()
    ShardReader, _, _, ShardWriter = pipeline_steps()
    logs = lambda name: str(work / "logs" / name)  # noqa: E731
    chain = [
        ("signatures", [ShardReader(files), Signature(folder, config, num_perm, bands)], tasks, logs("signatures")),
        ("buckets", [MinhashDedupBuckets(os.path.join(folder, "sigs"), os.path.join(folder, "dups"), config=config)],
         bands + 1, logs("buckets")),
        ("clusters", [FirstOccurrence(folder, str(out), tasks=tasks, bands=bands, num_perm=num_perm,
                                      threshold=threshold)], 1, logs("clusters")),
        ("filter", [ShardReader(files), MinhashDedupFilter(os.path.join(folder, "remove")), ShardWriter(str(out))],
         tasks, logs("filter")),
    ]
    if not run_chain(chain, workers=workers, executor=executor):
        return submitted_stats(params, executor)
    n_in = sum_counts(Path(folder) / "counts")["n_in"]
    removed = json.loads((Path(folder) / "removed.json").read_text())
    for bulky in ("sigs", "full"):  # the signatures: every task that needs them is done (and marked so)
        shutil.rmtree(Path(folder) / bulky, ignore_errors=True)
    n_out = n_in - removed["exact"] - removed["near"]
    stats = {**params, "input": str(in_path), "workers": workers, "n_in": n_in, "n_out": n_out,
             "removed_exact": removed["exact"], "removed_near": removed["near"], "yield": n_out / max(1, n_in)}
    write_stats(out / "stats.json", stats)
    return stats
