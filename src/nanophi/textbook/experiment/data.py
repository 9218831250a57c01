"""The case study's data: the pipeline's output read (or built), split, decontaminated and cut into arms.

A data directory holds the pipeline's JSONL files (records with id/text/provenance):

    pool.jsonl                 raw code (stage 1)                               -> arm A
    filtered.jsonl             what the filter kept (stages 2-3)                -> arm B
    textbooks[.verified].jsonl synthetic textbook sections (verified: code parses) -> the C of arm B+C
    exercises.jsonl            synthetic exercises (function + asserts)         -> D, once verified
    exercises.verified.jsonl   those whose asserts passed (`nanophi textbook verify`); verified here if absent

That is the layout `nanophi textbook run` writes; without --data-dir the experiment runs that pipeline itself.

Splits happen before any training, so no arm ever sees them:
  - held-out raw code: a seeded share of the pool, for bits per byte on code no arm trained on;
  - held-out exercises: a seeded share of the verified exercises, for pass@1 on problems the exercise fine-tune
    never saw. Training text that matches a held-out exercise (13-gram or AST similarity, the detectors of
    `decontaminate.py` pointed at the held-out set instead of HumanEval) is removed, and everything that trains
    is decontaminated against HumanEval at τ as the pipeline's stage 5 does.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import random
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.decontaminate import (FENCE, MIN_AST_TOKENS, NGRAM, SWEEP_TAUS, AstIndex, Detector,
                                            NgramIndex, ast_tokens, code_blocks, functions_of)
from nanophi.textbook.records import read_jsonl, sidecar_path, write_jsonl_atomic

log = logging.getLogger(__name__)

# Candidate names per kind, preferred first: `nanophi textbook run` writes the first of each.
FILES = {"pool": ("pool.jsonl",), "filtered": ("filtered.jsonl", "dedup.jsonl", "filter.jsonl"),
         "textbooks": ("textbooks.verified.jsonl", "textbooks.jsonl"), "exercises": ("exercises.jsonl",),
         "verified": ("exercises.verified.jsonl", "verified.jsonl")}
VERIFY_TIMEOUT_S = 5.0
VERIFY_MEMORY_MB = 512
VERIFY_WORKERS = 2


# ---------------------------------------------------------------------------------------------- exercises

@dataclass(frozen=True)
class Exercise:
    """One verified exercise cut the way HumanEval is: the model sees `prompt` (imports, helpers, signature,
    docstring) and must write `solution` (the body); `tests` are the exercise's own top-level asserts."""

    id: str
    name: str
    prompt: str
    solution: str
    tests: str
    source: str = "teacher"  # or "stdlib-doctest" (see experiment.exercises)

    def as_problem(self) -> dict[str, str]:
        """HumanEval's shape, so `nanophi.humaneval.check_completion` runs it: `check(name)` must exist, and the
        asserts run at top level before it."""
        return {"task_id": f"exercise/{self.id}", "prompt": self.prompt, "canonical_solution": self.solution,
                "entry_point": self.name, "test": self.tests + "\n\ndef check(candidate):\n    pass\n"}

    def program(self) -> str:
        return self.prompt + self.solution + "\n" + self.tests + "\n"


def _code_of(text: str) -> str:
    m = FENCE.search(text)
    return textwrap.dedent(m.group(1)) if m else text


def parse_exercise(record: dict[str, Any]) -> Exercise | None:
    """The exercise in a record's text, or None when it has no documented function with a body and asserts.

    The function is the one the generator asked for (`provenance.function_name`) when present, else the first
    top-level function with a docstring."""
    code = _code_of(record.get("text", ""))
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    wanted = (record.get("provenance") or {}).get("function_name")
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n) is not None]
    fn = next((f for f in fns if f.name == wanted), fns[0] if fns else None)
    if fn is None or len(fn.body) < 2:  # a docstring and nothing to write
        return None
    lines = code.splitlines(keepends=True)
    seg = lambda node: "".join(lines[node.lineno - 1:node.end_lineno])  # noqa: E731 (whole lines of a node)
    # Context the solution may rely on: imports, helpers, constants defined before the function.
    before = [n for n in tree.body if n.end_lineno < fn.lineno and not isinstance(n, (ast.Assert, ast.Expr))]
    start = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
    header = "".join(seg(n) for n in before) + "".join(lines[start - 1:fn.body[0].end_lineno])
    solution = "".join(lines[fn.body[0].end_lineno:fn.end_lineno])
    asserts = [seg(n) for n in tree.body if isinstance(n, ast.Assert) and fn.name in ast.unparse(n)]
    if not asserts or not solution.strip():
        return None
    return Exercise(record["id"], fn.name, _nl(header), _nl(solution), "".join(asserts).rstrip() + "\n")


