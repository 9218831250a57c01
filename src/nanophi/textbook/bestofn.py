"""Best-of-n exercise generation: sample several answers per prompt, keep the first that passes its own tests.

A weak teacher (SmolLM2-135M) rarely writes a whole exercise whose asserts pass on the first try, but with
temperature > 0 some of its samples do. Three things raise the yield, each measurable on its own:

  best-of-n      sample j of a prompt has its own seed (a hash of the seed, the prompt and j), so sample j is the
                 same whatever n is and whichever prompts share its call; the first sample whose program passes in
                 the sandbox is kept and the prompt is not asked again
  solution-only  the problem (imports, signature, docstring) and its tests are fixed, e.g. a mined stdlib
                 doctest exercise (`experiment.exercises`); the teacher writes only the function
  repair         near misses fixed where that changes neither the tests nor the logic: code outside a fence or
                 with prose around it, a tail cut off by the token budget (whole trailing lines are dropped), a
                 function defined under another name than the one its asserts call (the def is renamed), a body
                 written without its `def` line (solution-only: put under the fixed header). Nothing adds or
                 edits an assert, and an answer whose asserts call a name other than the asked one stays rejected
                 (that is the prompt's worked example copied back). Every repair is recorded with the exercise.

    python -m nanophi.textbook.bestofn yield --out docs/textbook_yield.json --prompts 12 --n 8
    python -m nanophi.textbook.bestofn generate --strategy exercise-v2 --prompts 100 --n 4 --out kept.jsonl \\
        --teacher openai:http://host:8000/v1 --teacher-model NAME

`yield` reports, per strategy and n, the fraction of prompts with a verified exercise and verified exercises
per generation (best-of-n stops asking a prompt once it has one), for answers taken as they are and repaired.
Answers are cached in `--cache` (JSONL, appended per call), so a killed run resumes without asking again.
The solution strategy takes `--exercise-set` (an experiment's exercises.jsonl) and never draws its held-out
exercises. The checks and repairs of an answer live in `nanophi.textbook.repair`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from nanophi.errors import UserError
from nanophi.textbook.records import append_jsonl, read_jsonl, record_id, write_jsonl_atomic
from nanophi.textbook.repair import Check, Problem, check, check_exercise, check_solution  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

STRATEGIES = ("exercise-v1", "exercise-v2", "solution")
SOLUTION_TEMPLATE = "solution-v1"
NS = (1, 2, 4, 8)
TEMPERATURE = 0.7  # enough spread between samples for best-of-8, still mostly coherent for a 135M model
MAX_TOKENS = {"exercise-v1": 256, "exercise-v2": 224, "solution": 160}
STOP = ("\n```\n",)  # the closing fence: what follows it is prose the checker throws away anyway
TIMEOUT_S = 3.0
MEMORY_MB = 512
WORKERS = 4  # threads only wait on sandboxed processes
MAX_PROBLEM_CHARS = 900  # solution-only: a short problem leaves the small teacher's context for the answer


# ---------------------------------------------------------------------------------------------- problems

def exercise_problems(n: int, seed: int = 0, version: str = "exercise-v2") -> list[Problem]:
    """The first n prompts of generate's exercise plan, rendered with template `version`."""
    from nanophi.textbook.synthesize import plan

    return [Problem(s["prompt_id"], version, s["fields"]["function_name"], s["prompt"], fields=s["fields"])
            for s in plan("exercises", n, seed, version)]


def solution_prompt(header: str) -> str:
    template = resources.files("nanophi.textbook").joinpath("templates", f"{SOLUTION_TEMPLATE}.txt")
    return template.read_text(encoding="utf-8").strip().format(problem=header.rstrip())


def heldout_ids(exercise_set: str | Path) -> frozenset[str]:
    """The ids of the held-out exercises in an experiment's exercise set (its `exercises.jsonl` cache, built by
    `experiment.exercises.exercise_set`): what best-of-n output that may be trained on must not contain."""
    path = Path(exercise_set)
    if not path.is_file():
        raise UserError(f"--exercise-set {path} is not a file: give an experiment's exercises.jsonl (its held-out "
                        "exercises are left out of the solution problems)")
    rows = list(read_jsonl(path))
    if not rows or "key" not in rows[0]:
        raise UserError(f"--exercise-set {path} is not an exercise set (no header line with its key)")
    return frozenset(r["id"] for r in rows[1:] if r.get("split") == "heldout")


