"""Stage 4: synthetic textbooks and exercises, written by a teacher model with forced diversity.

    nanophi textbook generate --kind textbook  --n 100 --out data/gen --seed 0
    nanophi textbook generate --kind exercises --n 500 --out data/gen --teacher openai:http://host:8000/v1 \
        --teacher-model NAME

A teacher asked the same thing N times writes the same thing N times, so diversity is forced into the prompts,
as the anchors do it:
  textbooks  a topic tree (topic -> subtopic) x audience x style (phi-1's "topic and target audience",
             cosmopedia's audiences and styles) x the profession whose work the examples come from
  exercises  a pair of subtopics x a profession (Jina's generator) x a constrained function name (phi-1
             constrained the names to spread the exercises over the space of tasks)

Prompts come from versioned templates (`templates/<kind>-v<N>.txt`); the version goes into every record's
provenance with the teacher and the seed. The plan for seed S is a fixed sequence of distinct prompts, and the
first N are generated, so `--n 200` extends a `--n 100` run. Output is `OUT/<kind>.jsonl`, appended in batches
and keyed by a hash of the prompt: a run killed at any moment and started again with the same arguments asks
only for the prompts it has no answer for, and ends with exactly N records, none twice.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from importlib import resources
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.textbook.records import append_jsonl, read_jsonl, record_id, stats_path, write_stats
from nanophi.textbook.teacher import Teacher, add_teacher_arguments, teacher_from_args

log = logging.getLogger(__name__)

KINDS = ("textbook", "exercises")
TEMPLATE_VERSIONS = {"textbook": "textbook-v1", "exercises": "exercise-v1"}
OUTPUT_NAMES = {"textbook": "textbooks.jsonl", "exercises": "exercises.jsonl"}
MAX_TOKENS = {"textbook": 512, "exercises": 320}  # a textbook section / one function with its tests
# Diversity comes from the prompts; a lower temperature keeps a small teacher coherent, and code more so.
TEMPERATURE = {"textbook": 0.7, "exercises": 0.4}
BATCH = 8  # prompts per teacher call and per append (what a killed run can lose) when the teacher has no size
PLAN_ATTEMPTS = 50  # draws per prompt before concluding the plan space is exhausted

# The curriculum of "basic coding concepts" phi-1 aimed at, as a two-level tree.
TOPIC_TREE: dict[str, tuple[str, ...]] = {
    "variables and types": ("integers and floats", "strings", "booleans", "None", "type conversion"),
    "control flow": ("if/elif/else", "for loops", "while loops", "break and continue", "nested loops"),
    "functions": ("parameters and return values", "default arguments", "keyword arguments", "recursion",
                  "scope and closures", "higher-order functions"),
    "lists": ("indexing and slicing", "list methods", "list comprehensions", "sorting", "two-dimensional lists"),
    "dictionaries and sets": ("counting with dictionaries", "grouping items", "set operations",
                              "dictionary comprehensions", "nested dictionaries"),
    "strings in depth": ("string methods", "formatting", "parsing text", "palindromes and reversal",
                         "character counting"),
    "tuples and unpacking": ("tuple unpacking", "enumerate and zip", "returning several values",
                             "named tuples"),
    "algorithms": ("linear search", "binary search", "selection and insertion sort", "merge sort",
                   "greedy choices", "dynamic programming", "two pointers", "prefix sums"),
    "number theory": ("divisibility and primes", "greatest common divisor", "digits of a number",
                      "fibonacci numbers", "modular arithmetic"),
    "data structures": ("stacks", "queues", "linked lists", "binary trees", "heaps", "graphs and BFS"),
    "object-oriented programming": ("classes and instances", "methods", "inheritance", "special methods",
                                    "dataclasses"),
    "errors and testing": ("exceptions", "raising errors", "assertions", "unit tests", "edge cases"),
    "iterators and generators": ("the iterator protocol", "generator functions", "itertools",
                                 "lazy evaluation"),
    "files and text data": ("reading lines", "CSV rows", "JSON data", "word frequencies"),
    "math and geometry": ("areas and perimeters", "distances between points", "averages and medians",
                          "matrices", "rounding and precision"),
    "dates and simulation": ("calendars and leap years", "random numbers", "simple simulations",
                             "time conversions"),
}
AUDIENCES = ("a complete beginner who has never programmed", "a high school student",
             "a first-year university student", "a professional developer new to Python")
STYLES = ("a clear textbook chapter", "a step-by-step tutorial with worked examples",
          "lecture notes with questions and answers")
PROFESSIONS = ("a teacher", "an accountant", "a biologist", "a chef", "a librarian", "a nurse", "a game designer",
               "an electrician", "a journalist", "a farmer", "a pharmacist", "an architect", "a musician",
               "an astronomer", "a shop owner", "a logistics planner", "a sports coach", "a photographer",
               "a lawyer", "a geologist")
# Constrained function names (phi-1): verb_noun, e.g. `count_scores`, drawn jointly with the topics.
NAME_VERBS = ("count", "find", "merge", "filter", "sort", "group", "sum", "average", "convert", "parse",
              "validate", "reverse", "rotate", "split", "flatten", "compress", "rank", "match", "schedule",
              "balance", "encode", "decode", "normalize", "score")
NAME_NOUNS = ("words", "scores", "orders", "readings", "intervals", "grades", "prices", "names", "pairs",
              "records", "digits", "matrix", "tokens", "events", "temperatures", "distances", "inventory",
              "votes", "ranges", "sequence", "dates", "codes", "steps", "weights")


def subtopics() -> list[tuple[str, str]]:
    """Every (topic, subtopic) leaf of the tree, in a fixed order."""
    return [(t, s) for t, subs in TOPIC_TREE.items() for s in subs]


def load_template(kind: str, version: str | None = None) -> tuple[str, str]:
    """(version, template text) for `kind` (its default version unless `version` names another, e.g. the
    stricter `exercise-v2`), read from the package's templates folder."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    version = version or TEMPLATE_VERSIONS[kind]
    if not resources.files("nanophi.textbook").joinpath("templates", f"{version}.txt").is_file():
        raise UserError(f"no prompt template {version!r} in nanophi/textbook/templates")
    text = resources.files("nanophi.textbook").joinpath("templates", f"{version}.txt").read_text(encoding="utf-8")
    return version, text.strip()


