"""Stage 4: drop exact and near-duplicate documents, keeping the first occurrence.

Duplicates waste training compute and make the model memorise (Lee et al. 2022); cosmopedia's MinHash pass left
< 1 % duplicates. Two passes in one stream:

1. exact: sha256 of the text with whitespace runs collapsed (reformatted copies of one file collide);
2. near: MinHash (datasketch, 128 permutations) over word 5-gram shingles of the lower-cased word tokens, indexed
   in a MinHash LSH. A document whose LSH candidates include one with estimated Jaccard >= threshold (0.7)
   is a near-duplicate of the best such candidate (the LSH looks 0.15 lower, so few true pairs slip through).
   Documents under 2 x ngram words have too few word shingles for a stable estimate, so they use character
   5-grams instead.

Every removal goes to `OUT.removed.jsonl` with its reason, the id it duplicates and the estimated Jaccard.

`--tasks N` runs the same decisions on datatrove's MinHash pipeline, with the signatures on disk rather than in
memory (`nanophi.textbook.dedup_scale`): the same kept ids and removals, in shards OUT/00000.jsonl...
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.records import read_records, sidecar_path, stats_path, write_jsonl_atomic, write_stats
from nanophi.textbook.shingling import LSH_SLACK, exact_key, shingles

log = logging.getLogger(__name__)

def dedup(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    threshold: float = 0.7,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
) -> dict[str, Any]:
    """Write the first occurrence of each document to `out_path`; removals to `OUT.removed.jsonl`; returns stats."""
    from datasketch import MinHash, MinHashLSH

    if not 0.0 < threshold <= 1.0:
        raise UserError(f"threshold must be in (0, 1], got {threshold}")
    t0 = time.perf_counter()
    # The LSH banding misses a pair at Jaccard just above its threshold with real probability (~17 % at 0.79
    # for threshold 0.7); candidates are verified against `threshold` anyway, so index at a lower one.
    lsh = MinHashLSH(threshold=max(0.05, threshold - LSH_SLACK), num_perm=num_perm)
    template = MinHash(num_perm=num_perm, seed=seed)
    seen_exact: dict[str, str] = {}
    sketches: dict[str, Any] = {}
    removed: list[dict[str, Any]] = []
    counts = {"n_in": 0, "exact": 0, "near": 0}

    def kept() -> Iterator[dict[str, Any]]:
        for rec in read_records(in_path):
            counts["n_in"] += 1
            key = exact_key(rec["text"])
            if key in seen_exact:
                counts["exact"] += 1
                removed.append({"id": rec["id"], "reason": "exact", "duplicate_of": seen_exact[key], "jaccard": 1.0})
                continue
            seen_exact[key] = rec["id"]
            mh = template.copy()  # an empty sketch; copying skips re-drawing the permutations
            mh.update_batch(list(shingles(rec["text"], ngram)))
            best_id, best_j = None, 0.0
            for cand in lsh.query(mh):
                j = mh.jaccard(sketches[cand])
                if j > best_j:
                    best_id, best_j = cand, j
            if best_id is not None and best_j >= threshold:
                counts["near"] += 1
                removed.append({"id": rec["id"], "reason": "near", "duplicate_of": best_id,
                                "jaccard": round(best_j, 4)})
                continue
            if rec["id"] not in sketches:  # a distinct text with a colliding id cannot happen; guard LSH anyway
                lsh.insert(rec["id"], mh)
                sketches[rec["id"]] = mh
            yield rec

    n_out = write_jsonl_atomic(out_path, kept())
    write_jsonl_atomic(sidecar_path(out_path, "removed"), removed)
    stats = {"stage": "dedup", "input": str(in_path), "threshold": threshold, "num_perm": num_perm,
             "ngram": ngram, "seed": seed, "n_in": counts["n_in"], "n_out": n_out,
             "removed_exact": counts["exact"], "removed_near": counts["near"],
             "yield": n_out / max(1, counts["n_in"]), "seconds": round(time.perf_counter() - t0, 3)}
    write_stats(stats_path(out_path), stats)
    log.info("dedup: kept %d of %d (%d exact, %d near duplicates)", n_out, counts["n_in"], counts["exact"],
             counts["near"])
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input JSONL of records with 'id' and 'text'")
    parser.add_argument("--out", required=True, help="output JSONL without duplicates")
    parser.add_argument("--threshold", type=float, default=0.7,
                        help="estimated Jaccard at or above which is a duplicate")
    parser.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: finer estimate)")
    parser.add_argument("--ngram", type=int, default=5, help="words per shingle")
    parser.add_argument("--seed", type=int, default=1, help="seed of the MinHash permutations")
    from nanophi.textbook.scale import add_scale_arguments

    add_scale_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "tasks", 1) > 1:
        from nanophi.textbook.dedup_scale import dedup_sharded
        from nanophi.textbook.scale import executor_from_args, submitted_message

        stats = dedup_sharded(args.input, args.out, tasks=args.tasks, workers=args.workers,
                              threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram, seed=args.seed,
                              executor=executor_from_args(args))
        if (line := submitted_message(stats, args.out)) is not None:
            print(line)
            return 0
        print(f"dedup: kept {stats['n_out']}/{stats['n_in']} -> {args.out}/ ({args.tasks} shards; "
              f"{stats['removed_exact']} exact, {stats['removed_near']} near duplicates removed)")
        return 0
    stats = dedup(args.input, args.out, threshold=args.threshold, num_perm=args.num_perm, ngram=args.ngram,
                  seed=args.seed)
    print(f"dedup: kept {stats['n_out']}/{stats['n_in']} -> {args.out} ({stats['removed_exact']} exact, "
          f"{stats['removed_near']} near duplicates removed)")
    return 0
