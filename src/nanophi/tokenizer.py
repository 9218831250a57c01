"""Text <-> token ids: one small interface, four implementations.

    char   one token per character of the training corpus (nanoGPT's shakespeare_char); tiny vocabularies
           make small models fast on a CPU
    bpe    byte-level BPE trained on the corpus with Hugging Face `tokenizers` (GPT-2's scheme, your vocab size),
           encoded by tiktoken's faster engine when tiktoken is installed
    gpt2   GPT-2's own BPE through `tiktoken` (50257 tokens; needs its vocabulary file, downloaded once)
    hf     any pretrained `tokenizers.Tokenizer` (imported from a Hugging Face or GGUF model)

Every tokenizer saves itself into a directory with a `tokenizer_config.json` naming its kind, so
`load_tokenizer(directory)` gives back an equivalent one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nanophi.errors import UserError

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
CHAR_FILE = "vocab.json"
KINDS = ("char", "bpe", "gpt2")
EOT_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte tokens plus <|endoftext|>
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece's byte tokens, e.g. <0x0A>

# How byte-level BPE cuts text into words before merging bytes: exactly GPT-2's regex, which llama.cpp reproduces
# (its pre-tokenizer "gpt-2"), so a GGUF export tokenizes the same in llama.cpp, Ollama and LM Studio.
# Tokenizers trained before 2026-12-02 used GPT-2's regex without the `\s+(?!\S)` look-ahead (LEGACY_BPE_SPLIT_PATTERN):
# a run of spaces before a word stayed whole ("    return" -> "    ", "return") where GPT-2 lends its last space
# to the word ("   ", " return"). No llama.cpp pre-tokenizer splits that way, so GGUF export refuses those runs;
# they still load, encode and export to HF, because each tokenizer.json carries its own pattern.
# The look-ahead costs speed: it needs a backtracking regex engine, and tiktoken (8192-token BPE, one core, quiet
# machine) encodes stdlib Python at 11.6 MB per CPU-second instead of 19.2, the pydoc topics at 9.6 instead of
# 23.0 (`tokenizers` does 1.6-2.1 either way); bytes per token 3.663 vs 3.673 (Python), 4.095 vs 4.149 (pydoc).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_SPLIT_PATTERN = GPT2_SPLIT_PATTERN
LEGACY_BPE_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"""


