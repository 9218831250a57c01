"""docs/article.md and the slides cannot drift from the code or from the results they quote.

Code: an excerpt is a ```python block right after `<!-- source: PATH -->`; it must appear in PATH verbatim, as
consecutive lines, up to a common indentation (a method may be shown dedented out of its class). Every ```python
block in the article carries a marker: `source:` for excerpts, `example` for usage that is not copied from a file.

Numbers: a number followed by `<!-- = FILE: EXPR -->` is checked against a results file (path from the repository
root). EXPR is a JSON path with `/` between keys (`arms/A/mean/code_bpb`, list items by index), or arithmetic
(+ - * / **, `log`) over paths in braces: `{a/b} * 100`, `{arms/B/mean/x} - {arms/A/mean/x}`. The number as written
sets the rounding: `1.388` must equal the value to 3 decimals (half a unit in its last place); `2.6M`, `31K`,
`4,915,200` and a leading `−` or `~` are understood. For a Markdown file (`<!-- = docs/experiments.md -->`, no
EXPR) the number must appear in it as written. A results file not committed yet is skipped, by name, not failed.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ROOT / "docs" / "article.md"
SLIDES = sorted((ROOT / "docs" / "slides").glob("*.md"))
# a marker comment, blank lines, then a fenced block; the marker says where the block comes from
BLOCK = re.compile(
    r"(?:<!--\s*(source:\s*(?P<path>\S+)|example)\s*-->\s*\n(?:\s*\n)*)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
MIN_WORDS = 3000
# the last number before a `<!-- = FILE[: EXPR] -->` marker, with an optional K/M/B suffix and a unit in between
CLAIM = re.compile(
    r"(?P<sign>[-−])?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e-?\d+)?)(?P<suffix>[KMB])?"
    r"(?:[^\d<]{0,12}?)<!--\s*=\s*(?P<file>[^\s:]+)\s*(?::\s*(?P<expr>.*?))?\s*-->", re.S)
SUFFIX = {None: 1.0, "K": 1e3, "M": 1e6, "B": 1e9}
OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow}
FUNCS: dict[str, Callable[[float], float]] = {"log": math.log}


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


def claims(doc: Path) -> list[dict]:
    """Every `number<!-- = FILE: EXPR -->` claim of `doc`: the number as written, its file, expression and line."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in CLAIM.finditer(text):
        written = m.group("num").replace(",", "")
        mantissa, _, exponent = written.partition("e")
        decimals = (len(mantissa.split(".")[1]) if "." in mantissa else 0) - int(exponent or 0)
        scale = SUFFIX[m.group("suffix")]
        out.append({"text": m.group(0).split("<!--")[0].strip(), "value": float(written) * scale
                    * (-1 if m.group("sign") else 1), "half_ulp": 0.5 * 10 ** -decimals * scale,
                    "literal": m.group("num"), "file": m.group("file"), "expr": m.group("expr"),
                    "line": text.count("\n", 0, m.start()) + 1})
    return out


def json_path(data: object, path: str) -> float:
    """The number at `path` ("a/b/0/c") in parsed JSON; a clear error when a key is missing."""
    node = data
    for key in path.strip().split("/"):
        if isinstance(node, list):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise KeyError(f"no key {key!r} on the way to {path!r}")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise TypeError(f"{path!r} is {node!r}, not a number")
    return float(node)


def evaluate(expr: str, data: object) -> float:
    """EXPR of a claim: one JSON path, or + - * / ** and log() over `{path}` references and numbers."""
    if "{" not in expr:
        return json_path(data, expr)
    refs: list[str] = []
    code = re.sub(r"\{([^}]+)\}", lambda m: f"_{refs.append(m.group(1)) or len(refs) - 1}", expr)

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return json_path(data, refs[int(node.id[1:])])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCS:
            return FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"not allowed in a claim's expression: {ast.dump(node)}")

    return ev(ast.parse(code, mode="eval"))


