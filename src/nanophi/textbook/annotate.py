"""Stage 2: educational-value labels on a seeded sample of the pool, the training set of the filter.

phi-1 asked GPT-4 to judge "the educational value for a student whose goal is to learn basic coding concepts"
on ~100k files and trained a classifier on the answers. Two labelers here, both writing the same records:

- `HeuristicRubric` ("heuristic-v1"): a transparent score over documented features of the code (table below).
  It needs no model, so the pipeline runs end to end offline, and every label can be explained.
- `LLMJudge`: the phi-1 way. Any teacher with `complete(prompts, max_tokens, temperature) -> list[str]` rates
  each document 1-10 (or yes/no); answers that cannot be parsed are kept with `label: null` and the raw text.

Rubric points (sum, max 10; label 1 when score >= threshold, default 5.5):
    docstrings      2.0 x fraction of functions/classes (and the module) with a docstring
    comments        1.0 if 3-40 % of code lines carry a comment, 0.5 if fewer (but some) or up to 60 %
    self-contained  1.5, -0.5 per non-stdlib import, -0.25 per free name beyond 2 (used, never bound here, not a
                    builtin: it needs code the student cannot see); 0 with a relative import
    length          1.0 for 10-200 non-blank lines, 0.5 for 5-9 or 201-500
    function size   1.0 if functions average <= 30 lines, 0.5 if <= 60
    complexity      1.0 if the most branchy function has McCabe-ish complexity <= 10, 0.5 if <= 20
    names           1.0 x fraction of bound names that say something (>= 3 chars or a conventional i, j, n, x...)
    type hints      1.0 x fraction of parameters and returns annotated
    defines         0.5 if it defines at least one function or class (something to learn from)
    test file      -2.0 for test code (test_*.py, tests/ folders, unittest/pytest cases): asserts, not lessons
    star import    -0.5 for `from x import *`; long lines -0.5 when > 10 % exceed 100 characters
"""

from __future__ import annotations

import argparse
import ast
import builtins
import logging
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nanophi.errors import UserError
from nanophi.textbook.pool import parse_python
from nanophi.textbook.records import (
    append_jsonl,
    read_jsonl,
    read_records,
    sidecar_path,
    stats_path,
    write_jsonl_atomic,
    write_stats,
)

log = logging.getLogger(__name__)

RUBRIC = (
    "Educational value for a student whose goal is to learn basic coding concepts: clear, self-contained, "
    "well-documented code that teaches an idea (algorithms, data structures, language features) scores high; "
    "configuration, boilerplate, generated tables, tests and code that needs a large unseen context score low."
)
HEURISTIC_LABELER = "heuristic-v1"
HEURISTIC_THRESHOLD = 5.5
SHORT_NAMES_OK = frozenset("_ i j k n m x y z f e a b s t c v".split())  # conventional one-letter names
TEST_PATH = re.compile(r"(^|/)(tests?|testing)(/|$)|(^|/)test_[^/]*\.py$|_test\.py$")
BRANCH_NODES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.IfExp, ast.ExceptHandler, ast.With,
                ast.AsyncWith, ast.Assert, ast.comprehension, ast.match_case)
DEFAULT_SAMPLE = 2000
_INLINE_COMMENT = re.compile(r"\S\s+#\s")
BATCH = 16  # documents per append (and per teacher call): what a killed run can lose


# --------------------------------------------------------------------------------------------- heuristic rubric

def _comment_lines(lines: list[str]) -> int:
    """Lines with a comment: a `#` line, or an inline `  # ...` (PEP 8 style).

    An approximation (a " # " inside a string counts too) that is ~50x faster than `tokenize`.
    """
    return sum(1 for line in lines if line.lstrip().startswith("#") or _INLINE_COMMENT.search(line))


def _complexity(fn: ast.AST) -> int:
    """1 + decision points, the McCabe count approximated from ast node types."""
    n = 1
    for node in ast.walk(fn):
        if isinstance(node, BRANCH_NODES):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
    return n


def _free_names(nodes: list[ast.AST]) -> int:
    """How many distinct names are read but never bound in the document (nor builtins)."""
    bound, used = set(dir(builtins)), set()
    for node in nodes:
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return len(used - bound)


