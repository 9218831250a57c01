"""nanophi's GGUF exports against llama.cpp itself (llama-cpp-python): token ids on a battery of strings, greedy
tokens and logits, for gpt2- and llama-preset models in f32 and f16.

llama-cpp-python has no wheel on PyPI for this platform: it builds llama.cpp from source (~40 min on 2 cores), so
this module skips when it is not installed; `make test-llamacpp` installs it and runs it. Each case prints one
line of numbers (run with -rP to see them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import nanophi.convert.gguf as gguf_module
from nanophi.convert.gguf import read_gguf, write_gguf
from nanophi.convert.gguf_vocab import HF_JSON_KEY, NANOPHI_TOKENIZER_KEY, tokenizer_from_metadata
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.refs import load_model
from nanophi.tokenizer import BPETokenizer, CharTokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

NEW = 32  # greedy tokens compared
# max |Δlogit| allowed. llama.cpp sums in another order; its CPU GELU reads a table of fp16 values (rounding GELU's
# input and output to fp16 accounts for ~3/4 of gpt2's f32 difference); with f16 weights it rounds activations too.
TOL = {("llama", "f32"): 1e-4, ("gpt2", "f32"): 3e-3, ("llama", "f16"): 1e-2, ("gpt2", "f16"): 1e-2}
BATTERY = [
    # runs of whitespace: where GPT-2's `\s+(?!\S)` matters
    "a  b", "a   b", "    return x", "x\n    return", "\t\treturn", "  \t  x", "x  \n  y", "trailing   ", "   ",
    "\n\n\n", "a\n\n\nb", "\r\n\r\nx", " \n \n", "x \t\n y", "\t", "\n",
    # code
    "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)\n", "if (a&&b) || c != 0 { return; }",
    "    # comment\n    pass\n", "class A:\n\n    def __init__(self):\n        self.x = [1, 2, 3]  # three\n",
    # unicode and emoji
    "café naïve", "日本語のテキスト", "Ünïcödé", "ß ẞ", "e\u0301", "Ελληνικά", "русский текст", "עברית", "العربية",
    "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷 flag", "naïve 日本語 🙂 mixed",
    # digits and contractions
    "12345", "3.14159", "1,000,000", "x1y22z333", "2026-12-02", "it's", "don't", "we'll", "they've", "I'm", "you'd",
    "IT'S", "o'clock", "!!!???", "a" * 50, "",
]
SPECIAL = ["<|endoftext|>after", "before<|endoftext|> x"]
PROMPT = "def area(radius):\n    return 3.14159 * radius ** 2\n\nclass Shape:\n    "


@pytest.fixture(scope="module")
def corpus() -> str:
    """Real text to train a small BPE on: the pydoc topics (prose and code examples) and the battery itself."""
    from pydoc_data.topics import topics

    return "\n\n".join(list(topics.values())[:60]) + "\n".join(BATTERY) * 4


@pytest.fixture(scope="module")
def bpe(corpus: str) -> BPETokenizer:
    return BPETokenizer.train([corpus], vocab_size=1024)


def tiny(preset: str, vocab: int, **kw: Any) -> GPT:
    """Random weights large enough that a wrong layout changes the logits by far more than TOL."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**(dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=vocab)
                             | PRESETS[preset] | kw)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_" in name
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if is_norm else 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def llama(path: Path, **kw: Any) -> Any:
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


def llama_ids(llm: Any, text: str) -> list[int]:
    # special=True: <|endoftext|> in text is the special token, as nanophi's BPE encodes it. add_bos=True is what
    # llama.cpp's tools do; the GGUF's add_bos_token=false must keep it from prepending one
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def against_llama(path: Path, model: GPT, prompt: list[int]) -> tuple[float, int, np.ndarray]:
    """llama.cpp on the GGUF at `path` vs `model`: max |Δlogit| over the prompt, how many of NEW greedy tokens agree,
    and nanophi's logits."""
    logits, greedy = llama_run(path, prompt, model.config.block_size)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]), all_logits=True)[0][0].numpy()
    same = sum(a == b for a, b in zip(greedy, greedy_nanophi(model, prompt)))
    return float(np.abs(logits - ours).max()), same, ours


def greedy_nanophi(model: GPT, prompt: list[int], n: int = NEW) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), all_logits=True)[0][0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def llama_run(path: Path, prompt: list[int], n_ctx: int) -> tuple[np.ndarray, list[int]]:
    """(logits at every prompt position, the next `NEW` greedy tokens), as llama.cpp computes them."""
    # an f32 KV cache (llama.cpp's default is f16), so an f32 model's logits differ only by summation order
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, seed=0, type_k=f32, type_v=f32)
    try:
        llm.eval(prompt)
        logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
        out = []
        for _ in range(NEW):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return logits, out
    finally:
        llm.close()


