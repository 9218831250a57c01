"""The GPT: one module, read top to bottom, with GPT-2 and Llama style blocks behind explicit switches.

    GPTConfig -> RMSNorm/LayerNorm -> Rotary -> CausalSelfAttention -> MLP -> Block -> GPT

Parameter names follow GPT-2 (`transformer.wte`, `h.0.attn.c_attn`, `mlp.c_fc`, `lm_head`) so real GPT-2 and
Llama-family weights map onto this module by name (see `nanophi.convert`). Nothing here knows about devices,
precision or distributed training: the trainer applies those from outside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanophi.errors import UserError

if TYPE_CHECKING:
    from nanophi.kv_cache import KVCache

# The block switches' allowed values, written once: the field types below (which `nanophi train --pos` lists as
# choices) and the check in `GPTConfig.__post_init__` (which also guards configs read from files) both use them.
PosKind = Literal["learned", "rope"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu", "relu2"]
SWITCHES: dict[str, tuple[str, ...]] = {"pos": get_args(PosKind), "norm": get_args(NormKind), "mlp": get_args(MLPKind)}


@dataclass
class GPTConfig:
    """The model's shape. Fields double as `nanophi train` flags (`--n-layer` ...)."""

    n_layer: int = field(default=6, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=6, metadata={"help": "attention heads per block"})
    n_kv_head: int | None = field(
        default=None, metadata={"help": "key/value heads (grouped-query attention); default: n_head"}
    )
    n_embd: int = field(default=384, metadata={"help": "width of the residual stream"})
    block_size: int = field(default=256, metadata={"help": "context length in tokens"})
    vocab_size: int = field(default=0, metadata={"help": "set from the tokenizer; not a flag", "cli": False})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability (0 for small data is fine)"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorms"})
    pos: PosKind = field(default="learned", metadata={"help": "position encoding"})
    norm: NormKind = field(default="layernorm", metadata={"help": "normalisation"})
    mlp: MLPKind = field(default="gelu", metadata={"help": "MLP activation"})
    mlp_hidden: int | None = field(
        default=None, metadata={"help": "MLP hidden width; default 4*n_embd (gelu/relu2) or 8/3*n_embd (swiglu)"}
    )
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalise queries and keys per head"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share token embedding and output head"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary base frequency"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the norm layers"})
    zero_init_proj: bool = field(
        default=False, metadata={"help": "zero-init output projections (modded-nanogpt) instead of scaled normal"}
    )
    logit_softcap: float | None = field(
        default=None, metadata={"help": "cap logits with c*tanh(x/c) (modded-nanogpt); off by default"}
    )

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_layer < 1 or self.n_head < 1 or self.n_embd < 1 or self.block_size < 1:
            raise UserError("n_layer, n_head, n_embd and block_size must all be >= 1")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try --n-embd {self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if self.n_head % self.n_kv_head != 0:
            raise UserError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos == "rope" and self.head_dim % 2:
            raise UserError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in SWITCHES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {'|'.join(allowed)}, got {getattr(self, name)!r}")
        if self.mlp_hidden is None:
            # SwiGLU has three matrices instead of two; 8/3 keeps its parameter count equal to a 4x GELU MLP.
            self.mlp_hidden = 4 * self.n_embd if self.mlp != "swiglu" else _round_up(8 * self.n_embd // 3, 64)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# The two families later issues load real weights into. Values are the switches, not the sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, qk_norm=False),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=True, qk_norm=False),
}


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1, and GPT-2 needs bias=True)."""

    def __init__(self, ndim: int, bias: bool, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, ndim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Llama normalises in fp32 and casts back; under bf16 autocast this keeps the variance exact.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def make_norm(config: GPTConfig, ndim: int | None = None) -> nn.Module:
    ndim = ndim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(ndim, config.norm_eps)
    return LayerNorm(ndim, config.bias, config.norm_eps)


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer), in the 'rotate half' layout that HF Llama checkpoints use."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hs/2)
        # Non-persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for `rotate`, looked up once per forward and shared by every layer. positions: (T,) shared
        by the batch -> (T, hs) tables, or (B, T) per row (left-padded batches) -> (B, 1, T, hs)."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hs/2) or (B, T, hs/2)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs/2)
        # [x1*cos - x2*sin, x2*cos + x1*sin] as x*[cos, cos] + [x2, x1]*[-sin, sin]: two full-width products and
        # one cat of x per call instead of four half-width products and a cat of their results (same values)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, nh, T, hs), rotated in fp32 (bf16 angles would lose the positions' precision)."""
        cos, sin = tables
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.rotate(x, self.tables(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # queries, keys and values for all heads in one matmul; with GQA the k/v parts are narrower
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout

    def heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, nh, T, hs), k and v (B, nkv, T, hs), QK-normed and rotated: everything before the
        attention itself (diagnostics rebuild the attention weights from it, which fused attention never forms)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # Rotary.tables of this forward's positions
            q, k = Rotary.rotate(q, rope), Rotary.rotate(k, rope)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.heads(x, rope)
        if cache is not None:
            # append this step's keys/values and attend over everything cached so far
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs)
            mask = cache.attn_mask(T)  # (B, 1, T, S) additive (0 / -inf), or None when nothing is hidden
            is_causal = False
        else:
            mask, is_causal = None, True
        # each k/v head serves n_head // n_kv_head query heads. Decoding lets SDPA share them (enable_gqa: no
        # copy of the cache per step, 4x faster attention at batch 32 on CPU); training keeps the explicit copy,
        # which every backend supports with a fused kernel.
        gqa = cache is not None and self.n_kv_head != self.n_head
        if self.n_kv_head != self.n_head and not gqa:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_grad_enabled():
            # CPU flash attention's backward is ~4.5x slower in bf16 than fp32 (torch 2.13), which cost more than
            # bf16 matmuls save; attention is a small share of the FLOPs, so a differentiated one runs in fp32.
            # Without grad (eval, generation) bf16 flash attention is the faster one and is left alone.
            with torch.autocast(device_type="cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                   is_causal=is_causal, dropout_p=dropout_p, enable_gqa=gqa)
            y = y.to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                               enable_gqa=gqa)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections live in one matrix: [gate; up], split after the matmul
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        # an identity with no weights: a named point where a forward hook sees the hidden activations (the
        # diagnostics count dead units there); the state dict is unchanged
        self.act = nn.Identity()
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            r = F.relu(h)
            h = r * r  # not .square(): pow's backward is ~4x slower on CPU than mul's, same values
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        h = self.act(h)  # (B, T, hidden)
        return F.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size < 1:
            raise UserError("vocab_size must be set from the tokenizer before building the model")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.rotary = Rotary(config.head_dim, config.block_size, config.rope_theta) if config.pos == "rope" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (Press & Wolf 2017): the output head reuses the token embedding
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every tensor (GPT-2 scheme):

        - Linear weights and embeddings: normal(0, 0.02); biases: 0; norm weights: 1, norm biases: 0.
        - Residual output projections (`attn.c_proj`, `mlp.c_proj`): normal(0, 0.02 / sqrt(2 * n_layer)) so the
          residual stream's variance does not grow with depth, or exactly 0 when `zero_init_proj` is set.
        - An untied `lm_head`: normal(0, 0.02), or 0 with `zero_init_proj` (modded-nanogpt starts from uniform logits).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if self.config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer), generator=gen)
            elif name == "lm_head.weight" and self.config.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=gen)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. Tied weights count once; learned position embeddings are excluded by default
        (as in nanoGPT), because they cost no matmul FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM appendix B: 6N for the matmuls, forward and backward, plus
        12 * L * n_head * head_dim * T for attention scores and their weighted sum."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True)
        if not cfg.tie_embeddings:
            # an untied input embedding is a lookup, not a matmul; the output head is a matmul and stays
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        With targets: logits for every position and the mean cross-entropy (ignore_index -1 masks positions).
        Without: logits of the last position only (B, 1, V), which is all sampling needs, unless `all_logits`.
        With a KV cache, positions continue from what the cache already holds.
        """
        B, T = idx.size()
        if cache is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
            positions = torch.arange(T, device=idx.device)  # (T,)
        else:
            positions = cache.positions(T)  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        rope = self.rotary.tables(positions) if self.rotary is not None else None
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, i)
        if cache is not None:
            cache.advance(T)
        x = self.transformer.ln_f(x)
        if targets is None and not all_logits:
            x = x[:, [-1], :]  # only forward the lm_head on the very last position
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits / c)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
