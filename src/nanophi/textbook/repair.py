"""Check a teacher's answer before it runs, and repair the near misses that change neither tests nor logic.

An exercise answer (`check_exercise`) is a function and its asserts; a solution-only answer (`check_solution`) is a
function for a fixed header and fixed tests. Repairs: code outside a fence or with prose around it, a tail cut off
by the token budget (whole trailing lines are dropped), a function defined under another name than the one its
asserts call (the def is renamed), a body written without its `def` line (put under the fixed header). Nothing
adds or edits an assert. Each repair is named in `Check.repairs`; `nanophi.textbook.bestofn` samples and runs them.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from nanophi.textbook.verify import code_blocks, parse_exercise

CODE_START = re.compile(r"^(def |async def |class |import |from |@)")
EXAMPLE_NAME = "count_evens"  # the worked example of the exercise templates


@dataclass
class Problem:
    """One prompt. Exercise mode: the teacher writes function + asserts. Solution mode: `header` (imports,
    signature, docstring) and `tests` are given, the teacher writes the function."""

    id: str
    strategy: str
    name: str
    prompt: str
    header: str | None = None
    tests: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    """What a candidate answer comes to before it runs: the program, or the reason there is none."""

    reason: str  # "ok" or why not
    solution: str = ""
    tests: str = ""
    problem: str = ""
    repairs: tuple[str, ...] = ()

    def program(self) -> str:
        return f"{self.solution}\n\n\n{self.tests}\n"


def _parses(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except (SyntaxError, ValueError):
        return None


def _trim_tail(src: str) -> tuple[str, bool]:
    """`src` without the fewest whole trailing lines that keep it from parsing (a token budget cuts mid-line)."""
    lines = src.rstrip().splitlines()
    for k in range(len(lines), 0, -1):
        if _parses("\n".join(lines[:k])) is not None:
            return "\n".join(lines[:k]), k < len(lines)
    return src, False


def _sources(text: str, repair: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(source, repairs) to try, best first. Without repair: the fenced blocks (or the bare answer) as they are."""
    blocks = code_blocks(text)
    out: list[tuple[str, tuple[str, ...]]] = [(b, ()) for b in (blocks or [text])]
    if not repair:
        return out
    if not blocks:  # code without a fence, maybe with prose before it: start at the first line of code
        lines = text.splitlines()
        first = next((i for i, ln in enumerate(lines) if CODE_START.match(ln)), None)
        if first:
            out.append(("\n".join(lines[first:]), ("prose_removed",)))
    trimmed = []
    for src, reps in out:
        if _parses(src) is None:
            cut, changed = _trim_tail(src)
            if changed:
                trimmed.append((cut, reps + ("trailing_lines_dropped",)))
    return out + trimmed


def _rename_def(src: str, tree: ast.Module, old: str, new: str) -> str:
    """`src` with function `old` renamed `new` inside its own definition only (its recursive calls too)."""
    fn = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == old)
    lines = src.splitlines()
    seg = "\n".join(lines[fn.lineno - 1:fn.end_lineno])
    seg = re.sub(rf"\b{re.escape(old)}\b", new, seg)
    return "\n".join(lines[:fn.lineno - 1] + [seg] + lines[fn.end_lineno:])


def _calls_of(tree: ast.Module) -> set[str]:
    """Names called in the module's top-level asserts: what the tests exercise."""
    return {n.func.id for s in tree.body if isinstance(s, ast.Assert) for n in ast.walk(s)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def check_exercise(text: str, name: str, repair: bool = True) -> Check:
    """A whole exercise answer (function + asserts) for the asked `name`, repaired when `repair`."""
    first_reason = None
    for src, reps in _sources(text, repair):
        tree = _parses(src)
        if tree is not None and repair:
            funcs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            called = _calls_of(tree)
            # The asserts call the asked name but the def has another: rename the def. When the asserts call the
            # def's own name instead, renaming would edit the tests, so the answer stays as it is (rejected).
            others = [f for f in funcs if f not in called and not f.startswith("test") and f != EXAMPLE_NAME]
            if name in called and name not in funcs and len(others) == 1:
                src = _rename_def(src, tree, others[0], name)
                reps = reps + (f"renamed_{others[0]}",)
        ex, reason = parse_exercise(f"```python\n{src}\n```", name)
        if ex is not None:
            return Check("ok", ex.solution, ex.tests, ex.problem, reps)
        first_reason = first_reason or reason
    return Check(first_reason or "syntax_error")


def _body_of(src: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The statements of `fn` after its docstring, dedented."""
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    if not body:
        return ""
    lines = src.splitlines()
    return textwrap.dedent("\n".join(lines[body[0].lineno - 1:body[-1].end_lineno]))


def check_solution(text: str, problem: Problem, repair: bool = True) -> Check:
    """A function for a fixed problem: the answer's body goes under the problem's own header (its signature and
    docstring, never the answer's), with the answer's other top-level defs and imports before it; the tests
    are the problem's, unchanged."""
    assert problem.header is not None and problem.tests is not None
    header, name = problem.header.rstrip(), problem.name
    indent = re.match(r"\s*", header.splitlines()[-1]).group(0) or "    "  # the docstring's indentation
    first_reason = None
    for src, reps in _sources(text, repair):
        tree = _parses(src)
        body, helpers = None, []
        if tree is not None:
            funcs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            target = next((f for f in funcs if f.name == name), None)
            if target is None and repair and len(funcs) == 1:
                target, reps = funcs[0], reps + (f"renamed_{funcs[0].name}",)
                src = _rename_def(src, tree, funcs[0].name, name)
                tree = ast.parse(src)
                target = tree.body[[i for i, n in enumerate(tree.body) if n.lineno == target.lineno][0]]
            if target is not None:
                body = _body_of(src, target)
                helpers = [ast.get_source_segment(src, n) or "" for n in tree.body
                           if n is not target and isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef,
                                                                 ast.AsyncFunctionDef, ast.ClassDef))]
        if body is None and repair and (tree is None or not any(
                isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)):
            # no `def` line: the answer is the body itself (`return` at top level still parses)
            body = textwrap.dedent(src).strip("\n")
            reps = reps + ("def_line_added",)
        if not body:
            first_reason = first_reason or ("no_function" if tree is not None else "syntax_error")
            continue
        solution = "\n\n\n".join([*helpers, header + "\n" + textwrap.indent(body, indent)]) + "\n"
        fn_tree = _parses(solution)
        if fn_tree is None:
            first_reason = first_reason or "syntax_error"
            continue
        return Check("ok", solution, problem.tests, header + "\n", reps)
    return Check(first_reason or "syntax_error")


def check(problem: Problem, text: str, repair: bool) -> Check:
    if problem.header is not None:
        return check_solution(text, problem, repair)
    return check_exercise(text, problem.name, repair)