def _bound_names(nodes: list[ast.AST]) -> list[str]:
    names: list[str] = []
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.arg) and node.arg not in ("self", "cls"):
            names.append(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
    return names


def code_features(text: str, path: str | None = None) -> dict[str, Any]:
    """The raw, documented measurements the rubric scores (see the module docstring)."""
    tree = parse_python(text)
    if tree is None:
        return {"parses": False}
    lines = [line for line in text.splitlines() if line.strip()]
    nodes = list(ast.walk(tree))
    defs = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    fns = [n for n in defs if not isinstance(n, ast.ClassDef)]
    has_module_doc = ast.get_docstring(tree) is not None
    documented = sum(ast.get_docstring(n) is not None for n in defs) + has_module_doc
    doc_slots = len(defs) + (1 if has_module_doc or not defs else 0)

    non_stdlib = relative = star = 0
    test_imports = False
    for node in nodes:
        if isinstance(node, ast.Import):
            tops = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            star += any(a.name == "*" for a in node.names)
            if node.level:
                relative += 1
                continue
            tops = [(node.module or "").split(".")[0]]
        else:
            continue
        test_imports |= any(t in ("unittest", "pytest", "test", "doctest") for t in tops)
        non_stdlib += sum(t not in sys.stdlib_module_names and t != "test" for t in tops)

    hint_slots = hinted = 0
    for fn in fns:
        params = [a for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
        hint_slots += len(params) + 1
        hinted += sum(a.annotation is not None for a in params) + (fn.returns is not None)
    names = _bound_names(nodes)
    good_names = sum(len(n) >= 3 or n in SHORT_NAMES_OK for n in names)
    fn_lines = [(fn.end_lineno or fn.lineno) - fn.lineno + 1 for fn in fns]
    test_defs = any(n.name.startswith("test") or n.name.endswith("Test") or n.name.endswith("Tests") for n in defs)
    return {
        "parses": True,
        "n_lines": len(lines),
        "n_defs": len(defs),
        "doc_ratio": documented / doc_slots if doc_slots else 0.0,
        "comment_density": _comment_lines(lines) / max(1, len(lines)),
        "non_stdlib_imports": non_stdlib,
        "relative_imports": relative,
        "free_names": _free_names(nodes),
        "star_imports": star,
        "mean_function_lines": sum(fn_lines) / len(fn_lines) if fn_lines else 0.0,
        "max_complexity": max(_complexity(f) for f in fns) if fns else _complexity(tree),
        "name_ratio": good_names / len(names) if names else 1.0,
        "type_hint_ratio": hinted / hint_slots if hint_slots else 0.0,
        "long_line_ratio": sum(len(line) > 100 for line in lines) / max(1, len(lines)),
        "is_test": bool((path and TEST_PATH.search(path)) or (test_imports and test_defs)),
    }


def _band(x: float, full: tuple[float, float], half: tuple[float, float]) -> float:
    """1.0 inside the `full` band, 0.5 inside the `half` band, else 0."""
    if full[0] <= x <= full[1]:
        return 1.0
    return 0.5 if half[0] <= x <= half[1] else 0.0


@dataclass
class HeuristicRubric:
    """Transparent educational-value score; `points` itemises exactly where a document's score comes from."""

    threshold: float = HEURISTIC_THRESHOLD
    name: str = HEURISTIC_LABELER

    def points(self, f: dict[str, Any]) -> dict[str, float]:
        if not f.get("parses"):
            return {"parses": 0.0}
        missing = 0.5 * f["non_stdlib_imports"] + 0.25 * max(0, f["free_names"] - 2)
        self_contained = 0.0 if f["relative_imports"] else max(0.0, 1.5 - missing)
        return {
            "docstrings": 2.0 * f["doc_ratio"],
            "comments": _band(f["comment_density"], (0.03, 0.40), (1e-9, 0.60)),
            "self_contained": self_contained,
            "length": _band(f["n_lines"], (10, 200), (5, 500)),
            "function_size": _band(f["mean_function_lines"], (1, 30), (1, 60)) if f["n_defs"] else 0.0,
            "complexity": _band(f["max_complexity"], (1, 10), (1, 20)),
            "names": 1.0 * f["name_ratio"],
            "type_hints": 1.0 * f["type_hint_ratio"],
            "defines": 0.5 if f["n_defs"] else 0.0,
            "test_file": -2.0 if f["is_test"] else 0.0,
            "star_import": -0.5 if f["star_imports"] else 0.0,
            "long_lines": -0.5 if f["long_line_ratio"] > 0.10 else 0.0,
        }

    def score(self, text: str, path: str | None = None) -> tuple[float, int, dict[str, float]]:
        """(score, label, points per feature) for one document."""
        pts = self.points(code_features(text, path))
        total = round(sum(pts.values()), 3)
        return total, int(total >= self.threshold), {k: round(v, 3) for k, v in pts.items()}

    def label(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rec in records:
            score, label, pts = self.score(rec["text"], (rec.get("provenance") or {}).get("path"))
            out.append({"label": label, "score": score, "points": pts})
        return out

    def describe(self) -> dict[str, Any]:
        return {"labeler": self.name, "threshold": self.threshold}


# ------------------------------------------------------------------------------------------------ LLM judge

class Teacher(Protocol):
    def complete(self, prompts: list[str], max_tokens: int, temperature: float) -> list[str]: ...


JUDGE_TEMPLATE_VERSION = "judge-v1"
JUDGE_TEMPLATE = """You are a strict computer science teacher. {rubric}

Rate the educational value of the following Python code for a student whose goal is to learn basic coding
concepts, on a scale from 1 (useless) to 10 (an excellent textbook example).

```python
{code}
```

Answer with the rating only, as "Rating: N".
Rating:"""
JUDGE_MAX_CHARS = 4000  # keeps prompt + code inside a small teacher's context
JUDGE_MAX_TOKENS = 8
JUDGE_THRESHOLD = 6  # ratings >= this are "educational"
_OUT_OF_TEN = re.compile(r"\b(10|[0-9])\s*(?:/\s*10|out of 10)\b", re.I)
_KEYED = re.compile(r"\b(?:rating|score)\s*(?:is|of)?\s*[:=]?\s*\**\s*(10|[0-9])\b", re.I)
_LEADING = re.compile(r"^\W*(10|[0-9])(?:\.0)?\b")
_YES_NO = re.compile(r"^\W*(yes|no)\b\W*(\w*)", re.I)
NOT_AN_ANSWER = frozenset({"idea", "clue", "comment", "rating", "score"})  # "no idea" is not a "no"


def parse_rating(answer: str) -> tuple[float | None, int | None]:
    """(rating 0-10 or None, yes=1/no=0 or None) from a judge's free-text answer.

    Tries, in order: "N/10" or "N out of 10", "Rating: N", a leading number, then a leading yes/no.
    Anything else is unparsable: (None, None).
    """
    for pattern in (_OUT_OF_TEN, _KEYED, _LEADING):
        m = pattern.search(answer.strip())
        if m:
            return float(m.group(1)), None
    m = _YES_NO.search(answer)
    if m and m.group(2).lower() not in NOT_AN_ANSWER:
        return None, int(m.group(1).lower() == "yes")
    return None, None


@dataclass
class LLMJudge:
    """phi-1's labeler: a teacher model rates each document; unparsable answers are kept with label None."""

    teacher: Teacher
    threshold: float = JUDGE_THRESHOLD
    temperature: float = 0.0  # a judge should be repeatable

    @property
    def name(self) -> str:
        return f"llm-{JUDGE_TEMPLATE_VERSION}:{getattr(self.teacher, 'name', type(self.teacher).__name__)}"

    def prompt(self, text: str) -> str:
        code = text if len(text) <= JUDGE_MAX_CHARS else text[:JUDGE_MAX_CHARS] + "\n# ... (truncated)"
        return JUDGE_TEMPLATE.format(rubric=RUBRIC, code=code)

    def label(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = self.teacher.complete([self.prompt(r["text"]) for r in records], JUDGE_MAX_TOKENS, self.temperature)
        if len(answers) != len(records):
            raise RuntimeError(f"teacher returned {len(answers)} answers for {len(records)} prompts")
        out = []
        for answer in answers:
            rating, yes = parse_rating(answer)
            label = int(rating >= self.threshold) if rating is not None else yes
            out.append({"label": label, "score": rating, "raw": answer})
        return out

    def describe(self) -> dict[str, Any]:
        return {"labeler": self.name, "threshold": self.threshold, "template_version": JUDGE_TEMPLATE_VERSION,
                "teacher": getattr(self.teacher, "name", type(self.teacher).__name__),
                "temperature": self.temperature}


# ------------------------------------------------------------------------------------------------- the stage

def sample_records(pool_path: str | os.PathLike, n: int, seed: int) -> Iterator[dict[str, Any]]:
    """A seeded uniform sample of n records, in pool order (two passes; nothing but indices held)."""
    total = sum(1 for _ in read_records(pool_path))
    keep = set(random.Random(seed).sample(range(total), min(n, total)))
    for i, rec in enumerate(read_records(pool_path)):
        if i in keep:
            yield rec


def annotate(
    pool_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int = DEFAULT_SAMPLE,
    seed: int = 0,
    labeler: str = "heuristic",
    teacher: Teacher | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Label a seeded sample of the pool into `out` (appended, resumable); returns stats over the whole file.

    Records already in `out` from the same labeler are skipped, so a killed LLM run picks up where it stopped
    (unparsable answers included: they are not asked again). A different threshold is a new labels file.
    """
    if labeler == "heuristic":
        lab: HeuristicRubric | LLMJudge = HeuristicRubric(threshold if threshold is not None else HEURISTIC_THRESHOLD)
    elif labeler == "llm":
        if teacher is None:
            raise UserError("labeler 'llm' needs a teacher model; pass one, or use --labeler heuristic")
        lab = LLMJudge(teacher, threshold if threshold is not None else JUDGE_THRESHOLD)
    else:
        raise UserError(f"unknown labeler {labeler!r}; use 'heuristic' or 'llm'")
    out = Path(out)
    done = {r["id"] for r in read_jsonl(out) if r.get("labeler") == lab.name} if out.exists() else set()
    meta = lab.describe()
    new = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal new
        labels = lab.label(batch)
        recs = [_label_record(r, lab_out, lab.name, seed, meta) for r, lab_out in zip(batch, labels, strict=True)]
        new += append_jsonl(out, recs)
        batch.clear()

    sampled = 0
    for rec in sample_records(pool_path, n, seed):
        sampled += 1
        if rec["id"] in done:
            continue
        done.add(rec["id"])  # the pool may hold the same text twice; label it once
        batch.append(rec)
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    stats = label_stats(out, lab.name)
    stats.update(stage="annotate", pool=str(pool_path), n_requested=n, n_in=sampled, seed=seed, n_new=new, **meta)
    write_stats(stats_path(out), stats)
    log.info("annotate: %d new labels (%d total, %.0f%% positive)", new, stats["n_out"],
             100 * stats["positive_rate"])
    return stats


def _label_record(rec: dict[str, Any], label: dict[str, Any], labeler: str, seed: int,
                  meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": rec["id"], "text": rec["text"], **label, "labeler": labeler,
            "provenance": {"stage": "annotate", "seed": seed, **meta, "pool": rec.get("provenance")}}


class RubricMapper:
    """Per-record rubric labels for `nanophi.textbook.scale` (--tasks > 1); picklable, built once per task."""

    def __init__(self, threshold: float, seed: int) -> None:
        self.threshold, self.seed = threshold, seed

    def __call__(self) -> Any:
        lab = HeuristicRubric(self.threshold)
        meta = lab.describe()

        def label(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            return _label_record(rec, lab.label([rec])[0], lab.name, self.seed, meta), None

        return label


def annotate_sharded(pool_path: str | os.PathLike, out: str | os.PathLike, *, tasks: int, workers: int,
                     n: int = DEFAULT_SAMPLE, seed: int = 0, threshold: float | None = None,
                     executor: Any = None) -> dict[str, Any]:
    """`annotate` with the rubric over datatrove tasks: the same sample and labels, in shards OUT/00000.jsonl...

    The sample is drawn first, in one pass over the pool (indices only), into OUT.sample.jsonl beside the
    folder; the tasks label its byte ranges. The judge (--labeler llm) stays on one process: it waits on a
    server, it does not compute.
    """
    from nanophi.textbook.scale import LOCAL, run_map_stage

    thr = threshold if threshold is not None else HEURISTIC_THRESHOLD
    sample = sidecar_path(out, "sample")
    write_jsonl_atomic(sample, _unique(sample_records(pool_path, n, seed)))
    stats = run_map_stage("annotate", sample, out, RubricMapper(thr, seed), tasks=tasks, workers=workers,
                          params={"pool": str(pool_path), "n": n, "seed": seed, "threshold": thr},
                          executor=executor or LOCAL)
    if stats.get("submitted"):
        return stats
    stats.update(label_stats(out, HEURISTIC_LABELER), n_requested=n, pool=str(pool_path),
                 labeler=HEURISTIC_LABELER)
    write_stats(Path(out) / "stats.json", stats)
    return stats


def _unique(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The first record of each id: the pool may hold the same text twice, and it is labelled once."""
    seen: set[str] = set()
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            yield rec


def label_stats(path: str | os.PathLike, labeler: str) -> dict[str, Any]:
    """Counts over a labels file for one labeler: positives, negatives, unparsable, mean score."""
    recs = [r for r in read_records(path) if r.get("labeler") == labeler]
    pos = sum(r["label"] == 1 for r in recs)
    neg = sum(r["label"] == 0 for r in recs)
    scores = [r["score"] for r in recs if isinstance(r.get("score"), (int, float))]
    return {"n_out": len(recs), "n_positive": pos, "n_negative": neg, "n_unparsable": len(recs) - pos - neg,
            "positive_rate": pos / max(1, pos + neg),
            "mean_score": round(sum(scores) / len(scores), 3) if scores else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", help="pool JSONL written by `nanophi textbook pool`")
    parser.add_argument("--out", required=True, help="labels JSONL (appended; rerun resumes)")
    parser.add_argument("-n", "--n", type=int, default=DEFAULT_SAMPLE, help="how many documents to label")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--labeler", choices=("heuristic", "llm"), default="heuristic",
                        help="transparent rubric, or a teacher model as judge (phi-1)")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"positive label at score >= this (default {HEURISTIC_THRESHOLD} rubric, "
                             f"{JUDGE_THRESHOLD} judge)")
    from nanophi.textbook.scale import add_scale_arguments
    from nanophi.textbook.teacher import add_teacher_arguments

    add_scale_arguments(parser)
    add_teacher_arguments(parser)  # the judge of `--labeler llm`


def run(args: argparse.Namespace, teacher: Teacher | None = None) -> int:
    """CLI entry; `--labeler llm` builds the judge from the --teacher flags unless a `teacher` is given."""
    if getattr(args, "tasks", 1) > 1:
        if args.labeler != "heuristic":
            raise UserError("--tasks > 1 runs the rubric; the judge waits on its server, run it with --tasks 1")
        from nanophi.textbook.scale import executor_from_args, submitted_message

        stats = annotate_sharded(args.pool, args.out, tasks=args.tasks, workers=args.workers, n=args.n,
                                 seed=args.seed, threshold=args.threshold, executor=executor_from_args(args))
        if (line := submitted_message(stats, args.out)) is not None:
            print(line)
            return 0
        print(f"annotate: {stats['n_out']} labels in {args.out}/ ({args.tasks} shards, {stats['n_positive']} "
              f"positive, {stats['n_negative']} negative)")
        return 0
    if args.labeler == "llm" and teacher is None:
        from nanophi.textbook.teacher import teacher_from_args

        teacher = teacher_from_args(args)
    stats = annotate(args.pool, args.out, n=args.n, seed=args.seed, labeler=args.labeler, teacher=teacher,
                     threshold=args.threshold)
    print(f"annotate: {stats['n_out']} labels in {args.out} ({stats['n_positive']} positive, "
          f"{stats['n_negative']} negative, {stats['n_unparsable']} unparsable)")
    return 0
