"""Clear the outputs of notebooks in place, so they are committed without them (tests/test_notebooks.py checks).

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb
    python scripts/strip_notebooks.py path/to/x.ipynb

Outputs, execution counts and widget state go; cells, their ids and the notebook's metadata (kernel, Colab) stay.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def strip(path: Path) -> bool:
    """Clear `path`'s outputs; True when the file changed."""
    before = path.read_text(encoding="utf-8")
    nb = json.loads(before)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    nb["metadata"].pop("widgets", None)
    after = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(f"{p}: {'stripped' if strip(p) else 'already clean'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