def _nl(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def verify_exercises(exercises: Sequence[Exercise], workers: int = VERIFY_WORKERS) -> list[bool]:
    """Run each exercise's own asserts on its own solution in the sandbox; True where they all pass."""
    from nanophi.sandbox import run_program

    def ok(ex: Exercise) -> bool:
        return run_program(ex.program(), timeout=VERIFY_TIMEOUT_S, memory_mb=VERIFY_MEMORY_MB).status == "passed"

    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads wait; the work runs in sandboxes
        return list(pool.map(ok, exercises))


# ------------------------------------------------------------------------------------------ decontamination

class HeldOutDetector:
    """`decontaminate.Detector`'s two tests (13-gram overlap, AST similarity >= τ) against held-out exercises."""

    def __init__(self, exercises: Sequence[Exercise], tau: float, ngram: int = NGRAM,
                 min_ast_tokens: int = MIN_AST_TOKENS) -> None:
        problems = [e.as_problem() for e in exercises]
        self.tau = tau
        self.ngrams = NgramIndex.build(problems, ngram)
        self.asts = AstIndex(problems, min_ast_tokens) if problems else None

    def hit(self, record: dict[str, Any]) -> bool:
        if self.ngrams.match(record.get("text", "")) is not None:
            return True
        if self.asts is None or not len(self.asts.task_ids):
            return False
        for block in code_blocks(record):
            for fn in functions_of(block) or []:
                if self.asts.best(ast_tokens(fn), self.tau) is not None:
                    return True
        return False


def humaneval_filter(records: Iterable[dict[str, Any]], tau: float, detector: Detector,
                     sweep: Sequence[float], counts: Counter) -> list[dict[str, Any]]:
    """Records matching no HumanEval problem at τ; `counts[t]` adds what each τ of `sweep` would remove."""
    bound = min([tau, *sweep])
    kept = []
    for rec in records:
        hit = detector.check(rec, bound)
        for t in sweep:
            counts[t] += hit is not None and hit.score >= t
        if hit is None or hit.score < tau:
            kept.append(rec)
    return kept


# ------------------------------------------------------------------------------------------- the data

@dataclass
class ExperimentData:
    """Everything the arms train and are evaluated on, already split and decontaminated."""

    pool: list[dict[str, Any]]
    filtered: list[dict[str, Any]]
    textbooks: list[dict[str, Any]]
    train_exercises: list[Exercise]
    heldout_exercises: list[Exercise]
    heldout_code: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


def find_file(data_dir: Path, kind: str, required: bool = True) -> Path | None:
    for name in FILES[kind]:
        if (data_dir / name).is_file():
            return data_dir / name
    if required:
        raise UserError(f"{data_dir} has no {kind} file ({' or '.join(FILES[kind])}); run the pipeline "
                        "(`nanophi textbook run`) into it, or leave out --data-dir to build the data here")
    return None


def _held_out(record_id: str, seed: int, fraction: float) -> bool:
    """A seeded, order-independent coin per record id: the same split whatever order the files come in."""
    h = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def load_data(data_dir: Path, *, seed: int, heldout_code_fraction: float, heldout_exercise_fraction: float,
              tau: float, filter_keep: float | None = None, max_pool_chars: int | None = None,
              extra_exercises: Sequence[Exercise] = (),
              exercise_split: Callable[[list[Exercise]], tuple[list[Exercise], list[Exercise]]] | None = None
              ) -> ExperimentData:
    """Read a pipeline data directory, split off the held-out sets, decontaminate, and parse the exercises.

    `filter_keep`: keep this top share of the pool by the filter's P(educational) (from `filtered.scores.jsonl`)
    as arm B, instead of the filter's own threshold. A rubric that calls most of the stdlib educational makes a
    B that is nearly A; phi-1 kept ~6B of ~35B tokens (about 17 %). `extra_exercises` (already verified) join
    the data directory's before the split. `exercise_split(verified)` -> (train, held out), when given, replaces
    the per-record coin: the mined exercise set (`experiment.exercises.exercise_set`) brings its own split of
    100 held-out problems, and the teacher's verified exercises join it there."""
    data_dir = Path(data_dir)
    pool = list(read_jsonl(find_file(data_dir, "pool")))
    filtered_path = find_file(data_dir, "filtered")
    filtered = list(read_jsonl(filtered_path))
    textbooks = list(read_jsonl(find_file(data_dir, "textbooks")))
    stats: dict[str, Any] = {"data_dir": str(data_dir), "files": {}, "filter_kept_by_pipeline": len(filtered)}
    scores_path = sidecar_path(filtered_path, "scores")
    if filter_keep is not None and scores_path.is_file():
        p = {r["id"]: r["p"] for r in read_jsonl(scores_path)}
        ranked = sorted((r for r in pool if r["id"] in p), key=lambda r: (-p[r["id"]], r["id"]))
        filtered = ranked[:max(1, round(filter_keep * len(ranked)))]
        stats["filter_keep"] = filter_keep
        stats["filter_p_cut"] = p[filtered[-1]["id"]]
    verified_path = find_file(data_dir, "verified", required=False)
    if verified_path is not None:
        raw = list(read_jsonl(verified_path))
        # `verify` keeps the teacher's whole answer in `answer` (its `text` is the solution alone): cut that
        # answer here, so the prompt holds the helpers the solution may call and the asserts come along.
        parsed = [e for e in (parse_exercise({**r, "text": r.get("answer") or r["text"]}) for r in raw)
                  if e is not None]
        stats["files"]["verified"] = str(verified_path)
        stats["exercises"] = {"verified_records": len(raw), "parsed": len(parsed)}
        generated = find_file(data_dir, "exercises", required=False)
        if generated is not None:
            stats["exercises"]["generated"] = sum(1 for _ in read_jsonl(generated))
    else:  # verify here: only exercises whose own asserts pass may teach or test anything
        raw = list(read_jsonl(find_file(data_dir, "exercises")))
        candidates = [e for e in map(parse_exercise, raw) if e is not None]
        parsed = [e for e, ok in zip(candidates, verify_exercises(candidates)) if ok]
        stats["exercises"] = {"generated": len(raw), "parsed": len(candidates), "verified_here": len(parsed)}
    stats["exercises"]["extra"] = len(extra_exercises)
    parsed = list({e.id: e for e in [*parsed, *extra_exercises]}.values())
    if exercise_split is not None:
        train_ex, heldout_ex = exercise_split(parsed)
        stats["exercises"]["split"] = "exercise_set"
    else:
        if len(parsed) < 2:
            raise UserError(f"{data_dir}: {len(parsed)} usable verified exercises; at least 2 are needed (one to "
                            "train, one held out); generate more exercises")
        heldout_ex = [e for e in parsed if _held_out(e.id, seed, heldout_exercise_fraction)]
        if not heldout_ex:  # a tiny set can miss the coin entirely; hold out one anyway
            heldout_ex = [parsed[0]]
        held_ids = {e.id for e in heldout_ex}
        train_ex = [e for e in parsed if e.id not in held_ids]
    if not heldout_ex:
        raise UserError(f"{data_dir}: no held-out exercises; generate more exercises")

    heldout_docs = [r for r in pool if _held_out(r["id"], seed, heldout_code_fraction)]
    held_code_ids = {r["id"] for r in heldout_docs}
    pool = [r for r in pool if r["id"] not in held_code_ids]
    filtered = [r for r in filtered if r["id"] not in held_code_ids]
    if max_pool_chars is not None:
        pool = _cap_chars(pool, max_pool_chars)

    # Decontaminate what trains: against the held-out exercises first, then against HumanEval (with a τ sweep).
    near_held = HeldOutDetector(heldout_ex, tau)
    counts = {"heldout_matches": Counter()}
    def clean(name: str, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = [r for r in recs if not near_held.hit(r)]
        counts["heldout_matches"][name] = len(recs) - len(kept)
        return kept
    pool, filtered, textbooks = clean("pool", pool), clean("filtered", filtered), clean("textbooks", textbooks)
    ex_records = {e.id: {"id": e.id, "text": e.program()} for e in train_ex}
    kept_ex = {r["id"] for r in clean("exercises", list(ex_records.values()))}
    train_ex = [e for e in train_ex if e.id in kept_ex]

    he = Detector()
    sweep: dict[str, Counter] = {}
    n_in: dict[str, int] = {}
    def he_clean(name: str, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sweep[name], n_in[name] = Counter(), len(recs)
        return humaneval_filter(recs, tau, he, SWEEP_TAUS, sweep[name])
    pool, filtered, textbooks = he_clean("pool", pool), he_clean("filtered", filtered), he_clean("textbooks", textbooks)
    kept_ex = {r["id"] for r in he_clean("exercises", [ex_records[e.id] for e in train_ex])}
    train_ex = [e for e in train_ex if e.id in kept_ex]

    if not train_ex:
        raise UserError(f"{data_dir}: no training exercises left after the split and decontamination; generate more")
    stats.update(
        n_pool=len(pool), n_filtered=len(filtered), n_textbooks=len(textbooks), n_train_exercises=len(train_ex),
        n_heldout_exercises=len(heldout_ex), n_heldout_code_docs=len(heldout_docs),
        exercise_sources={"train": dict(Counter(e.source for e in train_ex)),
                          "heldout": dict(Counter(e.source for e in heldout_ex))},
        heldout_matches_removed=dict(counts["heldout_matches"]), tau=tau,
        humaneval_tau_sweep={name: {"n": n_in[name], **{str(t): c[t] for t in SWEEP_TAUS}}
                             for name, c in sweep.items()},
        chars={"pool": _chars(pool), "filtered": _chars(filtered), "textbooks": _chars(textbooks),
               "heldout_code": _chars(heldout_docs)})
    return ExperimentData(pool, filtered, textbooks, train_ex, heldout_ex, [r["text"] for r in heldout_docs], stats)


def _chars(recs: list[dict[str, Any]]) -> int:
    return sum(len(r["text"]) for r in recs)


def _cap_chars(recs: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    out, total = [], 0
    for r in recs:
        if total >= limit:
            break
        out.append(r)
        total += len(r["text"])
    return out


# -------------------------------------------------------------------------------------- arm corpora

def textbook_mix(filtered: list[dict[str, Any]], textbooks: list[dict[str, Any]], share: float,
                 max_repeats: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """B+C: the filtered code plus the textbooks, repeated (at most `max_repeats` times) until they are about
    `share` of the characters, shuffled with `seed`. Returns the records and the repeat count used.

    A 135M teacher on a CPU writes far fewer characters than the filter keeps; mixed at their natural share the
    textbooks would be noise in B+C, so they are upsampled, as phi-1 upsampled its synthetic data."""
    code, books = _chars(filtered), _chars(textbooks)
    repeats = 1
    if books and share > 0:
        want = share * code / max(1e-9, 1 - share)
        repeats = max(1, min(max_repeats, round(want / books)))
    mixed = filtered + [dict(r, id=f"{r['id']}#{k}") for k in range(repeats) for r in textbooks]
    random.Random(seed).shuffle(mixed)
    return mixed, repeats


def write_corpus(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """A JSONL of {"text"} that `nanophi.prepare` tokenizes."""
    write_jsonl_atomic(path, ({"id": r["id"], "text": r["text"]} for r in records))
    return path


# ------------------------------------------------------------------------------ building a data directory

@dataclass
class DataSpec:
    """How much data the pipeline builds when no --data-dir is given."""

    pool_docs: int = 1200  # functions/classes taken from the stdlib pool
    labels: int = 600  # heuristic educational-value labels the filter trains on
    textbooks: int = 16  # teacher-written textbook sections
    exercises: int = 64  # teacher-written exercises (before verification)
    textbook_tokens: int = 320
    exercise_tokens: int = 256
    teacher_batch: int = 16  # a 135M teacher decodes ~7x faster at batch 16 than at 1 on 2 cores


def build_data_dir(data_dir: Path, spec: DataSpec, *, teacher_ref: str, seed: int, device: str = "cpu",
                   teacher: Any = None) -> Path:
    """`nanophi textbook run` into `data_dir` with the sizes of `spec` (pool -> labels -> filter -> textbooks and
    exercises from the teacher -> verify -> ...). The pipeline skips finished stages, so a killed run resumes.
    `teacher`: a ready teacher object instead of loading `teacher_ref` (tests pass a scripted one)."""
    from nanophi.textbook.pipeline import PRESETS as PIPELINE_PRESETS
    from nanophi.textbook.pipeline import run_pipeline

    base = PIPELINE_PRESETS["tiny"]
    preset = dataclasses.replace(base, pool_max_docs=spec.pool_docs, labels=spec.labels, textbooks=spec.textbooks,
                                 exercises=spec.exercises, textbook_tokens=spec.textbook_tokens,
                                 exercise_tokens=spec.exercise_tokens, teacher_batch=spec.teacher_batch)
    run_pipeline(data_dir, preset, seed=seed, teacher=teacher, teacher_ref=teacher_ref, teacher_device=device,
                 name="experiment")
    return data_dir