def _draw(kind: str, rng: random.Random, leaves: list[tuple[str, str]]) -> dict[str, str]:
    if kind == "textbook":
        topic, sub = rng.choice(leaves)
        return {"topic": topic, "subtopic": sub, "audience": rng.choice(AUDIENCES), "style": rng.choice(STYLES),
                "profession": rng.choice(PROFESSIONS)}
    (ta, sa), (tb, sb) = rng.sample(leaves, 2)  # two different leaves: the exercise sits at their intersection
    return {"topic_a": sa, "topic_b": sb, "profession": rng.choice(PROFESSIONS),
            "function_name": f"{rng.choice(NAME_VERBS)}_{rng.choice(NAME_NOUNS)}"}


def plan(kind: str, n: int, seed: int, version: str | None = None) -> list[dict[str, Any]]:
    """The first n prompts of the plan for (kind, seed): distinct, and the same prefix for any n.

    Each item: {"prompt_id", "prompt", "fields"}. Draws that repeat an earlier prompt are redrawn, so the
    prompts never collide (the output is keyed by them)."""
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    version, template = load_template(kind, version)
    rng = random.Random(f"{kind}:{seed}")  # a string seed: the plans of different kinds are unrelated
    leaves = subtopics()
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        for _ in range(PLAN_ATTEMPTS):
            fields = _draw(kind, rng, leaves)
            prompt = template.format(**fields)
            pid = record_id(f"{version}\n{prompt}")
            if pid not in seen:
                break
        else:
            raise UserError(f"cannot plan {n} distinct {kind} prompts (stopped at {len(out)}); the topic tree is "
                            "too small for this many: add topics or use several seeds")
        seen.add(pid)
        out.append({"prompt_id": pid, "prompt": prompt, "fields": fields})
    return out


def output_path(out_dir: str | os.PathLike, kind: str) -> Path:
    return Path(out_dir) / OUTPUT_NAMES[kind]


