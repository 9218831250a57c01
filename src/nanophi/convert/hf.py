"""Hugging Face checkpoint directories <-> nanophi, for the GPT-2 and Llama families. No transformers needed.

    DIR/config.json                        model_type gpt2 | llama, sizes, eps, rope theta, tying
    DIR/model.safetensors                  (or sharded: model.safetensors.index.json + shards; or pytorch_model.bin)
    DIR/tokenizer.json                     a `tokenizers` tokenizer (or GPT-2's vocab.json + merges.txt)
    DIR/tokenizer_config.json              chat template, bos/eos tokens (chat_template.jinja also read)

Layout differences handled here:
- GPT-2 stores its projections as `Conv1D` weights, (in, out): transposed relative to nn.Linear's (out, in).
- Llama keeps q/k/v and gate/up as separate matrices; nanophi stacks them into `c_attn` and `c_fc`.
- HF Llama checkpoints are already in the rotate-half layout nanophi uses (unlike GGUF): no row permutation.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanophi.checkpoint import read_json, save_safetensors, write_json
from nanophi.convert import DEFAULT_MAX_CONTEXT, build_model, family, llama_blocks_to_nanophi, nanophi_blocks_to_llama
from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig, PRESETS

log = logging.getLogger(__name__)

SUPPORTED = ("gpt2", "llama", "mistral")
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_BLOCK = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
_LLAMA_NAMES = dict(q="layers.{i}.self_attn.q_proj.weight", k="layers.{i}.self_attn.k_proj.weight",
                    v="layers.{i}.self_attn.v_proj.weight", o="layers.{i}.self_attn.o_proj.weight",
                    gate="layers.{i}.mlp.gate_proj.weight", up="layers.{i}.mlp.up_proj.weight",
                    down="layers.{i}.mlp.down_proj.weight", attn_norm="layers.{i}.input_layernorm.weight",
                    mlp_norm="layers.{i}.post_attention_layernorm.weight")
_LLAMA_BIASES = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                     gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))


# ---------------------------------------------------------------------------------------------------------------
# HF -> nanophi


def load_hf_dir(path: str | Path, max_context: int | None = DEFAULT_MAX_CONTEXT) -> tuple[GPT, Any]:
    """(model, tokenizer) from a Hugging Face checkpoint directory."""
    path = Path(path)
    hf = read_json(path / "config.json")
    if not isinstance(hf, dict):
        raise UserError(f"{path / 'config.json'} must be a JSON object (a Hugging Face model config), "
                        f"got {type(hf).__name__}")
    try:
        config = config_from_hf(hf, max_context, str(path))
        from nanophi.config import check_model

        check_model(config)
    except KeyError as e:
        raise UserError(f"{path / 'config.json'} lacks {e.args[0]!r}; it is incomplete or not a "
                        f"{hf.get('model_type')} config") from None
    except (TypeError, ValueError) as e:  # a value of the wrong JSON type where a size was expected
        raise UserError(f"{path / 'config.json'} has a value of the wrong type ({e}); fix the file") from None
    except UserError as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    state = state_from_hf(hf["model_type"], read_weights(path), config, str(path))
    return build_model(config, state, str(path)), load_hf_tokenizer(path, hf)


def config_from_hf(hf: dict[str, Any], max_context: int | None = DEFAULT_MAX_CONTEXT, source: str = "") -> GPTConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"{source}: model_type {kind!r} is not supported; nanophi imports {', '.join(SUPPORTED)}")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{source}: activation {act!r}; nanophi's GPT-2 MLP uses the tanh GELU ('gelu_new')")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise UserError(f"{source}: non-standard attention scaling; nanophi scales by 1/sqrt(head_dim)")
        n_embd = hf["n_embd"]
        return GPTConfig(**PRESETS["gpt2"] | dict(
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"], mlp_hidden=hf.get("n_inner") or 4 * n_embd,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True)))
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise UserError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads; not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf['hidden_act']!r}; nanophi's SwiGLU uses silu")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise UserError(f"{source}: attention_bias != mlp_bias; nanophi has one `bias` switch for all linear layers")
    if kind == "mistral" and hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < min(
            hf.get("max_position_embeddings", 0), max_context or 1 << 30):
        raise UserError(f"{source}: sliding-window attention ({hf['sliding_window']}) is not implemented in nanophi")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{source}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not implemented")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    context = hf.get("max_position_embeddings", 2048)
    return GPTConfig(**PRESETS["llama"] | dict(
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd, block_size=min(context, max_context or context), vocab_size=hf["vocab_size"],
        mlp_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        bias=bool(hf.get("attention_bias", False)), tie_embeddings=hf.get("tie_word_embeddings", False)))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: single or sharded safetensors, else a (weights-only) torch .bin."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    from safetensors import SafetensorError

    def load(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file))
        except FileNotFoundError:
            raise UserError(f"{file} is missing; the model directory is incomplete") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file} is corrupt ({e}); download or export it again") from None

    if (path / "model.safetensors").exists():
        return load(path / "model.safetensors")
    if index.exists():
        weight_map = read_json(index).get("weight_map") if isinstance(read_json(index), dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} must hold a \"weight_map\" object of tensor -> shard file names")
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out |= load(path / shard)
        return out
    if (path / "pytorch_model.bin").exists():
        # Only tensors are unpickled (weights_only): a .bin holding anything else could run code when loaded.
        import warnings

        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it is about to refuse
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for foreign objects; RuntimeError/EOFError/... for a damaged file
            import pickle

            why = ("it holds pickled objects other than tensors" if isinstance(e, pickle.UnpicklingError)
                   else f"it is damaged or not a torch file ({type(e).__name__})")
            raise UserError(f"{path / 'pytorch_model.bin'} cannot be loaded as plain tensors: {why}, and nanophi "
                            "never unpickles code; convert it to model.safetensors where you trust it "
                            "(transformers' save_pretrained(..., safe_serialization=True))") from None
    raise UserError(f"{path} has no model.safetensors (or shards, or pytorch_model.bin)")


def state_from_hf(
    kind: str, tensors: dict[str, torch.Tensor], config: GPTConfig, source: str = ""
) -> dict[str, torch.Tensor]:
    """A nanophi state dict from HF tensor names (with or without the `transformer.`/`model.` prefix)."""
    def get(name: str) -> torch.Tensor:
        for candidate in (name, f"transformer.{name}", f"model.{name}"):
            if candidate in tensors:
                return tensors[candidate]
        raise UserError(f"{source}: tensor {name!r} is missing; the checkpoint is incomplete or not a {kind} model")

    if kind == "gpt2":
        state = {"transformer.wte.weight": get("wte.weight"), "transformer.wpe.weight": get("wpe.weight"),
                 "transformer.ln_f.weight": get("ln_f.weight"), "transformer.ln_f.bias": get("ln_f.bias")}
        for i in range(config.n_layer):
            for part in _GPT2_BLOCK:
                for kind_ in ("weight", "bias"):
                    name = f"h.{i}.{part}.{kind_}"
                    t = get(name)
                    state[f"transformer.{name}"] = t.t() if f"{part}.{kind_}" in _GPT2_CONV1D else t
        if not config.tie_embeddings:
            state["lm_head.weight"] = get("lm_head.weight") if "lm_head.weight" in tensors else get("wte.weight")
        return state
    state = {"transformer.wte.weight": get("embed_tokens.weight"), "transformer.ln_f.weight": get("norm.weight")}
    state |= llama_blocks_to_nanophi(get, config.n_layer, _LLAMA_NAMES)
    if config.bias:
        for i in range(config.n_layer):
            b = {r: get(f"layers.{i}.{n}.bias") for r, n in _LLAMA_BIASES.items()}
            p = f"transformer.h.{i}."
            state[p + "attn.c_attn.bias"] = torch.cat([b["q"], b["k"], b["v"]])
            state[p + "attn.c_proj.bias"] = b["o"]
            state[p + "mlp.c_fc.bias"] = torch.cat([b["gate"], b["up"]])
            state[p + "mlp.c_proj.bias"] = b["down"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = get("lm_head.weight")
    return state


def load_hf_tokenizer(path: Path, hf_config: dict[str, Any] | None = None) -> Any:
    """nanophi's HFTokenizer for a checkpoint directory, with its chat template and BOS/EOS ids."""
    from tokenizers import Tokenizer as RustTokenizer

    from nanophi.tokenizer import HFTokenizer

    if (path / "tokenizer.json").exists():
        rust = RustTokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
        rust = _gpt2_style_bpe(path)
    else:
        raise UserError(f"{path} has no tokenizer.json (nor vocab.json + merges.txt); copy the model's tokenizer "
                        "files into it")
    tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is for chat
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")

    def token_id(key: str) -> int | None:
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok is not None and rust.token_to_id(tok) is not None:
            return rust.token_to_id(tok)
        value = (hf_config or {}).get(f"{key}_id")
        return value[0] if isinstance(value, list) else value

    return HFTokenizer(rust, chat_template=template, bos_id=token_id("bos_token"), eos_id=token_id("eos_token"))


