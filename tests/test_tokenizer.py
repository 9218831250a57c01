"""Tokenizers: exact round trips on awkward text, save/load, the errors a user can hit."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nanophi.errors import UserError
from nanophi.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    train_tokenizer,
)

# Emoji (incl. a ZWJ sequence), CJK, a combining accent, leading spaces, tabs, blank lines, a special-token string.
AWKWARD = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "naïve café — “quotes” 🙂 👩‍👩‍👧 日本語のテキスト 한국어 e\u0301",
    "\n\nline one\n\tindented\n\n\n",
    "def f(x):\n    return x ** 2  # 😀\n",
    "a<|endoftext|>b",
    "",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n" * 20,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 20,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


def test_char_round_trip_and_vocab() -> None:
    tok = CharTokenizer.train(AWKWARD)
    assert tok.chars == sorted(set("".join(AWKWARD)))
    for text in AWKWARD:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.encode_batch(AWKWARD[:2]) == [tok.encode(t) for t in AWKWARD[:2]]
    assert tok.eot_id is None


def test_char_unknown_character() -> None:
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(UserError, match=r"'🙂'.*only knows the characters of its training corpus"):
        tok.encode("ab🙂")
    with pytest.raises(UserError, match=r"'z'"):
        tok.encode("z")


def test_bpe_round_trip_unseen_unicode(bpe: BPETokenizer) -> None:
    assert 257 < bpe.vocab_size <= 400  # a small corpus may run out of pairs to merge before 400
    assert bpe.eot_id == bpe.tokenizer.token_to_id("<|endoftext|>")
    for text in AWKWARD:
        assert bpe.decode(bpe.encode(text)) == text
    assert [bpe.decode(ids) for ids in bpe.encode_batch(AWKWARD)] == AWKWARD
    assert bpe.encode("a<|endoftext|>b").count(bpe.eot_id) == 1
    assert len(bpe.encode("The quick brown fox")) < len("The quick brown fox") / 2  # it learnt merges


def test_bpe_fast_engine_matches_tokenizers(bpe: BPETokenizer) -> None:
    """The tiktoken engine (used for speed) must give the ids `tokenizers` gives from the same tokenizer.json."""
    pytest.importorskip("tiktoken")
    assert bpe._engine(), "the tiktoken engine should be in use when tiktoken is installed"
    texts = AWKWARD + CORPUS + ["The lazy fox's 42 dogs don't   jump.\r\n  x"]
    for text in texts:
        expected = bpe.tokenizer.encode(text, add_special_tokens=False).ids
        assert bpe.encode(text) == expected
        assert bpe.encode_array(text).tolist() == expected
    assert bpe.encode_batch(texts) == [bpe.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def test_fast_engine_follows_a_gpt2_style_pre_tokenizer() -> None:
    """A BPE saved with GPT-2's own ByteLevel(use_regex=True) split also encodes through tiktoken, identically."""
    pytest.importorskip("tiktoken")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rust.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    rust.train_from_iterator(CORPUS, trainer=trainer)
    tok = BPETokenizer(rust)
    assert tok._engine()
    for text in [*AWKWARD, "    return x\n", "a  b\t\tc \n"]:
        assert tok.encode(text) == rust.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text


def test_token_byte_lengths_count_utf8_bytes(bpe: BPETokenizer) -> None:
    char = CharTokenizer.train(AWKWARD)
    for tok in (bpe, char):
        lengths = tok.token_byte_lengths()
        assert lengths.shape == (tok.vocab_size,)
        for text in AWKWARD:
            assert lengths[tok.encode(text)].sum() == len(text.encode())


def test_save_load_round_trip(tmp_path: Path, bpe: BPETokenizer) -> None:
    char = CharTokenizer.train(AWKWARD)
    for tok in (char, bpe):
        tok.save(tmp_path / tok.kind)
        loaded = load_tokenizer(tmp_path / tok.kind)
        assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
        for text in AWKWARD:
            assert loaded.encode(text) == tok.encode(text)


def test_hf_wrapper_keeps_template_and_ids(tmp_path: Path, bpe: BPETokenizer) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    hf = HFTokenizer(bpe.tokenizer, chat_template=template, bos_id=0, eos_id=0)
    assert hf.kind == "hf" and hf.eot_id == 0
    hf.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.kind == "hf"
    assert (loaded.chat_template, loaded.bos_id, loaded.eos_id) == (template, 0, 0)
    for text in AWKWARD:
        assert loaded.decode(loaded.encode(text)) == text


def test_train_tokenizer_dispatch_and_errors(bpe: BPETokenizer) -> None:
    assert isinstance(train_tokenizer("char", ["abc"]), CharTokenizer)
    assert train_tokenizer("bpe", CORPUS, vocab_size=300).vocab_size == 300
    with pytest.raises(UserError, match=r"char\|bpe\|gpt2"):
        train_tokenizer("sentencepiece", ["abc"])
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer("bpe", CORPUS, vocab_size=100)
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer("char", [""])


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no readable tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "bpe"}')
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        load_tokenizer(tmp_path)


@pytest.mark.timeout(30)  # it must fail, not hang
def test_gpt2_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tiktoken")
    with socket.socket() as s:  # a proxy port nothing listens on: the download fails at once, network or not
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached to fall back on
    with pytest.raises(UserError) as e:
        TiktokenTokenizer()
    message = str(e.value)
    assert message.startswith("GPT-2's BPE needs tiktoken's gpt2 file, which could not be downloaded (")
    assert "$TIKTOKEN_CACHE_DIR" in message and message.endswith("or use --tokenizer bpe")
    with pytest.raises(UserError, match="tiktoken's gpt2 file"):
        train_tokenizer("gpt2", [])
