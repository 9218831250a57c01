"""docs/article.md and the slides cannot drift from the code: every marked excerpt is checked against its file.

A code excerpt is a ```python block right after `<!-- source: PATH -->`; it must appear in PATH verbatim, as
consecutive lines, up to a common indentation (a method may be shown dedented out of its class). Every ```python
block in the article carries a marker: `source:` for excerpts, `example` for usage that is not copied from a file.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ROOT / "docs" / "article.md"
SLIDES = sorted((ROOT / "docs" / "slides").glob("*.md"))
# a marker comment, blank lines, then a fenced block; the marker says where the block comes from
BLOCK = re.compile(
    r"(?:<!--\s*(source:\s*(?P<path>\S+)|example)\s*-->\s*\n(?:\s*\n)*)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
MIN_WORDS = 3000


def excerpts(doc: Path) -> list[tuple[str | None, str, str, int]]:
    """(source path or None, language, code, line number) of every fenced block in `doc`."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in BLOCK.finditer(text):
        marker = m.group(1)
        path = m.group("path") if marker and marker.startswith("source") else ("" if marker else None)
        out.append((path, m.group("lang"), m.group("code"), text.count("\n", 0, m.start("code")) + 1))
    return out


def appears_in(code: str, source: str) -> bool:
    """True when `code`'s lines are consecutive lines of `source`, up to one common indentation."""
    if code in source:
        return True
    want = textwrap.dedent(code).rstrip("\n").splitlines()
    lines = source.splitlines()
    for i in range(len(lines) - len(want) + 1):
        if lines[i].strip() == want[0].strip():
            window = "\n".join(lines[i : i + len(want)])
            if textwrap.dedent(window).splitlines() == want:
                return True
    return False


def test_article_is_long_form() -> None:
    text = ARTICLE.read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    assert len(prose.split()) >= MIN_WORDS, f"the article has {len(prose.split())} words of prose, want {MIN_WORDS}"


def test_every_python_block_in_the_article_is_marked() -> None:
    unmarked = [line for path, lang, _, line in excerpts(ARTICLE) if lang == "python" and path is None]
    assert not unmarked, (f"python blocks at lines {unmarked} of {ARTICLE.name} need <!-- source: PATH --> "
                          "(an excerpt) or <!-- example --> (usage)")


@pytest.mark.parametrize("doc", [ARTICLE, *SLIDES], ids=lambda p: p.name)
def test_excerpts_match_the_source(doc: Path) -> None:
    checked = 0
    for path, _, code, line in excerpts(doc):
        if not path:
            continue
        source = ROOT / path
        assert source.is_file(), f"{doc.name}:{line} cites {path}, which does not exist"
        assert appears_in(code, source.read_text(encoding="utf-8")), (
            f"{doc.name}:{line}: the excerpt is not in {path} any more; copy it again from the file:\n{code}")
        checked += 1
    if doc == ARTICLE:
        assert checked >= 10, f"only {checked} checked excerpts in the article"


@pytest.mark.parametrize("doc", [ARTICLE, *SLIDES], ids=lambda p: p.name)
def test_images_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for src in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text):
        assert not re.match(r"^[a-z]+://", src), f"{doc.name} links a remote image {src}: keep figures in docs/img"
        assert (doc.parent / src).is_file(), f"{doc.name} shows {src}, which does not exist"


def test_the_checker_catches_drift() -> None:
    source = "class A:\n    def f(self):\n        return 1\n"
    assert appears_in("def f(self):\n    return 1\n", source)
    assert not appears_in("def f(self):\n    return 2\n", source)
    assert not appears_in("def f(self):\nreturn 1\n", source)
