"""GGUF (llama.cpp's single-file format) <-> nanophi.

Reading: a small header parser of our own (the `gguf` package's GGUFReader builds a numpy view per string and
takes seconds on SmolLM2's 98k vocabulary strings; this takes a fraction of one), quantized tensors dequantized by
`gguf.quants.dequantize` (Q4_0, Q4_1, Q8_0, the K-quants ...).

Two llama.cpp conventions are undone on the way in:
- Q and K rows of Llama models are permuted: llama.cpp applies rotary to interleaved pairs (x0,x1),(x2,x3)...
  while HF and nanophi rotate halves (x_i, x_{i+d/2}), so its converter reorders each head's rows. We invert it.
- The vocabulary is stored as metadata (tokens, merges, token types); we rebuild a `tokenizers` byte-level BPE
  that splits text as llama.cpp does for the pre-tokenizer the file names (`tokenizer.ggml.pre`).

Writing (`write_gguf`) applies the same conventions in reverse, so llama.cpp and transformers can read the file,
and writes only vocabularies llama.cpp tokenizes exactly as nanophi does (tests/test_llamacpp.py checks it against
llama-cpp-python 0.3.36): byte-level BPE whose split rule llama.cpp has a name for ("gpt-2", "smollm",
"llama-bpe"), and char vocabularies in llama.cpp's "rwkv" form. Anything else is refused with the reason.
nanophi also stores its own config and tokenizer as extra keys, so a nanophi model round-trips exactly.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanophi.convert import DEFAULT_MAX_CONTEXT, build_model, family, llama_blocks_to_nanophi, nanophi_blocks_to_llama
from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig
from nanophi.convert.gguf_vocab import add_tokenizer, llama_vocab, tokenizer_from_metadata

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
NANOPHI_CONFIG_KEY = "nanophi.config"  # JSON of the GPTConfig: exact round trips of nanophi's own exports

# ggml tensor types (ggml.h) that hold plain floats
F32, F16, BF16 = 0, 1, 30
# GGUF metadata value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# llama.cpp tensor names per nanophi role, for the two architectures nanophi can express
_LLAMA_NAMES = dict(q="blk.{i}.attn_q.weight", k="blk.{i}.attn_k.weight", v="blk.{i}.attn_v.weight",
                    o="blk.{i}.attn_output.weight", gate="blk.{i}.ffn_gate.weight", up="blk.{i}.ffn_up.weight",
                    down="blk.{i}.ffn_down.weight", attn_norm="blk.{i}.attn_norm.weight",
                    mlp_norm="blk.{i}.ffn_norm.weight")
_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


# ---------------------------------------------------------------------------------------------------------------
# reading the file


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (rows first), the reverse of ggml's ne[]
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int
    _buf: Any = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (uint8, flat, zero-copy from the memory map)."""
        info = self.tensors[name]
        start = self.data_start + info.offset
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=start)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to fp32, in torch layout."""
        if name not in self.tensors:
            raise UserError(f"{self.path} has no tensor {name!r}; is it a complete {self.architecture} model?")
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)


class _Cursor:
    """Reads little-endian GGUF values from a buffer, front to back."""

    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            if item_type in _NUMPY:  # numeric arrays in one go
                arr = np.frombuffer(self.buf, dtype=_NUMPY[item_type], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(item_type) for _ in range(n)]
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        raise UserError(f"unknown GGUF metadata value type {vtype}: the file is corrupt or from a newer GGUF version")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory; tensor data stays memory-mapped until asked for."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read GGUF file {path}: {e}") from None
    if buf[:4] != MAGIC:
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        c = _Cursor(buf)
        c.pos = 4
        version = c.scalar("<I")
        if version not in (2, 3):
            raise UserError(f"{path} is GGUF version {version}; nanophi reads versions 2 and 3 "
                            "(a big-endian file also shows up here: convert it on a little-endian machine)")
        n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.scalar("<I"))
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = c.string()
            ne = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
            ggml_type, offset = c.scalar("<I"), c.scalar("<Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise UserError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
            n = int(np.prod(ne)) if ne else 1
            tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, offset, n // block * type_size)
    except struct.error:
        raise UserError(f"{path} is truncated or corrupt (its header ends early)") from None
    align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = (c.pos + align - 1) // align * align
    end = max((t.offset + t.nbytes for t in tensors.values()), default=0)
    if data_start + end > len(buf):
        raise UserError(f"{path} is truncated: its tensors need {data_start + end} bytes, the file has {len(buf)}")
    return GGUFFile(path, metadata, tensors, data_start, buf)


# ---------------------------------------------------------------------------------------------------------------
# dequantization


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes -> fp32 tensor of `shape`. Plain float types are reinterpreted; block-quantized ones (values
    in blocks of 32 along each row with an fp16 scale, e.g. Q8_0 x = d*q, Q4_1 x = d*q + m) go through
    `gguf.quants.dequantize`, in numpy: single-threaded, it stays fast when other processes load the CPU."""
    if ggml_type == F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if ggml_type == F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32).reshape(shape))
    if ggml_type == BF16:  # numpy has no bfloat16: widen the 16 bits into the top half of a float32
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape))
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    try:
        out = gguf_dequantize(raw.reshape(-1, shape[-1] // block * type_size), qtype)
    except NotImplementedError:
        raise UserError(f"cannot dequantize ggml type {qtype.name}; requantize the model to Q8_0, Q4_1 or F16") \
            from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> nanophi


def load_gguf(path: str | Path, max_context: int | None = DEFAULT_MAX_CONTEXT) -> tuple[GPT, Any]:
    """(model, tokenizer) from a GGUF file. `max_context` caps block_size (None: the file's full context)."""
    f = read_gguf(path)
    config = config_from_metadata(f, max_context)
    model = build_model(config, state_from_gguf(f, config), str(f.path))
    return model, tokenizer_from_metadata(f.metadata, str(f.path))


def config_from_metadata(f: GGUFFile, max_context: int | None = DEFAULT_MAX_CONTEXT) -> GPTConfig:
    meta, arch = f.metadata, f.architecture
    if NANOPHI_CONFIG_KEY in meta:
        d = json.loads(meta[NANOPHI_CONFIG_KEY])
        if max_context is not None and d["pos"] == "rope":
            d["block_size"] = min(d["block_size"], max_context)
        return GPTConfig.from_dict(d)
    if arch not in ("llama", "gpt2"):
        raise UserError(f"{f.path} holds a {arch or 'unnamed'} model; nanophi imports GGUF models of the llama and "
                        "gpt2 architectures")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"{f.path} lacks metadata {arch}.{key}; the file is incomplete")
        return value

    if "token_embd.weight" not in f.tensors:
        raise UserError(f"{f.path} has no token_embd.weight tensor; is it a complete model?")
    vocab_size, n_embd = f.tensors["token_embd.weight"].shape
    n_head = int(get("attention.head_count"))
    context = int(get("context_length"))
    common = dict(n_layer=int(get("block_count")), n_head=n_head, n_embd=int(n_embd), vocab_size=int(vocab_size),
                  mlp_hidden=int(get("feed_forward_length")), tie_embeddings="output.weight" not in f.tensors,
                  dropout=0.0)
    if arch == "gpt2":
        # learned positions: the table has exactly `context` rows, and capping it would only drop rows
        return GPTConfig(**(_preset("gpt2") | common), block_size=context,
                         norm_eps=float(get("attention.layer_norm_epsilon")))
    head_dim = int(n_embd) // n_head
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{f.path} applies rotary to {meta['llama.rope.dimension_count']} of {head_dim} dims per "
                        "head (partial rotary); nanophi rotates whole heads")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and meta.get("llama.rope.scaling.factor", 1) != 1):
        raise UserError(f"{f.path} uses rope scaling {scaling!r}; nanophi implements plain rotary only")
    has_bias = "blk.0.attn_q.bias" in f.tensors
    return GPTConfig(**(_preset("llama") | common | {"bias": has_bias}),
                     block_size=min(context, max_context or context),
                     n_kv_head=int(get("attention.head_count_kv", n_head)),
                     rope_theta=float(get("rope.freq_base", 1e4)),
                     norm_eps=float(get("attention.layer_norm_rms_epsilon")))


