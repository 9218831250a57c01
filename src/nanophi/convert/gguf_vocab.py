"""A GGUF file's vocabulary <-> nanophi's tokenizers: llama.cpp's tokenizer.ggml.* keys (tokens, types, merges and
the pre-tokenizer's name) rebuilt as a `tokenizers` BPE on the way in, and on the way out written only when
llama.cpp would tokenize exactly as nanophi does (see convert/gguf.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.tokenizer import GPT2_SPLIT_PATTERN, LEGACY_BPE_SPLIT_PATTERN

log = logging.getLogger(__name__)

NANOPHI_TOKENIZER_KEY = "nanophi.tokenizer"  # JSON of the tokenizer's tokenizer_config.json
NANOPHI_CHARS_KEY = "nanophi.tokenizer.chars"  # a char tokenizer's vocabulary (no llama.cpp equivalent)
HF_JSON_KEY = "tokenizer.huggingface.json"

# token types in tokenizer.ggml.token_type (llama.h)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# llama.cpp's pre-tokenizers (src/llama-vocab.cpp) as `tokenizers` pipelines; the name is tokenizer.ggml.pre.
# Several names share one split rule there; these are the ones whose rule nanophi rebuilds exactly.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's regex alone; "gpt2" is the name nanophi wrote before it used llama.cpp's ("gpt-2"), which llama.cpp refuses
_GPT2_LIKE = ("gpt-2", "gpt2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es",
              "jina-v2-de")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")  # 1 digit/token
_LLAMA3_LIKE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")
# llama.cpp's rule for "default" (and for a file without tokenizer.ggml.pre): four regexes applied in turn
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]")
# what nanophi writes for each split rule it can express in llama.cpp's terms
PRE_GPT2, PRE_DIGITS, PRE_LLAMA3 = "gpt-2", "smollm", "llama-bpe"


def tokenizer_from_metadata(meta: dict[str, Any], source: str = "GGUF file") -> Any:
    """nanophi's tokenizer for the vocabulary stored in a GGUF file's metadata."""
    from tokenizers import Tokenizer as RustTokenizer

    from nanophi.tokenizer import BPETokenizer, CharTokenizer, HFTokenizer

    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    template = meta.get("tokenizer.chat_template")
    if NANOPHI_TOKENIZER_KEY in meta:
        cfg = json.loads(meta[NANOPHI_TOKENIZER_KEY])
        if cfg["kind"] == "char":
            return CharTokenizer(meta[NANOPHI_CHARS_KEY])
        rust = RustTokenizer.from_str(meta[HF_JSON_KEY])
        if cfg["kind"] == "bpe":
            return BPETokenizer(rust)
        return HFTokenizer(rust, chat_template=cfg.get("chat_template"), bos_id=cfg.get("bos_id"),
                           eos_id=cfg.get("eos_id"))
    if HF_JSON_KEY in meta:
        return HFTokenizer(RustTokenizer.from_str(meta[HF_JSON_KEY]), chat_template=template, bos_id=bos, eos_id=eos)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{source} has a {model!r} vocabulary; nanophi rebuilds byte-level BPE ('gpt2') "
                        "vocabularies only (SentencePiece 'llama' vocabularies are not supported yet)")
    return HFTokenizer(_byte_level_bpe(meta), chat_template=template, bos_id=bos, eos_id=eos)


def _byte_level_bpe(meta: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's own default when the key is missing
    # llama.cpp's Llama-3 rule (like Llama 3's tokenizer.json) takes a word that is itself a token whole
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_LIKE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_LIKE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "default":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _DEFAULT_SPLITS),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_LIKE:
            log.warning("GGUF pre-tokenizer %r is not known to nanophi; splitting text the GPT-2 way", pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>...) must match whole in text, and are special; user-defined ones just match whole
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    added = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    return tok



@dataclass
class LlamaVocab:
    """A vocabulary in llama.cpp's terms (tokenizer.ggml.*): what it needs to tokenize exactly as nanophi does."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "rwkv" (longest match, for char vocabularies)
    pre: str | None  # tokenizer.ggml.pre: llama.cpp's name for a BPE's split rule
    tokens: list[str]  # one per id, spelt as `model` wants
    types: list[int]
    merges: list[str]  # "left right", by rank


def llama_vocab(tokenizer: Any, vocab_size: int) -> LlamaVocab:
    """`tokenizer` as a llama.cpp vocabulary, or a UserError saying why llama.cpp could not tokenize like it."""
    if tokenizer.kind == "char":
        return _char_vocab(tokenizer.chars, vocab_size)
    rust = getattr(tokenizer, "tokenizer", None)
    if rust is None:
        raise UserError(f"the {tokenizer.kind} tokenizer cannot be written to GGUF; export a model trained with "
                        "--tokenizer char or bpe, or one imported from Hugging Face/GGUF")
    spec = json.loads(rust.to_str())
    pre = _llama_pre_tokenizer(spec)
    vocab = rust.get_vocab(with_added_tokens=True)
    tokens = [""] * max(vocab_size, len(vocab))
    for t, i in vocab.items():
        tokens[i] = t
    types = [TOKEN_NORMAL] * len(tokens)
    for i, t in rust.get_added_tokens_decoder().items():
        types[i] = TOKEN_CONTROL if t.special else TOKEN_USER_DEFINED
    for i, t in enumerate(tokens):
        if not t:  # ids past the tokenizer (vocab padded for speed): never produced by tokenizing, in llama.cpp too
            tokens[i], types[i] = f"[PAD{i}]", TOKEN_UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return LlamaVocab("gpt2", pre, tokens, types, merges)


