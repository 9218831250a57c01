"""GGUF vocabularies in llama.cpp's terms, checked without llama.cpp (tests/test_llamacpp.py runs llama.cpp itself):
the pre-tokenizer names written and read, the GPT-2 split rule of new BPE tokenizers, the refusal of tokenizers
llama.cpp cannot reproduce, and char vocabularies in llama.cpp's rwkv form."""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest
import torch

from nanophi import checkpoint
from nanophi.cli import main
from nanophi.convert.gguf import read_gguf, write_gguf
from nanophi.convert.gguf_vocab import HF_JSON_KEY, NANOPHI_TOKENIZER_KEY, tokenizer_from_metadata
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.refs import load_model
from nanophi.tokenizer import LEGACY_BPE_SPLIT_PATTERN, BPETokenizer, CharTokenizer

TEXT = ("def area(radius):\n    return 3.14159 * radius ** 2\n\n\tif x  ==  1:\n        print('it''s done')\n"
        "The café's naïve owner doesn't count 12345 日本語 🙂 items.\n   \n") * 6


def tiny(vocab: int, preset: str = "llama") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**(dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab) | PRESETS[preset])))


def save_run(model: GPT, tok, run: Path) -> Path:
    tok_dir = run.parent / f"{run.name}-tok"
    tok.save(tok_dir)
    checkpoint.save(run, 0, model, {"model": model.config.to_dict()}, {}, None, tok_dir)
    return run


def llama_cpp_only(meta: dict) -> dict:
    """The metadata a non-nanophi reader sees: llama.cpp's keys only."""
    return {k: v for k, v in meta.items() if k not in (NANOPHI_TOKENIZER_KEY, HF_JSON_KEY)}


def test_new_bpe_splits_like_gpt2_and_exports_as_gpt_2(tmp_path: Path) -> None:
    bpe = BPETokenizer.train([TEXT], vocab_size=400)
    spec = json.loads(bpe.tokenizer.to_str())
    assert "\\s+(?!\\S)" in spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    # GPT-2's rule lends the last space of a run to the next word
    assert [bpe.decode([i]) for i in bpe.encode("x\n    return")][-1].startswith(" ")
    write_gguf(tiny(bpe.vocab_size), bpe, tmp_path / "m.gguf")
    meta = read_gguf(tmp_path / "m.gguf").metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    # nanophi never prepends a BOS: llama.cpp's tools must not either
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    # the vocabulary rebuilt from llama.cpp's keys alone tokenizes as the original
    rebuilt = tokenizer_from_metadata(llama_cpp_only(meta))
    assert rebuilt.encode(TEXT) == bpe.encode(TEXT)


def test_legacy_bpe_refuses_gguf_but_still_loads_and_exports_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import nanophi.tokenizer as tokenizer_module

    with monkeypatch.context() as m:  # a tokenizer trained before the split rule became GPT-2's
        m.setattr(tokenizer_module, "BPE_SPLIT_PATTERN", LEGACY_BPE_SPLIT_PATTERN)
        old = BPETokenizer.train([TEXT], vocab_size=400)
    run = save_run(tiny(old.vocab_size), old, tmp_path / "run")
    _, back = load_model(run)
    assert back.encode(TEXT) == old.encode(TEXT) and back.decode(back.encode(TEXT)) == TEXT
    ids = [back.decode([i]) for i in back.encode("x\n    return")]
    assert ids[-1] == "return"  # its own rule still: the run of spaces stays whole

    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pre-2026-12-02 rule" in err[0] and "--format hf" in err[0], err
    assert not (tmp_path / "m.gguf").exists()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0


def test_gguf_refuses_tokenizers_llama_cpp_cannot_reproduce(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers

    from nanophi.errors import UserError
    from nanophi.tokenizer import HFTokenizer

    bpe = BPETokenizer.train([TEXT], vocab_size=300)
    normalized = Tokenizer.from_str(bpe.tokenizer.to_str())
    normalized.normalizer = normalizers.NFKC()
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    for tok, why in ((HFTokenizer(normalized), "normalizes text first (NFKC)"),
                     (HFTokenizer(word_level), "byte-level BPE tokenizers only")):
        with pytest.raises(UserError, match=re.escape(why)):
            write_gguf(tiny(300), tok, tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()


def test_char_vocabulary_exports_in_rwkv_form(tmp_path: Path) -> None:
    text = TEXT + "back\\slash \r\n \x00 \x7f"
    char = CharTokenizer.train([text])
    write_gguf(tiny(char.vocab_size, "gpt2"), char, tmp_path / "c.gguf")
    meta = read_gguf(tmp_path / "c.gguf").metadata
    assert meta["tokenizer.ggml.model"] == "rwkv" and "tokenizer.ggml.pre" not in meta
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == char.vocab_size and len(set(tokens)) == len(tokens)
    by_char = dict(zip(char.chars, tokens))
    assert (by_char["\\"], by_char["\n"], by_char["\x00"], by_char["🙂"], by_char["a"]) == ("\\\\", "\\n", "\\x00",
                                                                                          "🙂", "a")
    assert "tokenizer.ggml.eos_token_id" not in meta  # llama.cpp's rwkv default: no end-of-text token
    _, back = load_model(tmp_path / "c.gguf")
    assert back.kind == "char" and back.encode(text) == char.encode(text)


@pytest.mark.parametrize("pre,text,pieces", [
    ("gpt-2", "x   y12345", ["x", "  ", " y", "12345"]),
    ("gpt2", "x   y12345", ["x", "  ", " y", "12345"]),  # the name nanophi wrote before llama.cpp's
    ("smollm", "x y123", ["x", " y", "1", "2", "3"]),
    ("llama-bpe", "x   y12345", ["x", "  ", " y", "123", "45"]),
    ("default", "a=12345+b", ["a", "=", "123", "45", "+", "b"]),  # what llama.cpp uses without tokenizer.ggml.pre
])
def test_gguf_import_reads_llama_cpp_pre_tokenizer_names(pre: str, text: str, pieces: list[str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    # a byte-level vocabulary of single bytes (no merges): the ids spell out how the text was cut into words
    alphabet = sorted(ByteLevel.alphabet())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": alphabet, "tokenizer.ggml.merges": []}
    if pre != "default":
        meta["tokenizer.ggml.pre"] = pre
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_from_metadata(meta)
    assert not caplog.records  # every one of these names is known
    words = tok.tokenizer.pre_tokenizer.pre_tokenize_str(text)
    assert [unspell(w) for w, _ in words] == pieces


def unspell(word: str) -> str:
    """A ByteLevel word (bytes spelt as printable characters) back to its text."""
    from nanophi.tokenizer import _byte_decoder

    byte_of = _byte_decoder()
    return bytes(byte_of[c] for c in word).decode("utf-8")
