"""Real pretrained weights in and out of nanophi's GPT, without transformers at run time.

    gguf.py   llama.cpp's GGUF files: read (dequantize, undo the rotary row permutation, rebuild the tokenizer
              from metadata) and write (F32/F16, llama.cpp tensor names, readable by llama.cpp and transformers)
    hf.py     Hugging Face checkpoint directories (config.json + *.safetensors + tokenizer.json): GPT-2 and
              Llama families in, and out (`AutoModelForCausalLM.from_pretrained` loads what we write)

Both import into the same place: a nanophi state dict (GPT-2 parameter names; Llama's q/k/v and gate/up
matrices stacked into `c_attn` and `c_fc`) and a `GPTConfig`, which `build_model` turns into a `GPT`.
"""

from __future__ import annotations

from typing import Callable

import torch

from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig, Rotary

# Imported models keep at most this many positions unless asked for more: nanophi allocates rotary tables and
# the KV cache per position, and SmolLM2's 8192 would cost memory for contexts nobody uses on a CPU.
DEFAULT_MAX_CONTEXT = 2048


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], source: str) -> GPT:
    """A GPT holding exactly `state` (fp32, eval mode). Built on the meta device first: a random init of a
    135M-parameter model costs a second and would be overwritten anyway."""
    with torch.device("meta"):
        model = GPT(config)
    expected = {k for k in model.state_dict() if not (k == "lm_head.weight" and config.tie_embeddings)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{source} does not match a nanophi GPT: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, t in model.state_dict().items():
        if name in state and tuple(state[name].shape) != tuple(t.shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                            f"the config implies {tuple(t.shape)}; the file's metadata and tensors disagree")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # `assign` replaced the shared Parameter
    if model.rotary is not None:  # buffers derived from the config were created on meta too
        model.rotary = Rotary(config.head_dim, config.block_size, config.rope_theta)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left uninitialised: {leftover}"
    return model.eval()


def llama_blocks_to_nanophi(
    get: Callable[[str], torch.Tensor], n_layer: int, names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The per-block tensors of a Llama-family model, under nanophi names. `names` maps the roles
    q k v o gate up down attn_norm mlp_norm to format-specific patterns with `{i}` for the block index."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n_layer):
        t = {role: get(pattern.format(i=i)) for role, pattern in names.items()}
        p = f"transformer.h.{i}."
        out[p + "attn.c_attn.weight"] = torch.cat([t["q"], t["k"], t["v"]], dim=0)  # [q; k; v] rows
        out[p + "attn.c_proj.weight"] = t["o"]
        out[p + "mlp.c_fc.weight"] = torch.cat([t["gate"], t["up"]], dim=0)  # [gate; up], as MLP splits it
        out[p + "mlp.c_proj.weight"] = t["down"]
        out[p + "ln_1.weight"] = t["attn_norm"]
        out[p + "ln_2.weight"] = t["mlp_norm"]
    return out


def nanophi_blocks_to_llama(state: dict[str, torch.Tensor], config: GPTConfig) -> list[dict[str, torch.Tensor]]:
    """The inverse of `llama_blocks_to_nanophi`: per block, role -> tensor (biases under `role + '_bias'`)."""
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    blocks = []
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        q, k, v = state[p + "attn.c_attn.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = state[p + "mlp.c_fc.weight"].chunk(2, dim=0)
        b = dict(q=q, k=k, v=v, o=state[p + "attn.c_proj.weight"], gate=gate, up=up,
                 down=state[p + "mlp.c_proj.weight"], attn_norm=state[p + "ln_1.weight"],
                 mlp_norm=state[p + "ln_2.weight"])
        if config.bias:
            b["q_bias"], b["k_bias"], b["v_bias"] = state[p + "attn.c_attn.bias"].split([q_rows, kv_rows, kv_rows])
            b["gate_bias"], b["up_bias"] = state[p + "mlp.c_fc.bias"].chunk(2)
            b["o_bias"], b["down_bias"] = state[p + "attn.c_proj.bias"], state[p + "mlp.c_proj.bias"]
        blocks.append(b)
    return blocks


def family(config: GPTConfig, target: str) -> str:
    """'gpt2' or 'llama': the standard architecture a nanophi config is an instance of, or a UserError naming
    the switch that `target` (a format) cannot express."""
    if config.qk_norm:
        raise UserError(f"{target} cannot express qk_norm=True (no QK-norm in GPT-2 or Llama); export is limited "
                        "to models with the gpt2 or llama preset's switches")
    if config.logit_softcap is not None:
        raise UserError(f"{target} cannot express logit_softcap={config.logit_softcap} (GPT-2 and Llama have no "
                        "logit soft-capping)")
    if config.pos == "learned":
        wanted = {"norm": "layernorm", "mlp": "gelu"}
        name = "gpt2"
    else:
        wanted = {"norm": "rmsnorm", "mlp": "swiglu"}
        name = "llama"
    for switch, value in wanted.items():
        if getattr(config, switch) != value:
            raise UserError(f"{target} cannot express {switch}={getattr(config, switch)!r} with pos={config.pos!r}: "
                            f"{'GPT-2' if name == 'gpt2' else 'Llama'} uses {switch}={value!r}")
    return name
