"""The scripts behind `make slides` and `make artifacts`, and the notebook stripper."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slides_build_into_offline_html(tmp_path: Path) -> None:
    pytest.importorskip("markdown_it")
    slides = load("build_slides")
    assert slides.main(["--out", str(tmp_path)]) == 0
    for name in ("part1", "part2"):
        page = (tmp_path / f"{name}.html").read_text(encoding="utf-8")
        assert page.count('<section class="slide') >= 8
        assert "data:image/png;base64," in page, "figures are embedded"
        # nothing is loaded from the network: no remote src, no stylesheet or script links, no remote url()
        assert not re.search(r"""src=["'](?:https?:)?//|<link\b|<script\s+src|url\(\s*["']?https?:""", page)
        assert "keydown" in page and "#' + (i + 1)" in page, "keyboard navigation and slide addresses"


def test_slides_refuse_remote_and_missing_images(tmp_path: Path) -> None:
    pytest.importorskip("markdown_it")
    slides = load("build_slides")
    deck = tmp_path / "deck.md"
    deck.write_text("# t\n\n![x](https://example.com/x.png)\n")
    with pytest.raises(slides.SlideError, match="offline"):
        slides.build(deck, tmp_path / "out")
    deck.write_text("# t\n\n![x](nope.png)\n\n---\n\n## two\n")
    with pytest.raises(slides.SlideError, match="not found"):
        slides.build(deck, tmp_path / "out")
    deck.write_text("# t\n\n<!-- class: two -->\n<!-- notes: say hi -->\n\n## a\n\nleft\n\n<!-- split -->\n\nright\n")
    page = slides.build(deck, tmp_path / "out").read_text()
    assert '<div class="cols">' in page and '<div class="notes">say hi</div>' in page


@pytest.mark.slow
def test_artifacts_smoke(corpus_file: Path, tmp_path: Path) -> None:
    artifacts = load("artifacts")
    out = tmp_path / "artifacts"
    assert artifacts.main([str(corpus_file), "--out", str(out), "--smoke"]) == 0
    index = (out / "INDEX.md").read_text()
    ebook = out / "ebook"
    for name in ("inputs.jsonl", "samples.jsonl", "metrics.json", "report.html"):
        assert (ebook / name).is_file() and f"ebook/{name}" in index
    assert (ebook / "run" / "best" / "model.safetensors").is_file()
    samples = [json.loads(line) for line in (ebook / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == artifacts.N_PROMPTS * len(artifacts.SAMPLING) and all(s["output"] for s in samples)
    metrics = json.loads((ebook / "metrics.json").read_text())
    assert metrics["val"]["loss"] > 0 and metrics["summary"]["step"] == 20


def test_artifacts_refuses_a_missing_book(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = load("artifacts")
    assert artifacts.main([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "a")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_strip_notebooks(tmp_path: Path) -> None:
    strip = load("strip_notebooks")
    nb = tmp_path / "x.ipynb"
    shutil.copy(ROOT / "notebooks" / "01_gpt_from_scratch.ipynb", nb)
    data = json.loads(nb.read_text())
    cell = next(c for c in data["cells"] if c["cell_type"] == "code")
    cell["outputs"], cell["execution_count"] = [{"output_type": "stream", "name": "stdout", "text": "hi"}], 3
    nb.write_text(json.dumps(data))
    assert strip.strip(nb) is True
    assert strip.strip(nb) is False
    assert all(c.get("outputs", []) == [] for c in json.loads(nb.read_text())["cells"])