def test_bpe_token_ids_match_llama_cpp(bpe: BPETokenizer, corpus: str, tmp_path: Path) -> None:
    path = write_gguf(tiny("llama", bpe.vocab_size), bpe, tmp_path / "m.gguf")
    meta = read_gguf(path).metadata
    # the vocabulary nanophi rebuilds from llama.cpp's keys alone (what it does for a GGUF made by other tools)
    rebuilt = tokenizer_from_metadata({k: v for k, v in meta.items() if k not in (NANOPHI_TOKENIZER_KEY, HF_JSON_KEY)})
    llm = llama(path, vocab_only=True)
    try:
        texts = BATTERY + SPECIAL + [corpus[:20000]]
        agree = sum(llama_ids(llm, t) == bpe.encode(t) for t in texts)
        bad = [t for t in texts if llama_ids(llm, t) != bpe.encode(t)]
        assert not bad, f"llama.cpp tokenizes {len(bad)} of {len(texts)} strings differently: {bad[:5]!r}"
        assert all(rebuilt.encode(t) == bpe.encode(t) for t in texts)
        assert llm.detokenize(bpe.encode(corpus[:2000])).decode("utf-8") == corpus[:2000]
    finally:
        llm.close()
    print(f"bpe token ids: {agree}/{len(texts)} strings agree (llama-cpp-python {llama_cpp.__version__})")


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "default"])
def test_llama_cpp_pre_tokenizer_names_import_as_llama_cpp_splits(pre: str, bpe: BPETokenizer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF from another tool names its pre-tokenizer; nanophi's import must split text as llama.cpp does."""
    real = gguf_module.llama_vocab
    monkeypatch.setattr(gguf_module, "llama_vocab", lambda tok, n: dataclasses.replace(real(tok, n), pre=pre))
    path = write_gguf(tiny("llama", bpe.vocab_size), bpe, tmp_path / "m.gguf")
    meta = read_gguf(path).metadata
    rebuilt = tokenizer_from_metadata({k: v for k, v in meta.items() if k not in (NANOPHI_TOKENIZER_KEY, HF_JSON_KEY)})
    llm = llama(path, vocab_only=True)
    try:
        texts = BATTERY + SPECIAL
        bad = [t for t in texts if llama_ids(llm, t) != rebuilt.encode(t)]
    finally:
        llm.close()
    assert not bad, f"{pre}: {len(bad)} of {len(texts)} strings differ: {bad[:5]!r}"


def test_char_vocabulary_matches_llama_cpp(corpus: str, tmp_path: Path) -> None:
    char = CharTokenizer.train([corpus + "\x00\x7f\\"])
    model = tiny("llama", char.vocab_size)
    path = write_gguf(model, char, tmp_path / "c.gguf")
    llm = llama(path, vocab_only=True)
    try:
        texts = [t for t in BATTERY if t] + [corpus[:20000], "back\\slash\x00\x7f"]
        bad = [t for t in texts if llama_ids(llm, t) != char.encode(t)]
        assert llm.token_eos() == -1 and llm.token_bos() == -1  # no character is taken for end-of-text
    finally:
        llm.close()
    assert not bad, f"llama.cpp tokenizes {len(bad)} of {len(texts)} strings differently: {bad[:5]!r}"
    prompt = char.encode(PROMPT)
    diff, same, _ = against_llama(path, model, prompt)
    print(f"char: token ids {len(texts)}/{len(texts)}, greedy {same}/{NEW}, max|Δlogit| f32 {diff:.2e}")
    assert same == NEW and diff < TOL["llama", "f32"]


@pytest.mark.parametrize("preset,kw", [
    ("gpt2", {}),  # biases, tied head
    ("gpt2", {"bias": False, "tie_embeddings": False}),
    ("llama", {}),  # tied head
    ("llama", {"n_kv_head": 2, "tie_embeddings": False, "bias": True}),  # GQA, untied head, biases
], ids=["gpt2", "gpt2-nobias-untied", "llama", "llama-gqa-untied-bias"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_greedy_and_logits_match_llama_cpp(preset: str, kw: dict, dtype: str, bpe: BPETokenizer,
                                           tmp_path: Path) -> None:
    model = tiny(preset, bpe.vocab_size, **kw)
    path = write_gguf(model, bpe, tmp_path / "m.gguf", dtype)
    # the reference is nanophi running the weights as stored (f16 ones rounded), so only the arithmetic differs
    reference, _ = load_model(path)
    prompt = bpe.encode(PROMPT)
    diff, same, ours = against_llama(path, reference, prompt)
    print(f"{preset} {kw} {dtype}: greedy {same}/{NEW}, max|Δlogit| {diff:.2e} over {len(prompt)} positions "
          f"(logits span {float(ours.max() - ours.min()):.1f})")
    assert same == NEW and diff < TOL[preset, dtype]