def _gpt2_style_bpe(path: Path) -> Any:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = RustTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# ---------------------------------------------------------------------------------------------------------------
# nanophi -> HF


def hf_config(config: GPTConfig, tokenizer: Any = None) -> dict[str, Any]:
    """config.json for the HF model class that computes exactly what `config` does."""
    arch = family(config, "a Hugging Face export")
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    if arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.mlp_hidden,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": config.tie_embeddings,
                "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
            "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            # rope_theta for transformers 4.x, rope_parameters for 5.x
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "hidden_act": "silu", "attention_bias": config.bias, "mlp_bias": config.bias,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": bos, "eos_token_id": eos,
            "torch_dtype": "float32"}


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under HF names and layouts (a tied head is left to HF to tie)."""
    cfg = model.config
    arch = family(cfg, "a Hugging Face export")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        for name, t in state.items():
            if name == "lm_head.weight":
                continue
            part = name.removeprefix("transformer.")
            out[f"transformer.{part}"] = t.t() if part.split(".", 2)[-1] in _GPT2_CONV1D else t
        if not cfg.bias:  # GPT2LMHeadModel always has biases: zeros compute the same as none
            for name, t in list(out.items()):
                if name.endswith(".weight") and ("ln_" in name or "c_" in name):
                    dim = t.shape[-1] if "c_" in name else t.shape[0]  # Conv1D (in, out): the bias has `out`
                    out[name.removesuffix("weight") + "bias"] = torch.zeros(dim, dtype=t.dtype)
    else:
        out["model.embed_tokens.weight"] = state["transformer.wte.weight"]
        out["model.norm.weight"] = state["transformer.ln_f.weight"]
        for i, b in enumerate(nanophi_blocks_to_llama(state, cfg)):
            for role, pattern in _LLAMA_NAMES.items():
                out["model." + pattern.format(i=i)] = b[role]
            if cfg.bias:
                for role, name in _LLAMA_BIASES.items():
                    out[f"model.layers.{i}.{name}.bias"] = b[role + "_bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def export_hf(model: GPT, tokenizer: Any, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write DIR/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json}
    that `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load."""
    out = Path(out)
    config = hf_config(model.config, tokenizer)  # raises first if the model has no HF equivalent
    tokenizer_files = hf_tokenizer_files(tokenizer, model.config.block_size)
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_safetensors({k: v.to(dtype) for k, v in hf_state_dict(model).items()}, out / "model.safetensors",
                     metadata={"format": "pt"})
    write_json(out / "config.json", config, sort_keys=False)  # HF's own key order
    write_json(out / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id")
                                                if config.get(k) is not None}, sort_keys=False)
    for name, text in tokenizer_files.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def hf_tokenizer_files(tokenizer: Any, max_length: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json that make HF's tokenizer produce nanophi's ids.

    A char tokenizer becomes a WordLevel model over its characters, with a pre-tokenizer that isolates every
    character and a Fuse decoder (no spaces between tokens): same ids, same text back. Like nanophi's char
    tokenizer, it refuses characters outside the vocabulary (an error, not an [UNK] id)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    if tokenizer.kind == "char":
        rust = RustTokenizer(models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}))
        rust.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        rust.decoder = decoders.Fuse()
    elif getattr(tokenizer, "tokenizer", None) is not None:
        rust = tokenizer.tokenizer
    else:
        raise UserError(f"the {tokenizer.kind} tokenizer cannot be exported to Hugging Face format; export a model "
                        "trained with --tokenizer char or bpe, or one imported from Hugging Face/GGUF")
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                          "model_max_length": max_length, "add_bos_token": False, "add_eos_token": False}
    for key in ("bos", "eos"):
        tid = getattr(tokenizer, f"{key}_id", None)
        if tid is not None:
            tc[f"{key}_token"] = rust.id_to_token(tid)
    if getattr(tokenizer, "chat_template", None):
        tc["chat_template"] = tokenizer.chat_template
    with tempfile.TemporaryDirectory(prefix="nanophi-tok-") as d:
        rust.save(f"{d}/tokenizer.json")
        text = Path(d, "tokenizer.json").read_text(encoding="utf-8")
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(tc, indent=2, ensure_ascii=False) + "\n"}