def check_claims(doc: Path, results_file: str) -> int:
    """Assert every claim of `doc` that cites `results_file`; returns how many were checked."""
    path = ROOT / results_file
    checked = 0
    for c in (c for c in claims(doc) if c["file"] == results_file):
        where = f"{doc.name}:{c['line']} ({c['text']!r}, from {results_file})"
        if path.suffix == ".json":
            assert c["expr"], f"{where}: a JSON results file needs an expression after the colon"
            actual = evaluate(c["expr"], json.loads(path.read_text(encoding="utf-8")))
            assert abs(actual - c["value"]) <= c["half_ulp"] * (1 + 1e-9), (
                f"{where}: the file says {actual!r} ({c['expr']}), the text says {c['value']:g}; copy the number "
                "again from the file")
        else:
            body = path.read_text(encoding="utf-8")
            assert re.search(rf"(?<![\d.]){re.escape(c['literal'])}(?![\d]|\.\d)", body), (
                f"{where}: {c['literal']} does not appear in {results_file}")
        checked += 1
    return checked


def cited_files(docs: list[Path]) -> list[str]:
    return sorted({c["file"] for d in docs for c in claims(d)})


def check_doc_claims(doc: Path, results_file: str) -> None:
    """The test body shared with tests/test_slides.py: skip a results file that is not committed yet."""
    if not (ROOT / results_file).is_file():
        pytest.skip(f"{results_file} is not committed yet (another issue-15 task produces it)")
    if not any(c["file"] == results_file for c in claims(doc)):
        pytest.skip(f"{doc.name} cites nothing from {results_file}")
    assert check_claims(doc, results_file) > 0


@pytest.mark.parametrize("results_file", cited_files([ARTICLE]))
def test_article_numbers_match_their_results_file(results_file: str) -> None:
    check_doc_claims(ARTICLE, results_file)


def test_the_article_cites_its_numbers() -> None:
    found = claims(ARTICLE)
    assert len(found) >= 60, f"only {len(found)} numbers in the article are checked against results files"
    for c in found:
        assert (ROOT / c["file"]).suffix in (".json", ".md"), f"article:{c['line']} cites {c['file']}"


