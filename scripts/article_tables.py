"""Tables of docs/article.md that are drawn from a results file, regenerated rather than copied by hand.

    python scripts/article_tables.py           # rewrite the tables in docs/article.md from their files
    python scripts/article_tables.py --check   # exit 1 when a table differs from what its file gives

A generated table sits between `<!-- begin: NAME -->` and `<!-- end: NAME -->`, and every number in it carries the
`<!-- = FILE: PATH -->` marker tests/test_article.py checks, so a results file that changes (notebook 01 rerun)
fails the tests until this script is run again, instead of drifting.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARTICLE = ROOT / "docs" / "article.md"
NOTEBOOK01 = "docs/notebook01_results.json"


def notebook01_table(results: dict[str, Any], file: str = NOTEBOOK01) -> str:
    """Notebook 01's validation loss after each stage it builds, with parameters and train loss."""

    def cite(value: float, path: str, fmt: str) -> str:
        return f"{value:{fmt}}<!-- = {file}: {path} -->"

    lines = ["| stage | parameters | train loss | val loss |", "|---|---|---|---|"]
    for i, step in enumerate(results["steps"]):
        lines.append(f"| {step['name']} | {cite(step['params'], f'steps/{i}/params', ',')} | "
                     f"{cite(step['train_loss'], f'steps/{i}/train_loss', '.4f')} | "
                     f"{cite(step['val_loss'], f'steps/{i}/val_loss', '.4f')} |")
    return "\n".join(lines)


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {"notebook01-table": (NOTEBOOK01, notebook01_table)}


def block(name: str, doc: str) -> re.Match[str] | None:
    """The generated lines between NAME's markers (group 1; empty when nothing was generated yet)."""
    return re.search(rf"<!-- begin: {re.escape(name)} -->\n(.*?)\n?<!-- end: {re.escape(name)} -->", doc, re.S)


def expected(name: str) -> str:
    file, make = TABLES[name]
    return make(json.loads((ROOT / file).read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    doc = ARTICLE.read_text(encoding="utf-8")
    stale = []
    for name in TABLES:
        m = block(name, doc)
        if m is None:
            print(f"article_tables: error: {ARTICLE.name} has no <!-- begin: {name} --> ... <!-- end: {name} --> "
                  "block; add the two markers where the table goes", file=sys.stderr)
            return 2
        want = expected(name)
        if m.group(1) != want:
            stale.append(name)
            doc = doc[:m.start()] + f"<!-- begin: {name} -->\n{want}\n<!-- end: {name} -->" + doc[m.end():]
    if args.check:
        for name in stale:
            print(f"{ARTICLE.name}: table {name} is stale; run python scripts/article_tables.py")
        return 1 if stale else 0
    ARTICLE.write_text(doc, encoding="utf-8")
    print(f"{ARTICLE.relative_to(ROOT)}: {len(stale)} table(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