def _llama_pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how this `tokenizers` BPE cuts text into words; UserError when it has none."""
    fix = ("; export --format hf instead (transformers keeps this tokenizer exactly), or retrain the tokenizer "
           "(new BPE tokenizers split text as GPT-2 does, which llama.cpp reproduces)")
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise UserError(f"llama.cpp reproduces byte-level BPE tokenizers only, not this {model.get('type')} one"
                        + fix)
    if spec.get("normalizer"):
        raise UserError(f"this tokenizer normalizes text first ({spec['normalizer'].get('type')}), which llama.cpp "
                        "does not" + fix)
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(step: dict[str, Any], use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    def split(step: dict[str, Any]) -> str | None:
        if step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            return step.get("pattern", {}).get("Regex")
        return None

    name = None
    if len(steps) == 1 and byte_level(steps[0], True):
        name = PRE_GPT2
    elif len(steps) == 2 and byte_level(steps[1], False) and split(steps[0]) == GPT2_SPLIT_PATTERN:
        name = PRE_GPT2
    elif (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
          and byte_level(steps[1], True)):
        name = PRE_DIGITS
    elif len(steps) == 2 and byte_level(steps[1], False) and split(steps[0]) == _LLAMA3_SPLIT:
        name = PRE_LLAMA3
    if name is None:
        what = ("splits words by nanophi's pre-2026-12-02 rule (GPT-2's regex without its \\s+(?!\\S) look-ahead)"
                if len(steps) == 2 and split(steps[0]) == LEGACY_BPE_SPLIT_PATTERN
                else f"splits words in a way no llama.cpp pre-tokenizer reproduces ({json.dumps(pre)[:120]})")
        raise UserError(f"this BPE tokenizer {what}, so llama.cpp would tokenize text differently" + fix)
    # llama.cpp's Llama-3 rule takes a word that is itself a token whole ("ignore_merges"); the others never do
    if bool(model.get("ignore_merges")) != (name == PRE_LLAMA3):
        raise UserError(f"this tokenizer's ignore_merges={bool(model.get('ignore_merges'))} differs from llama.cpp's "
                        f"{name!r} pre-tokenizer" + fix)
    return name


def _char_vocab(chars: list[str], vocab_size: int) -> LlamaVocab:
    """A char vocabulary in llama.cpp's "rwkv" form: it tokenizes by the longest token that matches the text's
    bytes, and a character's UTF-8 bytes are never the start of another's, so it picks exactly one token per
    character, as nanophi does. Its special tokens default to none, so llama.cpp (like nanophi) never stops
    generating at a character; a BPE form would make id 11, some character, its end-of-text token. llama.cpp
    gives a character outside the vocabulary id -1, nanophi an error."""
    escapes = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}  # rwkv's token spelling (llama-vocab.cpp)

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    tokens = [escape(ch) for ch in chars]
    # ids past the vocabulary: bytes 0xff 0xfe never occur in UTF-8 text, so no text matches these
    tokens += [f"\\xff\\xfe[PAD{i}]" for i in range(len(chars), vocab_size)]
    types = [TOKEN_NORMAL] * len(chars) + [TOKEN_UNUSED] * (len(tokens) - len(chars))
    return LlamaVocab("rwkv", None, tokens, types, [])


def add_tokenizer(w: Any, tokenizer: Any, vocab: LlamaVocab) -> None:
    """Write `tokenizer` into the GGUF being written by `w` (a gguf.GGUFWriter): nanophi's own keys, which give
    it back exactly, and llama.cpp's, in the form `vocab` (from `llama_vocab`) says."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nanophi-tok-") as d:
        tokenizer.save(Path(d))
        w.add_string(NANOPHI_TOKENIZER_KEY, (Path(d) / "tokenizer_config.json").read_text())
    if tokenizer.kind == "char":
        w.add_array(NANOPHI_CHARS_KEY, list(tokenizer.chars))  # nanophi reads its CharTokenizer back from this
    else:
        w.add_string(HF_JSON_KEY, tokenizer.tokenizer.to_str())
    # llama.cpp's own vocabulary keys, so llama.cpp (and transformers' GGUF loader) tokenize as nanophi does
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_token_merges(vocab.merges)
    for key, tid in (("bos", getattr(tokenizer, "bos_id", None)), ("eos", getattr(tokenizer, "eos_id", None))):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    # nanophi's encode never adds special tokens and its models were trained that way: say so, or llama.cpp's
    # tools (llama-cli, Ollama) fall back to their vocabulary type's default and may prepend a BOS
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
