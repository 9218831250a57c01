"""A second source of verified docstring -> function exercises: the standard library's own doctests.

A 135M teacher writes few exercises that pass their own asserts (most of its answers do not even parse), too
few to fine-tune on or to hold out. The standard library holds real docstring -> function problems with tests
built in: top-level functions whose docstrings carry `>>>` examples. Each becomes an exercise the way HumanEval
is built: the prompt is the module's imports, the signature and the docstring (examples included), the
solution is the body, and the test runs the docstring's examples with `doctest` and fails unless every one
passes. Only those that pass in the sandbox as written are kept (many need module context they do not have).

Provenance says where each exercise came from, and the report counts the two sources apart.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from nanophi.textbook.experiment_data import Exercise, verify_exercises
from nanophi.textbook.records import record_id

log = logging.getLogger(__name__)

MAX_FUNCTION_CHARS = 4000  # longer bodies would not fit a tiny student's context anyway
SKIP_PARTS = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages")

DOCTEST_CHECK = '''
import doctest as _doctest
_test = _doctest.DocTestParser().get_doctest({name}.__doc__, dict(globals()), "{name}", None, 0)
_result = _doctest.DocTestRunner(verbose=False, optionflags=_doctest.ELLIPSIS).run(_test, out=lambda s: None)
assert _result.attempted and _result.failed == 0, f"{{_result.failed}} of {{_result.attempted}} examples failed"
'''


def _imports(tree: ast.Module, source: str) -> str:
    lines = source.splitlines(keepends=True)
    return "".join("".join(lines[n.lineno - 1:n.end_lineno]) for n in tree.body
                   if isinstance(n, (ast.Import, ast.ImportFrom)) and not (
                       isinstance(n, ast.ImportFrom) and (n.level or n.module == "__future__")))


def doctest_exercises(root: Path | None = None) -> list[Exercise]:
    """Exercises from the top-level functions with doctest examples under `root` (default: the stdlib)."""
    from nanophi.textbook.pool import iter_py_files, stdlib_dir

    root = Path(root) if root is not None else stdlib_dir()
    found: list[Exercise] = []
    for path in iter_py_files(root):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in SKIP_PARTS):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            if ">>>" not in source:
                continue
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        imports = None
        lines = source.splitlines(keepends=True)
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or len(fn.body) < 2:
                continue
            doc = ast.get_docstring(fn)
            if not doc or ">>>" not in doc:
                continue
            text = "".join(lines[fn.lineno - 1:fn.end_lineno])
            if len(text) > MAX_FUNCTION_CHARS:
                continue
            if imports is None:
                imports = _imports(tree, source)
            header = "".join(lines[fn.lineno - 1:fn.body[0].end_lineno])
            solution = "".join(lines[fn.body[0].end_lineno:fn.end_lineno])
            prompt = (imports + "\n\n" if imports else "") + header
            found.append(Exercise(record_id(f"stdlib:{rel}:{fn.name}"), fn.name, prompt, solution,
                                  DOCTEST_CHECK.format(name=fn.name).lstrip(), source="stdlib-doctest"))
    return found


def verified_doctest_exercises(root: Path | None = None) -> tuple[list[Exercise], dict[str, int]]:
    """The doctest exercises whose own examples pass in the sandbox, and the counts."""
    candidates = doctest_exercises(root)
    kept = [e for e, ok in zip(candidates, verify_exercises(candidates)) if ok]
    log.info("stdlib doctests: %d of %d candidate exercises pass their own examples", len(kept), len(candidates))
    return kept, {"candidates": len(candidates), "verified": len(kept)}
