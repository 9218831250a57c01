"""Shared fixtures: a small corpus written per test, and a private cache so tests never share state."""

from __future__ import annotations

from pathlib import Path

import pytest

# A few paragraphs of plain English with some unicode, repeated so a tiny model has something to learn.
CORPUS = """It was the best of small models, it was the worst of small models. The tokenizer counted every
character, the optimizer took its steps, and the loss went down — slowly at first, then all at once.
Miss Bennet read the letter twice; the second time she smiled. « Naïve », said the café owner, and the
conversation turned to the weather, which was fine, and to the ball, which was finer still.
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("nanophi-cache")
    monkeypatch.setenv("NANOPHI_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS * 40, encoding="utf-8")
    return p