def generate(
    kind: str,
    n: int,
    out_dir: str | os.PathLike,
    teacher: Teacher,
    *,
    seed: int = 0,
    max_tokens: int | None = None,
    temperature: float | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """Make `out_dir/<kind>.jsonl` hold one answer for each of the first n planned prompts; returns the stats.

    Only prompts without an answer in the file are sent, in batches appended as they finish."""
    # Default: as many prompts per call as the teacher works on at once (engine rows, or requests in flight).
    if batch is None:
        batch = getattr(teacher, "batch_size", None) or getattr(teacher, "concurrency", None) or BATCH
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature is not None and not 0 <= temperature < math.inf:  # also false for NaN
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():  # before any teacher call, not at the first append
        raise UserError(f"--out {out_dir} is a file, but generate writes a folder there; give a folder path")
    t0 = time.perf_counter()
    version, _ = load_template(kind)
    max_tokens = max_tokens or MAX_TOKENS[kind]
    temperature = TEMPERATURE[kind] if temperature is None else temperature
    specs = plan(kind, n, seed)
    out = output_path(out_dir, kind)
    done = {r["id"] for r in read_jsonl(out)} if out.exists() else set()
    todo = [s for s in specs if s["prompt_id"] not in done]
    resumed = n - len(todo)
    if resumed:
        log.info("generate %s: %d of %d already in %s; %d to go", kind, resumed, n, out, len(todo))
    teacher_name = getattr(teacher, "name", type(teacher).__name__)
    licence = getattr(teacher, "licence", None)  # of the teacher's outputs, where the teacher says
    new = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        # The sampling seed depends on the prompts, not on how far a previous run got.
        chunk_seed = int(chunk[0]["prompt_id"][:8], 16) ^ seed
        answers = teacher.chat([s["prompt"] for s in chunk], max_tokens, temperature, seed=chunk_seed)
        if len(answers) != len(chunk):
            raise RuntimeError(f"teacher returned {len(answers)} answers for {len(chunk)} prompts")
        recs = [{"id": s["prompt_id"], "text": a.strip(), "kind": kind, "prompt": s["prompt"],
                 "provenance": {"stage": "generate", "kind": kind, "template_version": version,
                                "teacher": teacher_name, "seed": seed, "prompt_id": s["prompt_id"],
                                "max_tokens": max_tokens, "temperature": temperature, **s["fields"],
                                **({"licence": licence} if licence else {})}}
                for s, a in zip(chunk, answers)]
        new += append_jsonl(out, recs)
        log.info("generate %s: %d/%d", kind, resumed + new, n)
    if not out.exists():  # n == 0: an empty file still says the stage ran
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    wanted = {s["prompt_id"] for s in specs}
    ids = [r["id"] for r in read_jsonl(out) if r["id"] in wanted]
    texts = [r["text"] for r in read_jsonl(out) if r["id"] in wanted]
    if len(ids) != n or len(set(ids)) != n:  # the promise of this stage; a failure here is a bug
        raise RuntimeError(f"{out}: {len(ids)} records ({len(set(ids))} distinct) for {n} planned prompts")
    stats = {"stage": "generate", "kind": kind, "template_version": version, "teacher": teacher_name, "seed": seed,
             "n_in": n, "n_requested": n, "n_out": len(ids), "n_new": new, "n_resumed": resumed,
             "max_tokens": max_tokens, "temperature": temperature, "empty_answers": sum(not t for t in texts),
             "chars": sum(map(len, texts)),
             "distinct": {k: len({s["fields"][k] for s in specs}) for k in (specs[0]["fields"] if specs else {})},
             "teacher_usage": getattr(getattr(teacher, "usage", None), "to_dict", dict)(),
             "seconds": round(time.perf_counter() - t0, 3)}
    write_stats(stats_path(out), stats)
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, required=True, help="textbook sections or coding exercises")
    parser.add_argument("--n", type=int, required=True, help="how many records the output should hold")
    parser.add_argument("--out", required=True, help="output folder (writes <kind>.jsonl and its stats)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt plan and of sampling")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"tokens per answer (default {MAX_TOKENS['textbook']} textbook, "
                             f"{MAX_TOKENS['exercises']} exercises)")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"teacher sampling temperature (default {TEMPERATURE['textbook']} textbook, "
                             f"{TEMPERATURE['exercises']} exercises)")
    parser.add_argument("--batch", type=int, default=None,
                        help="prompts per teacher call and per append (default: --teacher-batch for a local "
                             "teacher, --teacher-concurrency for an endpoint)")
    add_teacher_arguments(parser)


def run(args: argparse.Namespace) -> int:
    teacher = teacher_from_args(args)
    stats = generate(args.kind, args.n, args.out, teacher, seed=args.seed, max_tokens=args.max_tokens,
                     temperature=args.temperature, batch=args.batch)
    u = stats["teacher_usage"]
    print(f"generate: {stats['n_out']} {args.kind} records in {output_path(args.out, args.kind)} "
          f"({stats['n_new']} new, {stats['n_resumed']} resumed; {u.get('completion_tokens', 0)} tokens generated)")
    return 0