def _preset(name: str) -> dict[str, Any]:
    from nanophi.model import PRESETS

    return dict(PRESETS[name])


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `permute` of Q/K rows: per head, interleaved-pair order -> rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): rotate-half row order -> interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def state_from_gguf(f: GGUFFile, config: GPTConfig) -> dict[str, torch.Tensor]:
    """A nanophi state dict from the file's tensors (llama.cpp names and layouts)."""
    arch = f.architecture
    state = {"transformer.wte.weight": f.tensor("token_embd.weight"),
             "transformer.ln_f.weight": f.tensor("output_norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = f.tensor("output.weight")
    if arch == "gpt2":
        state["transformer.wpe.weight"] = f.tensor("position_embd.weight")[: config.block_size]
        state["transformer.ln_f.bias"] = f.tensor("output_norm.bias")
        for i in range(config.n_layer):
            for ours, theirs in _GPT2_NAMES.items():
                for kind in ("weight", "bias"):
                    state[f"transformer.h.{i}.{ours}.{kind}"] = f.tensor(f"blk.{i}.{theirs}.{kind}")
        if not config.bias:  # a nanophi export wrote zeros where GPT-2 needs biases and the model has none
            state = {k: v for k, v in state.items() if not k.endswith(".bias")}
        return state

    def get(name: str) -> torch.Tensor:
        w = f.tensor(name)
        if ".attn_q." in name:
            return unpermute_rotary(w, config.n_head)
        if ".attn_k." in name:
            return unpermute_rotary(w, config.n_kv_head)
        return w

    state |= llama_blocks_to_nanophi(get, config.n_layer, _LLAMA_NAMES)
    if config.bias:
        for i in range(config.n_layer):
            p = f"transformer.h.{i}."
            b = {r: get(f"blk.{i}.{n}.bias") for r, n in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                 ("o", "attn_output"), ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down"))}
            state[p + "attn.c_attn.bias"] = torch.cat([b["q"], b["k"], b["v"]])
            state[p + "attn.c_proj.bias"] = b["o"]
            state[p + "mlp.c_fc.bias"] = torch.cat([b["gate"], b["up"]])
            state[p + "mlp.c_proj.bias"] = b["down"]
    return state


# ---------------------------------------------------------------------------------------------------------------
# nanophi -> GGUF


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp names and layouts (fp32): exactly what `write_gguf` stores."""
    cfg = model.config
    arch = family(cfg, "GGUF")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["transformer.wte.weight"], "output_norm.weight": state["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    if arch == "gpt2":
        out["position_embd.weight"] = state["transformer.wpe.weight"]
        out["output_norm.bias"] = state.get("transformer.ln_f.bias", torch.zeros(cfg.n_embd))
        for i in range(cfg.n_layer):
            for ours, theirs in _GPT2_NAMES.items():
                w = state[f"transformer.h.{i}.{ours}.weight"]
                out[f"blk.{i}.{theirs}.weight"] = w
                # llama.cpp's gpt2 graph always adds biases: a bias-free nanophi model gets zeros (same output)
                out[f"blk.{i}.{theirs}.bias"] = state.get(f"transformer.h.{i}.{ours}.bias", torch.zeros(w.shape[0]))
        return out
    names = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
             "ffn_down": "down"}
    for i, b in enumerate(nanophi_blocks_to_llama(state, cfg)):
        b["q"], b["k"] = permute_rotary(b["q"], cfg.n_head), permute_rotary(b["k"], cfg.n_kv_head)
        if cfg.bias:
            b["q_bias"] = permute_rotary(b["q_bias"], cfg.n_head)
            b["k_bias"] = permute_rotary(b["k_bias"], cfg.n_kv_head)
        for theirs, role in names.items():
            out[f"blk.{i}.{theirs}.weight"] = b[role]
            if cfg.bias:
                out[f"blk.{i}.{theirs}.bias"] = b[role + "_bias"]
        out[f"blk.{i}.attn_norm.weight"] = b["attn_norm"]
        out[f"blk.{i}.ffn_norm.weight"] = b["mlp_norm"]
    return out


def write_gguf(model: GPT, tokenizer: Any, path: str | Path, dtype: str = "f32") -> Path:
    """Write `model` and `tokenizer` as a GGUF file. dtype f16 stores matrices in half precision (norms, biases
    and other vectors stay f32, as llama.cpp does)."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise UserError(f"GGUF export supports --dtype f32 or f16, not {dtype!r}")
    cfg = model.config
    arch = family(cfg, "GGUF")
    vocab = llama_vocab(tokenizer, cfg.vocab_size)  # before any file exists: it refuses what llama.cpp can't do
    tensors = gguf_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("nanophi")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_string(NANOPHI_CONFIG_KEY, json.dumps(cfg.to_dict()))
    add_tokenizer(w, tokenizer, vocab)
    for name, t in tensors.items():
        arr = t.numpy()
        w.add_tensor(name, arr.astype(np.float16) if dtype == "f16" and arr.ndim == 2 else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
