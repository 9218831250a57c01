"""Verified docstring -> function exercises mined from real code, and the one exercise set the experiment uses.

A 135M teacher writes few exercises that pass their own asserts (most of its answers do not even parse), too
few to fine-tune on or to hold out. Installed Python code holds real docstring -> function problems with tests
built in: top-level functions whose docstrings carry `>>>` examples. Each becomes an exercise the way HumanEval
is built: the prompt is the module's imports, the signature and the docstring (examples included), the
solution is the body, and the test runs the docstring's examples with `doctest` and fails unless every one
passes. Only those that pass in the sandbox as written are kept (many need module context they do not have).

Sources, each exercise's `source` field:
    stdlib-doctest      CPython's standard library (tests, GUI and packaging tools skipped)
    doctest:<package>   the packages `make install` puts in site-packages (more_itertools, setuptools, torch,
                        networkx, fontTools, ...), with the module-level helpers a function calls. The sandbox runs the system interpreter without site-packages,
                        so only functions whose imports are all standard library can pass; a static check of
                        the names a function reads skips the rest before a sandbox is spent on them.
    teacher             verified exercises a teacher wrote (`generate.py`'s best-of-n and solution-only paths),
                        passed in by the caller

    train, heldout, counts = exercise_set("runs/exercises.jsonl")   # built once, then read from the cache

The set is decontaminated against HumanEval with `nanophi.textbook.decontaminate.Detector` (13-gram overlap or
AST match rate >= tau), deduplicated by function name and by solution, and split by a hash of each exercise's id,
so the split never depends on which other exercises exist or on the order they were found in.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import hashlib
import logging
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nanophi.textbook.experiment.data import Exercise, verify_exercises
from nanophi.textbook.records import read_jsonl, record_id, write_jsonl_atomic

log = logging.getLogger(__name__)

MAX_FUNCTION_CHARS = 4000  # longer bodies would not fit a tiny student's context anyway
SKIP_PARTS = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages")
STDLIB_SOURCE = "stdlib-doctest"
# Package folders of site-packages that hold no exercises worth a sandbox (vendored copies are deduplicated later).
SKIP_PACKAGES = frozenset({"__pycache__", "_distutils_hack", "nanophi"})
PACKAGE_SKIP_PARTS = ("tests/", "test_", "conftest", "/testing/")
HELDOUT = 100  # the held-out problems: one of them moves pass@1 by a point
SPLIT_SEED = 0
DECONTAMINATION_TAU = 0.9  # the pipeline's default (decontaminate.TAU)
CACHE_VERSION = "exercises-v2"  # part of the cache: a changed miner rebuilds it
STDLIB_NAMES = frozenset(sys.stdlib_module_names) | {"__future__"}
BUILTIN_NAMES = frozenset(dir(builtins)) | {"__doc__", "__name__", "__file__"}

DOCTEST_CHECK = '''
import doctest as _doctest
_test = _doctest.DocTestParser().get_doctest({name}.__doc__, dict(globals()), "{name}", None, 0)
_result = _doctest.DocTestRunner(verbose=False, optionflags=_doctest.ELLIPSIS).run(_test, out=lambda s: None)
assert _result.attempted and _result.failed == 0, f"{{_result.failed}} of {{_result.attempted}} examples failed"
'''


def _imports(tree: ast.Module, source: str, stdlib_only: bool = False) -> str:
    """The module's top-level absolute imports (relative ones cannot resolve outside their package); with
    `stdlib_only`, only those of standard-library modules (what the sandbox's interpreter has)."""
    lines = source.splitlines(keepends=True)

    def keep(n: ast.stmt) -> bool:
        if isinstance(n, ast.ImportFrom):
            if n.level or n.module == "__future__":
                return False
            return not stdlib_only or (n.module or "").split(".")[0] in STDLIB_NAMES
        if isinstance(n, ast.Import):
            return not stdlib_only or all(a.name.split(".")[0] in STDLIB_NAMES for a in n.names)
        return False

    return "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body if keep(n))


def _imported_names(imports: str) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(imports).body:
        for alias in getattr(node, "names", []):
            names.add(alias.asname or alias.name.split(".")[0])
    return names


def _free_names(node: ast.AST) -> set[str]:
    """Names a definition reads that it never binds: what must come from its module. An over-approximation of
    what is bound (any assignment anywhere inside counts), which is all a pre-filter needs."""
    bound: set[str] = set()
    loaded: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (loaded if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound.update(a.asname or a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return loaded - bound


def _top_level_bindings(tree: ast.Module) -> dict[str, ast.stmt]:
    """{name: the top-level def, class or simple assignment that binds it} (the last one wins, as at run time)."""
    out: dict[str, ast.stmt] = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[n.name] = n
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            for t in targets:
                for name in ast.walk(t):
                    if isinstance(name, ast.Name):
                        out[name.id] = n
    return out


def _helpers(fn: ast.FunctionDef, bindings: dict[str, ast.stmt], known: set[str]) -> list[ast.stmt] | None:
    """The module-level definitions `fn` needs, transitively (in source order), or None when some name it reads
    is neither a builtin, nor in `known` (the kept imports), nor defined at the module's top level."""
    needed: dict[int, ast.stmt] = {}
    todo = list(_free_names(fn) - BUILTIN_NAMES - known - {fn.name})
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = bindings.get(name)
        if node is None:
            return None
        if node is not fn and id(node) not in needed:
            needed[id(node)] = node
            todo += list(_free_names(node) - BUILTIN_NAMES - known - {fn.name})
    return sorted(needed.values(), key=lambda n: n.lineno)


def _example_imports(doc: str) -> set[str] | None:
    """Top-level modules the docstring's `>>>` examples import; None when doctest cannot parse them."""
    import doctest

    mods: set[str] = set()
    try:
        examples = doctest.DocTestParser().get_examples(doc)
    except ValueError:  # inconsistent indentation: doctest would refuse it in the sandbox too
        return None
    for ex in examples:
        try:
            tree = ast.parse(ex.source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def doctest_exercises(root: Path | None = None, source: str = STDLIB_SOURCE, *, stdlib_only: bool = False,
                      skip_parts: Sequence[str] = SKIP_PARTS, counts: Counter[str] | None = None
                      ) -> list[Exercise]:
    """Exercises from the top-level functions with doctest examples under `root` (default: the stdlib).

    With `stdlib_only` (third-party code), a function is skipped unless every name it reads is a builtin, a
    stdlib import of its module or its own; `counts` receives how many each check removed."""
    from nanophi.textbook.pool import iter_py_files, stdlib_dir

    counts = Counter() if counts is None else counts
    root = Path(root) if root is not None else stdlib_dir()
    found: list[Exercise] = []
    files = sorted(root.rglob("*.py")) if stdlib_only else iter_py_files(root)  # iter_py_files skips site-packages
    for path in files:
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in skip_parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            if ">>>" not in text:
                continue
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue
        imports: str | None = None
        bindings: dict[str, ast.stmt] | None = None
        lines = text.splitlines(keepends=True)
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or len(fn.body) < 2:
                continue
            doc = ast.get_docstring(fn)
            if not doc or ">>>" not in doc:
                continue
            counts["with_examples"] += 1
            code = "".join(lines[fn.lineno - 1:fn.end_lineno])
            if len(code) > MAX_FUNCTION_CHARS:
                counts["too_long"] += 1
                continue
            if imports is None:
                imports = _imports(tree, text, stdlib_only)
            helpers: list[ast.stmt] = []
            if stdlib_only:
                if bindings is None:
                    bindings = _top_level_bindings(tree)
                found_helpers = _helpers(fn, bindings, _imported_names(imports))
                if found_helpers is None:
                    counts["needs_module_context"] += 1
                    continue
                helpers = found_helpers
            if stdlib_only:
                modules = _example_imports(doc)
                if modules is None or modules - STDLIB_NAMES:
                    counts["examples_unusable" if modules is None else "examples_import_packages"] += 1
                    continue
            header = "".join(lines[fn.lineno - 1:fn.body[0].end_lineno])
            solution = "".join(lines[fn.body[0].end_lineno:fn.end_lineno])
            # Helpers the function calls come before it, as HumanEval's prompts sometimes carry them.
            context = "".join("".join(lines[(h.decorator_list[0].lineno if getattr(h, "decorator_list", None)
                                             else h.lineno) - 1:h.end_lineno]) + "\n\n" for h in helpers)
            if len(context) + len(code) > MAX_FUNCTION_CHARS:
                counts["too_long"] += 1
                continue
            if helpers:
                counts["with_helpers"] += 1
            prompt = (imports + "\n\n" if imports else "") + context + header
            key = f"stdlib:{rel}:{fn.name}" if source == STDLIB_SOURCE else f"{source}:{rel}:{fn.name}"
            found.append(Exercise(record_id(key), fn.name, prompt, solution,
                                  DOCTEST_CHECK.format(name=fn.name).lstrip(), source=source))
    return found


def verified_doctest_exercises(root: Path | None = None) -> tuple[list[Exercise], dict[str, int]]:
    """The doctest exercises whose own examples pass in the sandbox, and the counts."""
    candidates = doctest_exercises(root)
    kept = [e for e, ok in zip(candidates, verify_exercises(candidates)) if ok]
    log.info("stdlib doctests: %d of %d candidate exercises pass their own examples", len(kept), len(candidates))
    return kept, {"candidates": len(candidates), "verified": len(kept)}


def package_roots(names: Iterable[str] | None = None) -> dict[str, Path]:
    """{package: its folder} in this environment's site-packages: `names`, or every installed package folder
    (what `make install` put there: torch brings sympy, networkx, jinja2, setuptools; lm-eval more_itertools)."""
    site = Path(sysconfig.get_paths()["purelib"])
    if names is None:
        names = sorted(p.name for p in site.iterdir() if p.is_dir() and "." not in p.name
                       and p.name not in SKIP_PACKAGES)
    return {n: site / n for n in names if (site / n).is_dir()}


def mined_exercises(packages: Iterable[str] | None = None, include_stdlib: bool = True
                    ) -> tuple[list[Exercise], dict[str, dict[str, int]]]:
    """Verified doctest exercises from the stdlib and the installed packages (all of them by default); per-source
    counts of each step."""
    sources: list[tuple[str, Path | None, bool]] = [(STDLIB_SOURCE, None, False)] if include_stdlib else []
    sources += [(f"doctest:{n}", p, True) for n, p in package_roots(packages).items()]
    candidates: list[Exercise] = []
    counts: dict[str, dict[str, int]] = {}
    for source, root, stdlib_only in sources:
        c: Counter[str] = Counter()
        found = doctest_exercises(root, source, stdlib_only=stdlib_only, counts=c,
                                  skip_parts=PACKAGE_SKIP_PARTS if stdlib_only else SKIP_PARTS)
        if found:
            counts[source] = {**c, "candidates": len(found)}
        candidates += found
    ok = verify_exercises(candidates)  # one pool for all sources: the sandboxes stay busy
    kept = [e for e, good in zip(candidates, ok) if good]
    for e in kept:
        counts[e.source]["verified"] = counts[e.source].get("verified", 0) + 1
    log.info("exercises: %d of %d mined candidates verified", len(kept), len(candidates))
    return kept, counts


def _normalised(code: str) -> str:
    return " ".join(code.split())


def decontaminate_exercises(exercises: Sequence[Exercise], tau: float = DECONTAMINATION_TAU
                            ) -> tuple[list[Exercise], dict[str, int]]:
    """Drop exercises whose program overlaps HumanEval (13-gram hit, or an AST match rate >= tau), then the
    duplicates: a second exercise with the same function name or the same solution as an earlier one."""
    from nanophi.textbook.decontaminate import Detector

    detector = Detector()
    clean, names, solutions = [], set(), set()
    counts = Counter()
    for ex in sorted(exercises, key=lambda e: (e.source != STDLIB_SOURCE, e.id)):  # a fixed order: the stdlib first
        hit = detector.check({"text": ex.program(), "code": ex.prompt + ex.solution}, tau)
        if hit is not None:
            counts[f"humaneval_{hit.detector}"] += 1
            log.info("exercises: %s (%s) matches %s by %s", ex.name, ex.source, hit.task_id, hit.detector)
            continue
        sol = _normalised(ex.solution)
        if ex.name in names or sol in solutions:
            counts["duplicate"] += 1
            continue
        names.add(ex.name)
        solutions.add(sol)
        clean.append(ex)
    counts["kept"] = len(clean)
    return clean, dict(counts)


def split(exercises: Sequence[Exercise], heldout: int = HELDOUT, seed: int = SPLIT_SEED
          ) -> tuple[list[Exercise], list[Exercise]]:
    """(train, heldout): the `heldout` exercises whose hash of (seed, id) is smallest are held out."""
    if len(exercises) <= heldout:
        raise ValueError(f"{len(exercises)} exercises cannot hold out {heldout} and still train on any")
    order = sorted(exercises, key=lambda e: hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest())
    return order[heldout:], order[:heldout]


def exercise_set(cache: str | Path, *, heldout: int = HELDOUT, seed: int = SPLIT_SEED,
                 extra: Sequence[Exercise] = (), packages: Iterable[str] | None = None
                 ) -> tuple[list[Exercise], list[Exercise], dict[str, Any]]:
    """(train, heldout, counts): every verified, decontaminated exercise, split deterministically.

    Built once into `cache` (JSONL, one exercise per line with its split; counts in the first line) and read
    from it afterwards: the sandbox's verdicts on a busy machine are not perfectly repeatable (an example near
    the time limit), and a resumed experiment must train and test on exactly the same exercises. `extra` are
    verified exercises from elsewhere (the teacher's), decontaminated with the rest; a different `extra`,
    `heldout` or `seed` than the cache was built with rebuilds it."""
    cache = Path(cache)
    key = {"version": CACHE_VERSION, "heldout": heldout, "seed": seed, "extra": sorted(e.id for e in extra)}
    if cache.is_file():
        rows = list(read_jsonl(cache))
        if rows and rows[0].get("key") == key:
            fields = {f.name for f in dataclasses.fields(Exercise)}
            exs = [(r["split"], Exercise(**{k: v for k, v in r.items() if k in fields})) for r in rows[1:]]
            return ([e for s, e in exs if s == "train"], [e for s, e in exs if s == "heldout"], rows[0]["counts"])
        log.info("exercises: %s was built with other settings; rebuilding", cache)
    mined, per_source = mined_exercises(packages)
    clean, decon = decontaminate_exercises(mined + list(extra))
    train, held = split(clean, heldout, seed)
    counts: dict[str, Any] = {
        "sources": per_source, "extra": len(extra), "decontamination": decon,
        "train": len(train), "heldout": len(held),
        "train_by_source": dict(Counter(e.source for e in train)),
        "heldout_by_source": dict(Counter(e.source for e in held))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(cache, [{"key": key, "counts": counts}]
                       + [{**dataclasses.asdict(e), "split": s} for s, part in (("train", train), ("heldout", held))
                          for e in part])
    return train, held, counts