class Tokenizer(Protocol):
    """What the rest of nanophi needs from a tokenizer."""

    kind: str  # char | bpe | gpt2 | hf

    @property
    def eot_id(self) -> int | None:
        """The end-of-text token, if the vocabulary has one."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> None: ...

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id decodes to, shape (vocab_size,): turns token counts into bytes (bits/byte)."""
        ...


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# char


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of the training corpus."""

    kind = "char"
    eot_id = None

    def __init__(self, chars: Sequence[str]) -> None:
        assert len(set(chars)) == len(chars) and all(len(c) == 1 for c in chars), "chars must be distinct characters"
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # A lookup table indexed by code point encodes a string in one numpy gather: ~100x a dict per character.
        self._lut = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int32)
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise UserError("cannot build a character vocabulary from an empty corpus; pass a source with text")
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.where(points < len(self._lut), self._lut[np.minimum(points, len(self._lut) - 1)], -1)
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            c = chr(points[unknown[0]])
            raise UserError(
                f"character {c!r} is not in the vocabulary: a char model only knows the characters of its training "
                f"corpus ({self.vocab_size} of them); remove it from the text or train on a corpus that has it"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int64)

    def save(self, directory: Path) -> None:
        _write_config(directory, {"kind": self.kind})
        (directory / CHAR_FILE).write_text(json.dumps({"chars": self.chars}, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        return cls(json.loads((directory / CHAR_FILE).read_text())["chars"])


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers: any pretrained one (hf), and our own byte-level BPE (bpe)


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind nanophi's interface, with the chat template and BOS/EOS ids of its model.

    `encode` never adds special tokens (callers that want a BOS add `bos_id` themselves), and `decode` keeps them,
    so decode(encode(text)) gives back text containing special-token strings unchanged.
    """

    kind = "hf"

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def eot_id(self) -> int | None:
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust side encodes the batch on all cores; the "fast" variant skips computing character offsets.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """Exact for byte-level vocabularies (one character per byte); approximate for SentencePiece-style ones."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        byte_level = "ByteLevel" in json.dumps(json.loads(self.tokenizer.to_str()).get("decoder"))
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if token in added:
                lengths[i] = len(token.encode("utf-8"))
            elif byte_level:
                lengths[i] = len(token)  # ByteLevel spells every byte as one printable character
            elif _BYTE_FALLBACK.match(token):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))  # SentencePiece's ▁ is a space
        return lengths

    def _config(self) -> dict[str, Any]:
        return {"kind": self.kind, "chat_template": self.chat_template, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def save(self, directory: Path) -> None:
        _write_config(directory, self._config())
        self.tokenizer.save(str(directory / HF_FILE))

    @classmethod
    def load(cls, directory: Path) -> HFTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        config = json.loads((directory / CONFIG_FILE).read_text())
        return cls(
            RustTokenizer.from_file(str(directory / HF_FILE)),
            chat_template=config.get("chat_template"),
            bos_id=config.get("bos_id"),
            eos_id=config.get("eos_id"),
        )


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained on the corpus: any text encodes, and decodes back exactly (see BPE_SPLIT_PATTERN).

    The vocabulary and merges live in a Hugging Face `tokenizer.json` (portable: it exports as is). Encoding goes
    through tiktoken's BPE engine built from that vocabulary when tiktoken is installed, ~7x faster per core than
    `tokenizers` here (10 vs 1.4 MB/s). tiktoken merges by token rank where `tokenizers` follows merge rules; for a
    vocabulary trained this way (ids in merge order) they agreed on every token of 8 MB of Python and English we
    compared, and where they could differ both decode exactly. Without tiktoken, `tokenizers` encodes.
    """

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        eot = tokenizer.token_to_id(EOT_TOKEN)
        super().__init__(tokenizer, bos_id=eot, eos_id=eot)
        self._fast: Any = None  # the tiktoken engine, built on first use; False when not available
        self._fast_lock = threading.Lock()  # prepare encodes from several threads at once

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as RustTokenizer

        if vocab_size < MIN_BPE_VOCAB:
            raise UserError(f"--vocab-size {vocab_size} is too small for byte-level BPE; use at least {MIN_BPE_VOCAB}")
        tok = RustTokenizer(models.BPE())
        # No normalizer and no prefix space: the text goes in unchanged, so decode(encode(x)) == x for any x.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable characters
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        tok.train_from_iterator(_nonempty(texts), trainer=trainer)
        return cls(tok)

    def __getstate__(self) -> dict[str, Any]:
        # the lock can't be pickled, and the engine is rebuilt on demand
        return {k: v for k, v in self.__dict__.items() if k not in ("_fast", "_fast_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _fast=None, _fast_lock=threading.Lock())

    def _engine(self) -> Any:
        with self._fast_lock:
            if self._fast is None:
                self._fast = _tiktoken_engine(self.tokenizer) or False
        return self._fast

    def encode(self, text: str) -> list[int]:
        fast = self._engine()
        # allowed_special="all": a literal <|endoftext|> is the special token, as in `tokenizers`
        return fast.encode(text, allowed_special="all") if fast else super().encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        fast = self._engine()
        if not fast:
            return super().encode_batch(texts)
        return fast.encode_batch(texts, allowed_special="all", num_threads=os.cpu_count() or 1)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` into a numpy array; thread-safe, and with tiktoken it runs without the GIL (see prepare)."""
        fast = self._engine()
        if fast and hasattr(fast, "encode_to_numpy"):
            return fast.encode_to_numpy(text, allowed_special="all")
        return np.array(self.encode(text), dtype=np.int64)

    def _config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        return cls(RustTokenizer.from_file(str(directory / HF_FILE)))


_ENGINE_PROBE = "Hello world's 12 tests\n\n  indented\tcode()  \r\n<|endoftext|>naïve 日本語 🙂 e\u0301 x"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's stand-in character for each byte, inverted: ByteLevel token strings are spelt with these."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: b for b in printable}  # printable bytes stand for themselves...
    for b in range(256):
        if b not in char_of:
            char_of[b] = 256 + len(char_of) - len(printable)  # ...the others are shifted past 255, in order
    return {chr(c): b for b, c in char_of.items()}


def _tiktoken_engine(tok: tokenizers.Tokenizer) -> Any:
    """A tiktoken Encoding with `tok`'s byte-level vocabulary (ranks = ids = merge order), or None."""
    try:
        import tiktoken
    except ImportError:
        log.debug("tiktoken is not installed: byte-level BPE encodes with tokenizers (slower)")
        return None
    pattern = _split_pattern(tok)
    if pattern is None:
        log.debug("this BPE splits words in a way tiktoken can't reproduce: encoding with tokenizers (slower)")
        return None
    byte_of = _byte_decoder()
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    ranks = {bytes(byte_of[ch] for ch in token): i for token, i in tok.get_vocab(with_added_tokens=False).items()}
    engine = tiktoken.Encoding("nanophi-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    if engine.encode(_ENGINE_PROBE, allowed_special="all") != tok.encode(_ENGINE_PROBE, add_special_tokens=False).ids:
        log.warning("tiktoken and tokenizers disagree on this BPE; encoding with tokenizers (slower)")
        return None
    return engine


def _split_pattern(tok: tokenizers.Tokenizer) -> str | None:
    """The word-splitting regex of a byte-level BPE, if it is one tiktoken can apply the same way."""
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_SPLIT_PATTERN  # what ByteLevel(use_regex=True) splits with
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and "Regex" in steps[0].get("pattern", {})
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        return steps[0]["pattern"]["Regex"]
    return None


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


# ----------------------------------------------------------------------------------------------------------------
# gpt2 (tiktoken)


class TiktokenTokenizer:
    """GPT-2's BPE through tiktoken: 50257 tokens, the last one <|endoftext|>."""

    kind = "gpt2"

    def __init__(self, encoding: str = "gpt2") -> None:
        try:
            import tiktoken
        except ImportError:
            raise UserError("--tokenizer gpt2 needs tiktoken: pip install 'nanophi[gpt2]'") from None
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # requests/urllib/hash errors: what a failed download raises varies by version
            raise UserError(
                f"GPT-2's BPE needs tiktoken's {encoding} file, which could not be downloaded "
                f"({type(e).__name__}: {str(e)[:200]}); run once with internet access, or put it in "
                f"$TIKTOKEN_CACHE_DIR, or use --tokenizer bpe"
            ) from None
        self.eot_id: int | None = self.enc.eot_token

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # "ordinary": a literal "<|endoftext|>" in the text is text, not the special token.
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` into a numpy array; thread-safe, and it runs without the GIL (see prepare)."""
        if hasattr(self.enc, "encode_to_numpy"):
            # disallowed_special=(): special-token strings are plain text, as in encode_ordinary
            return self.enc.encode_to_numpy(text, disallowed_special=())
        return np.array(self.encode(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)], dtype=np.int64)

    def save(self, directory: Path) -> None:
        _write_config(directory, {"kind": self.kind})


# ----------------------------------------------------------------------------------------------------------------
# building and loading


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """A tokenizer of `kind` for the corpus `texts` (gpt2 is pretrained: it ignores both)."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "gpt2":
        return TiktokenTokenizer()
    raise UserError(f"unknown tokenizer {kind!r}; use one of {'|'.join(KINDS)}")


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer `save` wrote into `directory`."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        kind = config["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"no readable tokenizer in {directory} ({e}); prepare the data again") from None
    loaders = {"char": CharTokenizer.load, "bpe": BPETokenizer.load, "hf": HFTokenizer.load}
    if kind == "gpt2":
        return TiktokenTokenizer()
    if kind not in loaders:
        raise UserError(f"{directory / CONFIG_FILE} names an unknown tokenizer {kind!r} (known: char|bpe|gpt2|hf)")
    try:
        return loaders[kind](directory)
    except Exception as e:  # tokenizers reports a corrupt tokenizer.json as a plain Exception
        raise UserError(f"the {kind} tokenizer in {directory} is unreadable ({e}); prepare the data again") from None