def mined_problems(n: int, seed: int = 0, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """n solution-only problems from the standard library's doctest exercises (signature + docstring with
    `>>>` examples; the test runs the examples), short ones only, in an order fixed by a hash of (seed, id),
    each checked first: its own solution passes its test in the sandbox. Exercises whose id is in `exclude`
    (the held-out split, `heldout_ids`) are never drawn, so what the teacher writes for them can be trained on."""
    from nanophi.textbook.experiment.data import verify_exercises
    from nanophi.textbook.experiment.exercises import doctest_exercises

    found = [e for e in doctest_exercises() if len(e.prompt) <= MAX_PROBLEM_CHARS and e.id not in exclude]
    found.sort(key=lambda e: hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest())
    kept: list[Any] = []
    for start in range(0, len(found), 2 * n):  # verify a few more than needed at a time
        chunk = found[start:start + 2 * n]
        kept += [e for e, ok in zip(chunk, verify_exercises(chunk)) if ok]
        if len(kept) >= n:
            break
    return [Problem(e.id, "solution", e.name, solution_prompt(e.prompt), header=e.prompt.rstrip() + "\n",
                    tests=e.tests, fields={"source": e.source, "source_id": e.id}) for e in kept[:n]]


def problems_for(strategy: str, n: int, seed: int = 0, exercise_set: str | Path | None = None) -> list[Problem]:
    """The problems of `strategy`; the solution strategy needs `exercise_set` to leave its held-out exercises out."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "solution":
        return exercise_problems(n, seed, strategy)
    if exercise_set is None:
        raise UserError("the solution strategy draws stdlib doctest exercises, some of them held out: give "
                        "--exercise-set DIR/exercises.jsonl (an experiment's exercise set) to leave those out")
    return mined_problems(n, seed, heldout_ids(exercise_set))


# ------------------------------------------------------------------------------------------------ sampling

def sample_seed(seed: int, problem_id: str, sample: int) -> int:
    """The seed of sample `sample` of a prompt: independent of n and of the prompt's batch-mates."""
    return int(hashlib.sha256(f"{seed}:{problem_id}:{sample}".encode()).hexdigest()[:8], 16)


def _run_checks(checks: Sequence[Check], timeout: float, memory_mb: int, workers: int) -> list[dict[str, Any]]:
    from nanophi.sandbox import run_program

    def one(c: Check) -> dict[str, Any]:
        if c.reason != "ok":
            return {"passed": False, "reason": c.reason}
        r = run_program(c.program(), timeout=timeout, memory_mb=memory_mb)
        if r.status == "error":  # the sandbox itself failed: that says nothing about the answer
            raise RuntimeError(f"the sandbox could not run a program: {r.reason}")
        return {"passed": r.passed, "reason": "passed" if r.passed else f"tests_{r.status}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, checks))


class AnswerCache:
    """Teacher answers by (prompt, sample seed, settings), appended to a JSONL as they come: a rerun asks only
    for what is missing."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.answers: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self.answers = {r["key"]: r["text"] for r in read_jsonl(self.path)}

    @staticmethod
    def key(teacher: str, prompt: str, seed: int, temperature: float, max_tokens: int) -> str:
        return record_id(f"{teacher}\n{seed}\n{temperature}\n{max_tokens}\n{prompt}")

    def add(self, rows: list[dict[str, str]]) -> None:
        self.answers.update((r["key"], r["text"]) for r in rows)
        if self.path is not None:
            append_jsonl(self.path, rows)


def best_of_n(teacher: Any, problems: Sequence[Problem], n: int, *, seed: int = 0,
              temperature: float = TEMPERATURE, max_tokens: int | None = None, repair: bool = True,
              stop_on: str = "kept", cache: AnswerCache | None = None, timeout: float = TIMEOUT_S,
              memory_mb: int = MEMORY_MB, workers: int = WORKERS) -> list[dict[str, Any]]:
    """For each problem, up to n samples in rounds; a problem leaves once a sample passes: with `stop_on`
    "kept" the sample as checked (repaired when `repair`), with "raw" the answer as written (so that one run
    measures both; a raw pass is always a repaired pass). Returns per problem its candidates (each with the
    verdict as written, "raw", and repaired, "fixed"), `first_raw`/`first_fixed` (the index of the first
    passing sample or None) and `kept` (the exercise record of the first sample that passes as checked)."""
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    if not temperature > 0:
        raise UserError("best-of-n needs a temperature > 0: greedy samples are all the same")
    if stop_on not in ("kept", "raw"):
        raise ValueError(f"stop_on must be 'kept' or 'raw', got {stop_on!r}")
    cache = cache or AnswerCache(None)
    teacher_name = getattr(teacher, "name", type(teacher).__name__)
    results = [{"id": p.id, "name": p.name, "candidates": [], "first_raw": None, "first_fixed": None, "kept": None}
               for p in problems]
    for j in range(n):
        live = [i for i, r in enumerate(results)
                if (r["first_raw"] if stop_on == "raw" or not repair else r["first_fixed"]) is None]
        if not live:
            break
        tokens = max_tokens or MAX_TOKENS[problems[live[0]].strategy]
        seeds = [sample_seed(seed, problems[i].id, j) for i in live]
        keys = [cache.key(teacher_name, problems[i].prompt, s, temperature, tokens) for i, s in zip(live, seeds)]
        ask = [k for k, key in enumerate(keys) if key not in cache.answers]
        if ask:
            texts = teacher.chat([problems[live[k]].prompt for k in ask], tokens, temperature,
                                 seed=[seeds[k] for k in ask], stop=STOP)
            cache.add([{"key": keys[k], "text": t} for k, t in zip(ask, texts)])
        answers = [cache.answers[key] for key in keys]
        raw = [check(problems[i], a, repair=False) for i, a in zip(live, answers)]
        fixed = [check(problems[i], a, repair=True) if repair and c.reason != "ok" else c
                 for i, a, c in zip(live, answers, raw)]
        # a repaired check that equals the raw one runs once
        todo = raw + [f for f, c in zip(fixed, raw) if f is not c]
        ran = _run_checks(todo, timeout, memory_mb, workers)
        raw_v, extra = ran[:len(raw)], iter(ran[len(raw):])
        fixed_v = [rv if f is c else next(extra) for f, c, rv in zip(fixed, raw, raw_v)]
        for i, a, s, c, f, rv, fv in zip(live, answers, seeds, raw, fixed, raw_v, fixed_v):
            r, p = results[i], problems[i]
            r["candidates"].append({"sample": j, "seed": s, "raw": rv["reason"], "fixed": fv["reason"],
                                    "repairs": list(f.repairs)})
            if rv["passed"] and r["first_raw"] is None:
                r["first_raw"] = j
            if fv["passed"] and r["first_fixed"] is None:
                r["first_fixed"] = j
            use, ok = (f, fv["passed"]) if repair else (c, rv["passed"])
            if ok and r["kept"] is None:
                r["kept"] = {"id": record_id(f"{p.id}:{j}"), "text": use.solution, "kind": "exercises",
                             "problem": use.problem, "tests": use.tests, "answer": a,
                             "provenance": {"stage": "bestofn", "kind": "exercises", "strategy": p.strategy,
                                            "teacher": teacher_name, "seed": seed, "sample": j, "sample_seed": s,
                                            "temperature": temperature, "max_tokens": tokens,
                                            "repairs": list(use.repairs), "function_name": p.name,
                                            **p.fields}}
        log.info("best-of-n %s: sample %d, %d asked, %d of %d problems verified", problems[0].strategy, j,
                 len(live), sum(r["first_fixed" if repair else "first_raw"] is not None for r in results),
                 len(results))
    return results


def yield_at(results: Sequence[dict[str, Any]], k: int, which: str) -> dict[str, Any]:
    """Best-of-k as a run with n = k would have gone (sample j never depends on n): prompts with a verified
    exercise, and generations spent when a prompt stops at its first pass."""
    first = [r[which] for r in results]
    verified = sum(f is not None and f < k for f in first)
    generations = sum(min(k, f + 1) if f is not None else k for f in first)
    return {"n": k, "prompts": len(results), "prompts_verified": verified,
            "fraction_prompts_verified": round(verified / max(1, len(results)), 4), "generations": generations,
            "verified_per_generation": round(verified / max(1, generations), 4)}


# ------------------------------------------------------------------------------------------------- commands

def _teacher(args: argparse.Namespace) -> Any:
    from nanophi.textbook.teacher import teacher_from_args

    return teacher_from_args(args)


def run_yield(args: argparse.Namespace) -> dict[str, Any]:
    """Every strategy on its own sample of `--prompts` problems, sample rounds interleaved across strategies
    (so a run stopped early has the same n for all), then the table per strategy, n and repair."""
    import torch

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:  # before the teacher loads
        raise UserError(f"--strategies must be some of {', '.join(STRATEGIES)}, got {args.strategies!r}")
    teacher = _teacher(args)
    cache = AnswerCache(args.cache)
    load0, t0 = os.getloadavg(), time.perf_counter()
    probs = {s: problems_for(s, args.prompts, args.seed, args.exercise_set) for s in strategies}
    usage_before = teacher.usage.to_dict() if hasattr(teacher, "usage") else {}
    per: dict[str, dict[str, Any]] = {s: {"seconds": 0.0} for s in strategies}
    results: dict[str, list[dict[str, Any]]] = {}
    rounds = 0
    for j in range(1, args.n + 1):  # round by round: a rerun with the cache replays earlier rounds for free
        if args.max_minutes and time.perf_counter() - t0 > 60 * args.max_minutes:
            log.info("yield: stopping after %d samples per prompt (--max-minutes)", rounds)
            break
        for s in strategies:
            t = time.perf_counter()
            results[s] = best_of_n(teacher, probs[s], j, seed=args.seed, temperature=args.temperature,
                                   repair=True, stop_on="raw", cache=cache)
            per[s]["seconds"] += time.perf_counter() - t
        rounds = j
    ns = [k for k in NS if k <= rounds] + ([rounds] if rounds and rounds not in NS else [])  # and the last round
    table: dict[str, Any] = {}
    for s in strategies:
        cands = [c for r in results[s] for c in r["candidates"]]
        table[s] = {
            "prompts": len(probs[s]), "samples_per_prompt_max": rounds, "candidates": len(cands),
            "max_tokens": MAX_TOKENS[s], "seconds": round(per[s]["seconds"], 1),
            "as_written": [yield_at(results[s], k, "first_raw") for k in ns],
            "repaired": [yield_at(results[s], k, "first_fixed") for k in ns],
            "reasons_as_written": dict(Counter(c["raw"] for c in cands).most_common()),
            "reasons_repaired": dict(Counter(c["fixed"] for c in cands).most_common()),
            "repairs_in_passing": dict(Counter(rep for c in cands if c["fixed"] == "passed" and c["raw"] != "passed"
                                               for rep in c["repairs"]).most_common()),
            "verified": [{"name": r["name"], "sample": r["kept"]["provenance"]["sample"],
                          "repairs": r["kept"]["provenance"]["repairs"], "solution": r["kept"]["text"]}
                         for r in results[s] if r["kept"]]}
    usage = teacher.usage.to_dict() if hasattr(teacher, "usage") else {}
    out = {"command": "python -m nanophi.textbook.bestofn yield " + " ".join(sys.argv[2:]),
           "teacher": getattr(teacher, "name", "?"), "seed": args.seed, "temperature": args.temperature,
           "top_p": 0.95, "stop": list(STOP), "strategies": table,
           "teacher_usage": {k: usage.get(k, 0) - (usage_before.get(k, 0) or 0) for k in
                             ("requests", "prompt_tokens", "completion_tokens")} | {
                                 "completion_tokens_per_s": usage.get("completion_tokens_per_s")},
           "wall_s": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
           "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "note": "n = k is computed from the first k samples of each prompt, which are exactly those a run "
                   "with n = k draws (per-sample seeds); generations count what best-of-k spends when it stops "
                   "at a prompt's first pass. 'solution' problems are stdlib doctest exercises (their examples "
                   "are the tests); the exercise strategies' tests are the teacher's own asserts."}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def run_generate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The verified exercises of best-of-n for the first `--prompts` problems of a strategy."""
    problems = problems_for(args.strategy, args.prompts, args.seed, args.exercise_set)
    results = best_of_n(_teacher(args), problems, args.n, seed=args.seed, temperature=args.temperature,
                        repair=not args.no_repair, cache=AnswerCache(args.cache))
    kept = [r["kept"] for r in results if r["kept"]]
    write_jsonl_atomic(args.out, kept)
    return kept


def build_parser() -> argparse.ArgumentParser:
    from nanophi.textbook.teacher import add_teacher_arguments

    parser = argparse.ArgumentParser(prog="python -m nanophi.textbook.bestofn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    y = sub.add_parser("yield", help="verified-exercise yield per strategy and n, as JSON")
    y.add_argument("--out", required=True, help="JSON file to write the table to")
    y.add_argument("--strategies", default="exercise-v1,exercise-v2,solution",
                   help=f"comma-separated, of {', '.join(STRATEGIES)}")
    y.add_argument("--max-minutes", type=float, default=None,
                   help="start no new sample round after this long (the table then stops at a smaller n)")
    g = sub.add_parser("generate", help="best-of-n verified exercises of one strategy, as JSONL records")
    g.add_argument("--out", required=True, help="JSONL of the kept exercises (verify's output format)")
    g.add_argument("--strategy", default="exercise-v2", help=f"one of {', '.join(STRATEGIES)}")
    g.add_argument("--no-repair", action="store_true", help="take answers only as written")
    for p in (y, g):
        p.add_argument("--prompts", type=int, default=12, help="problems per strategy")
        p.add_argument("--n", type=int, default=max(NS), help="samples per problem at most")
        p.add_argument("--seed", type=int, default=0, help="seed of the plan and of the samples")
        p.add_argument("--temperature", type=float, default=TEMPERATURE, help="sampling temperature (> 0)")
        p.add_argument("--cache", default=None, help="JSONL of teacher answers, reused by a rerun")
        p.add_argument("--exercise-set", default=None, metavar="JSONL",
                       help="an experiment's exercises.jsonl: its held-out exercises are never solution problems "
                            "(required by the solution strategy)")
        add_teacher_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.prompts < 1 or args.n < 1:
            raise UserError("--prompts and --n must be >= 1")
        if not args.temperature > 0:
            raise UserError("--temperature must be > 0 for best-of-n")
        if getattr(args, "max_minutes", None) is not None and not args.max_minutes > 0:
            raise UserError("--max-minutes must be > 0")
        wanted = args.strategies.split(",") if args.command == "yield" else [args.strategy]
        if "solution" in [w.strip() for w in wanted] and args.exercise_set is None:  # before the teacher loads
            problems_for("solution", 1, args.seed, None)  # raises the one-line refusal
        if args.command == "yield":
            out = run_yield(args)
            for s, t in out["strategies"].items():
                for row_raw, row_fix in zip(t["as_written"], t["repaired"]):
                    print(f"{s:12s} n={row_raw['n']}: {row_raw['prompts_verified']}/{row_raw['prompts']} prompts "
                          f"as written, {row_fix['prompts_verified']}/{row_fix['prompts']} repaired "
                          f"({row_fix['verified_per_generation']:.3f} per generation)")
            print(f"yield: {args.out} ({out['wall_s']} s)")
        else:
            kept = run_generate(args)
            print(f"best-of-{args.n}: {len(kept)} of {args.prompts} problems verified -> {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
