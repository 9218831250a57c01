"""The README is part of the interface: its file map and its two commands must match the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _layout_block() -> str:
    m = re.search(r"## What is where\n\n```\n(.*?)```", README, re.S)
    assert m, "README lost its 'What is where' file map"
    return m.group(1)


def test_every_module_is_in_the_file_map() -> None:
    block = _layout_block()
    listed = set(re.findall(r"^  (\S+\.py)\s", block, re.M))  # the indented lines under src/nanophi/
    src = ROOT / "src" / "nanophi"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py")}
    # A package's line and its indented continuation lines (`  serve/   __init__ (...), app (...), ...`) name its modules.
    named = {package + word + ".py" for package, text in re.findall(r"^  (\S+/)\s+(.*(?:\n {4,}\S.*)*)", block, re.M)
             for word in re.findall(r"\w+", text)}
    missing = sorted(modules - listed - named)
    stale = sorted(listed - modules)
    assert not missing, f"modules missing from the README file map: {missing}"
    assert not stale, f"README file map lists modules that do not exist: {stale}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test " in README and "make demo " in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\s*$", ci, re.M), ".ci/run must run the README's test command"


def test_linked_docs_exist() -> None:
    for target in re.findall(r"\]\(((?:docs|notebooks)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
