"""What dedup compares: the exact key and the MinHash shingles of a document (shared by `dedup` at --tasks 1
and `dedup_scale` at --tasks N, so both sketch the same sets)."""

from __future__ import annotations

import hashlib
import re

WORD = re.compile(r"\w+")
CHAR_SHINGLE = 5
LSH_SLACK = 0.15  # the LSH index looks for candidates this far below the threshold
SHORT_DOC_FACTOR = 2  # documents under SHORT_DOC_FACTOR x ngram words use character shingles


def exact_key(text: str) -> str:
    """Hash of the text with whitespace normalised: copies that differ only in spacing collide."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def shingles(text: str, ngram: int = 5) -> set[bytes]:
    """Word n-grams of the lower-cased word tokens, or character n-grams for short documents."""
    words = WORD.findall(text.lower())
    if len(words) >= SHORT_DOC_FACTOR * ngram:
        return {" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)}
    flat = " ".join(text.lower().split())
    if len(flat) <= CHAR_SHINGLE:
        return {flat.encode("utf-8")}
    return {flat[i : i + CHAR_SHINGLE].encode("utf-8") for i in range(len(flat) - CHAR_SHINGLE + 1)}
