"""The scripts behind `make slides` and `make artifacts`, and the notebook stripper."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from conftest import serve_gutenberg

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
    argv = [str(corpus_file), "--out", str(out), "--runs", str(tmp_path / "runs"), "--name", "book", "--smoke"]
    assert artifacts.main(argv) == 0
    book = out / "book"
    published = sorted(p.relative_to(book).as_posix() for p in book.rglob("*") if p.is_file())
    assert "trainer.pt" not in published and not any(p.startswith("ckpt-") for p in published)
    index = (out / "INDEX.md").read_text()
    assert all(f"`book/{name}`" in index for name in published), "INDEX.md lists every file"
    samples = [json.loads(line) for line in (book / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == artifacts.N_PROMPTS >= 10 and all(s["model"] and s["book"] for s in samples)
    metrics = json.loads((book / "metrics.json").read_text())
    assert metrics["val"]["loss"] > 0 and metrics["steps"] == 20 and metrics["params"] > 0
    assert "data_dir" not in json.loads((book / "state.json").read_text()), "no local cache path is published"


def test_artifacts_prompts_start_at_paragraphs_and_carry_the_real_continuation() -> None:
    artifacts = load("artifacts")
    text = "".join(f"Paragraph {i} says something quite long about nothing in particular.\n\n" for i in range(400))
    rows = artifacts.book_prompts(text, n=10, prompt_chars=60, truth_chars=40)
    assert len(rows) == 10 and len({r["offset_chars"] for r in rows}) == 10
    for r in rows:
        at = r["offset_chars"]
        assert text[at - 2:at] == "\n\n" and r["prompt"].startswith("Paragraph")
        assert text[at:].startswith(r["prompt"] + r["book"]) and len(r["book"]) == 40
        assert not r["prompt"].endswith(" ") and len(r["prompt"]) <= 60


def test_artifacts_refuses_a_missing_book(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifacts = load("artifacts")
    assert artifacts.main([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1


def test_artifacts_fetches_gutenberg_ids_or_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a loopback address nothing listens on: the download fails the way it does offline
    monkeypatch.setenv("NANOPHI_GUTENBERG_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    artifacts = load("artifacts")
    assert artifacts.main(["gutenberg:1342", "--out", str(tmp_path / "a"), "--runs", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("artifacts: error: could not download gutenberg:1342") and err.count("\n") == 1


@pytest.fixture
def fake_gutenberg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A loopback server holding book 1342 where gutenberg.org does (licence header and footer included, so the
    stripping is exercised); yields the paths requested."""
    from conftest import CORPUS

    book = ("The Project Gutenberg eBook of a test\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK TEST ***\r\n\r\n"
            + (CORPUS * 40).replace("\n", "\r\n")
            + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK TEST ***\r\nSection 1. General Terms of Use\r\n")
    with serve_gutenberg(tmp_path, book, monkeypatch) as requests:
        yield requests


@pytest.mark.slow
def test_artifacts_builds_from_a_gutenberg_id(fake_gutenberg: list[str], tmp_path: Path) -> None:
    """`make artifacts BOOK=gutenberg:1342`, against a loopback Gutenberg: downloaded once, the licence stripped,
    and the published config names the source as the user typed it (not the cache path)."""
    artifacts = load("artifacts")
    out = tmp_path / "artifacts"
    argv = ["gutenberg:1342", "--out", str(out), "--runs", str(tmp_path / "runs"), "--name", "book", "--smoke"]
    assert artifacts.main(argv) == 0
    assert fake_gutenberg == ["/cache/epub/1342/pg1342.txt"], "one download; training and sampling read the cache"
    book = out / "book"
    metrics = json.loads((book / "metrics.json").read_text())
    assert metrics["source"] == "gutenberg:1342" and metrics["steps"] == 20 and metrics["val"]["loss"] > 0
    assert json.loads((book / "config.json").read_text())["data"]["data"] == "gutenberg:1342"
    samples = [json.loads(line) for line in (book / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == artifacts.N_PROMPTS and all(s["model"] and s["book"] for s in samples)
    assert not any("Gutenberg" in s["prompt"] + s["book"] for s in samples), "the licence is not part of the book"
    assert "`book/model.safetensors`" in (out / "INDEX.md").read_text()


def test_the_committed_model_loads_samples_and_matches_its_index() -> None:
    """A clean clone's artifacts/pride-and-prejudice: the sha256 INDEX.md gives, the layout refs loads, and a
    model that knows the book (its loss on a held-out sample is far below a uniform guess's ln 91 = 4.5)."""
    import math

    import torch

    from nanophi.engine import Engine
    from nanophi.refs import load_model

    artifacts = load("artifacts")
    folder = ROOT / "artifacts" / "pride-and-prejudice"
    index = (ROOT / "artifacts" / "INDEX.md").read_text()
    digest = re.search(r"`pride-and-prejudice/model\.safetensors` \|[^|]*\|[^|]*\| `([0-9a-f]{64})`", index)
    assert digest and artifacts.sha256(folder / "model.safetensors") == digest.group(1)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6 and not (folder / "trainer.pt").exists()

    model, tokenizer = load_model(str(folder))
    text = Engine(model, tokenizer).generate(["It is a truth universally acknowledged"], 20, temperature=0.8,
                                             top_k=40, seed=1)[0]
    assert len(tokenizer.encode(text)) == 20
    sample = json.loads((folder / "samples.jsonl").read_text().splitlines()[0])
    ids = torch.tensor([tokenizer.encode(sample["prompt"] + sample["book"])[-model.config.block_size - 1:]])
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert loss.item() < math.log(model.config.vocab_size) / 2 and metrics["val"]["loss"] <= 1.7
    assert len((folder / "samples.jsonl").read_text().splitlines()) >= 10


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


def test_index_lists_every_artifact_with_its_sha256() -> None:
    """artifacts/INDEX.md is the table of contents of artifacts/: every committed file, with the right digest."""
    artifacts = load("artifacts")
    index = (ROOT / "artifacts" / "INDEX.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", index, re.M))
    folder = ROOT / "artifacts"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "INDEX.md"}
    assert set(listed) == present, "run `python scripts/artifacts.py --index` and commit INDEX.md"
    stale = [name for name, digest in listed.items() if artifacts.sha256(folder / name) != digest]
    assert not stale, f"INDEX.md's sha256 is stale for {stale}: run `python scripts/artifacts.py --index`"


def test_case_study_samples_are_the_runs_own_verdicts() -> None:
    """artifacts/case-study: every arm answers the same prompts (HumanEval's own text), and the counts in
    metrics.json are the rows' verdicts."""
    from nanophi.humaneval import load_problems
    from nanophi.textbook.experiment import ARMS

    folder = ROOT / "artifacts" / "case-study"
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics["arms"]) == list(ARMS)
    humaneval = {p["task_id"]: p["prompt"] for p in load_problems()}
    for arm, m in metrics["arms"].items():
        mine = [r for r in rows if r["arm"] == arm]
        for split, shown in m["shown"].items():
            picked = [r for r in mine if r["split"] == split]
            assert len(picked) == shown["n"] >= min(10, metrics["heldout_exercises"])
            assert sum(r["passed"] for r in picked) == shown["passed"]
            assert sum(r["parses"] for r in picked) == shown["parses"]
        assert [r["task_id"] for r in mine if r["split"] == "humaneval"] == [f"HumanEval/{i}" for i in range(10)]
        assert all(r["prompt"] == humaneval[r["task_id"]] for r in mine if r["split"] == "humaneval")
        assert all(r["passed"] <= r["runs"] <= r["parses"] for r in mine), "a pass runs, and a run parses"
    md = (folder / "samples.md").read_text()
    assert all(f"**{arm}**:" in md for arm in ARMS) and md.count("### HumanEval/") == 10


def test_case_study_samples_refuses_a_folder_without_results(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    samples = load("case_study_samples")
    assert samples.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "results.json does not exist" in err and "nanophi textbook experiment" in err and err.count("\n") == 1