def test_the_number_checker_catches_drift(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("a 1.388<!-- = R.json: a/b --> b 2.6M<!-- = R.json: n --> params, "
                   "c 50 %<!-- = R.json: {p} * 100 --> d −0.11<!-- = R.json: {a/b} - {q} --> "
                   "e 4,915,200<!-- = R.json: big --> tokens f 3.3e-6<!-- = R.json: tiny -->\n", encoding="utf-8")
    data = {"a": {"b": 1.38792}, "n": 2566272, "p": 0.4959, "q": 1.5, "big": 4915200, "tiny": 3.34e-6}
    found = claims(doc)
    assert [c["value"] for c in found] == [1.388, 2.6e6, 50.0, -0.11, 4915200.0, 3.3e-6]
    for c in found:
        assert abs(evaluate(c["expr"], data) - c["value"]) <= c["half_ulp"] * (1 + 1e-9), c
    assert abs(evaluate("a/b", {"a": {"b": 1.3895}}) - 1.388) > 0.0005  # 1.390 when rounded: caught
    with pytest.raises(KeyError):
        evaluate("a/c", data)
    with pytest.raises(ValueError):
        evaluate("{a/b} + __import__('os')", data)


SAMPLE = re.compile(r"<!--\s*sample:\s*(?P<file>\S+)\s*-->\s*\n```text\n(?P<body>.*?)```", re.S)
# a field is a key of the row, or a path into it (`after/completion` in artifacts/teacher/samples.jsonl)
SAMPLE_LINE = re.compile(r"^(?P<field>[a-z_]+(?:/[a-z_]+)*):\s*(?P<text>.*)$")


def _squash(text: str) -> str:
    return " ".join(text.split())


def samples_shown(doc: Path) -> list[tuple[str, dict[str, str], int]]:
    """(samples file, {field: text}, line) of every `<!-- sample: FILE.jsonl -->` text block in `doc`.

    A block's lines are `FIELD: ...` (`prompt:`, `model:`, `book:`, or a path such as `after/completion:`), indented
    lines continue the one above, and an ellipsis at either end marks a cut.
    """
    text = doc.read_text(encoding="utf-8")
    out = []
    for m in SAMPLE.finditer(text):
        fields: dict[str, str] = {}
        field = None
        for line in m.group("body").splitlines():
            lm = SAMPLE_LINE.match(line)
            if lm:
                field = lm.group("field")
            elif field is None or not line[:1].isspace():
                continue  # not part of a sample
            piece = lm.group("text") if lm else line
            fields[field] = (fields.get(field, "") + " " + piece.strip()).strip()
        out.append((m.group("file"), fields, text.count("\n", 0, m.start()) + 1))
    return out


def _row_field(row: dict, path: str) -> str:
    node: object = row
    for key in path.split("/"):
        node = node.get(key, "") if isinstance(node, dict) else ""
    return str(node)


def check_samples(doc: Path) -> int:
    """Every shown sample is one row of its samples file: each field a piece of that row's field."""
    checked = 0
    for file, fields, line in samples_shown(doc):
        path = ROOT / file
        if not path.is_file():
            pytest.skip(f"{file} is not committed yet (another issue-15 task produces it)")
        rows = [json.loads(r) for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
        assert fields, f"{doc.name}:{line}: a sample block needs prompt:/model:/book: lines"
        wanted = {k: _squash(v.strip("…")) for k, v in fields.items()}
        assert any(all(w in _squash(_row_field(row, k)) for k, w in wanted.items()) for row in rows), (
            f"{doc.name}:{line}: the sample is not a row of {file} (copy it again from the file): {fields}")
        checked += 1
    return checked


def test_article_samples_are_the_models_own() -> None:
    assert samples_shown(ARTICLE), "the article shows no generated text (<!-- sample: FILE.jsonl --> blocks)"
    assert check_samples(ARTICLE) > 0


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


def test_the_sample_checker_catches_drift(tmp_path: Path) -> None:
    rows = tmp_path / "samples.jsonl"
    rows.write_text(json.dumps({"prompt": "It is a truth\nuniversally", "model": " acknowledged, that a man",
                                "book": " acknowledged"}) + "\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    block = "prompt: …a truth universally\nmodel:  acknowledged,\n        that a man…\n"
    doc.write_text(f"<!-- sample: {rows} -->\n```text\n{block}```\n", encoding="utf-8")
    assert samples_shown(doc)[0][1] == {"prompt": "…a truth universally", "model": "acknowledged, that a man…"}
    assert check_samples(doc) == 1
    doc.write_text(f"<!-- sample: {rows} -->\n```text\n{block.replace('man', 'woman')}```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="not a row"):
        check_samples(doc)
    rows.write_text(json.dumps({"prompt": "def f():", "after": {"completion": "    return 1", "passed": True}}) + "\n")
    doc.write_text(f"<!-- sample: {rows} -->\n```text\nprompt: def f():\nafter/completion: return 1\n```\n")
    assert check_samples(doc) == 1
    doc.write_text(f"<!-- sample: {rows} -->\n```text\nprompt: def f():\nbefore/completion: return 1\n```\n")
    with pytest.raises(AssertionError, match="not a row"):
        check_samples(doc)


def test_generated_tables_match_their_results_files() -> None:
    """A table drawn from a results file (scripts/article_tables.py) is the one the file gives today."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("article_tables", ROOT / "scripts" / "article_tables.py")
    assert spec and spec.loader
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    text = ARTICLE.read_text(encoding="utf-8")
    for name in tables.TABLES:
        m = tables.block(name, text)
        assert m, f"{ARTICLE.name} has no <!-- begin: {name} --> block"
        assert m.group(1) == tables.expected(name), f"table {name} is stale: run python scripts/article_tables.py"


def test_sample_blocks_carry_their_fields() -> None:
    """Every shown sample names at least two fields, each with text: a block cut short (a stray ``` inside it)
    would otherwise check nothing."""
    for file, fields, line in samples_shown(ARTICLE):
        assert len(fields) >= 2 and all(v.strip("… ") for v in fields.values()), f"article:{line}: {fields}"
