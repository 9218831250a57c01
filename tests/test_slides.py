"""The two decks carry a talk and match what they quote.

Every slide has speaker notes, the notes add up to a ten-minute talk, the committed HTML in docs/slides/build/ is
what `make slides` builds from the Markdown today, and every number marked `<!-- = FILE: EXPR -->` on a slide
equals its results file and every generated text shown is a row of its samples file (the mechanisms of
tests/test_article.py). Code excerpts and images are checked there too.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from test_article import ROOT, check_doc_claims, check_samples, cited_files, claims, samples_shown

SLIDES = ROOT / "docs" / "slides"
DECKS = [SLIDES / "part1.md", SLIDES / "part2.md"]
BUILD = SLIDES / "build"
# a ten-minute talk at ~130 spoken words a minute, part of it read off the slides themselves
MIN_NOTE_WORDS = 800
MIN_SLIDES, MAX_SLIDES = 10, 20


def build_slides() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_slides", ROOT / "scripts" / "build_slides.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_slides", module)
    spec.loader.exec_module(module)
    return module


def slides(deck: Path) -> list[str]:
    bs = build_slides()
    return [p.strip("\n") for p in bs.SEPARATOR.split(deck.read_text(encoding="utf-8")) if p.strip()]


def notes(slide: str) -> str:
    bs = build_slides()
    return " ".join(v.strip() for kind, v in bs.DIRECTIVE.findall(slide) if kind == "notes")


def title(slide: str) -> str:
    m = re.search(r"^#{1,3} (.+)$", slide, re.M)
    return m.group(1) if m else slide[:40]


@pytest.mark.parametrize("deck", DECKS, ids=lambda p: p.name)
def test_every_slide_has_speaker_notes(deck: Path) -> None:
    parts = slides(deck)
    assert MIN_SLIDES <= len(parts) <= MAX_SLIDES, f"{deck.name} has {len(parts)} slides; a 10-minute talk has 10-20"
    bare = [f"{i + 1}: {title(s)}" for i, s in enumerate(parts) if len(notes(s).split()) < 20]
    assert not bare, f"{deck.name}: slides without speaker notes (or under 20 words): {bare}"
    words = sum(len(notes(s).split()) for s in parts)
    assert words >= MIN_NOTE_WORDS, f"{deck.name}: {words} words of notes, want {MIN_NOTE_WORDS} for ten minutes"


@pytest.mark.parametrize("deck", DECKS, ids=lambda p: p.name)
def test_deck_has_what_the_talk_needs(deck: Path) -> None:
    text = deck.read_text(encoding="utf-8")
    titles = [title(s).lower() for s in slides(deck)]
    assert "limitations" in titles, f"{deck.name} needs a Limitations slide"
    if deck.name == "part1.md":
        assert "<!-- source: src/nanophi/train.py -->" in text, "part 1 shows the training loop from train.py"
        assert any(f == "artifacts/pride-and-prejudice/samples.jsonl" for f, _, _ in samples_shown(deck)), (
            "part 1 shows the committed model's samples (<!-- sample: artifacts/pride-and-prejudice/samples.jsonl -->)")
    else:
        figures = sorted(p.name for p in (ROOT / "docs" / "case_study" / "figures").glob("*.png"))
        missing = [f for f in figures if f"../case_study/figures/{f}" not in text]
        assert not missing, f"part 2 does not show the case study's figures {missing}"


@pytest.mark.parametrize("deck", DECKS, ids=lambda p: p.name)
def test_built_html_is_up_to_date(deck: Path, tmp_path: Path) -> None:
    committed = BUILD / f"{deck.stem}.html"
    assert committed.is_file(), f"{committed.relative_to(ROOT)} is missing: run `make slides` and commit it"
    fresh = build_slides().build(deck, tmp_path)
    assert fresh.read_bytes() == committed.read_bytes(), (
        f"{committed.relative_to(ROOT)} is older than {deck.name}: run `make slides` and commit the HTML")
    html = fresh.read_text(encoding="utf-8")
    assert html.count('<div class="notes">') == len(slides(deck))
    assert "<!-- =" not in html, "number markers are for the tests; the build drops them"


@pytest.mark.parametrize(("deck", "results_file"),
                         [(d, f) for d in DECKS for f in cited_files([d])],
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_slide_numbers_match_their_results_file(deck: Path, results_file: str) -> None:
    check_doc_claims(deck, results_file)


def test_generated_text_on_the_slides_is_the_models_own() -> None:
    assert check_samples(DECKS[0]) > 0
    files = {f for f, _, _ in samples_shown(DECKS[1])}
    assert {"artifacts/teacher/samples.jsonl", "artifacts/case-study/samples.jsonl"} <= files, (
        "part 2 shows a teacher before/after sample and a student's")
    assert check_samples(DECKS[1]) >= 2


@pytest.mark.parametrize("deck", DECKS, ids=lambda p: p.name)
def test_slides_cite_their_numbers(deck: Path) -> None:
    assert len(claims(deck)) >= 15, f"{deck.name}: only {len(claims(deck))} numbers are tied to a results file"
