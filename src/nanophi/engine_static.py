"""The CPU engine's one-token decode step, with as few operator calls per layer as the model allows.

    step = DecodeStep(engine_model)          # the engine's decode copy (StreamingLinear / QuantLinear / fbgemm)
    logits = step(next_ids, cache)           # (B,) ids -> (B, V) logits; the cache advances by one slot

Decoding one stream on a CPU reads every weight once per token, so the matmuls are bound by memory traffic; what
is left is the ~40 small operators per layer around them, each paying PyTorch's dispatch, and on a 2-core host
that overhead was ~14 ms of a ~25 ms int4 token (docs/experiments.md, 2026-12-02). This step computes what
`GPT.forward` computes for one new token, with fewer calls:

  - the rotary tables are looked up once per token; queries and keys of a layer are rotated together;
  - the residual adds ride on the output projections (`addmm`), the norms are single fused calls;
  - keys and values are written into the preallocated cache in place; attention reads a view of its filled part;
  - nn.Module calls are gone: each linear layer is one closure over its tensors (`linear_fn`).

The model itself stays the reference: tests/test_engine.py checks this step's logits against `GPT.forward` with
a KV cache for every architecture switch, and the engine's greedy tokens against fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from nanophi.kv_cache import KVCache
from nanophi.model import GPT, RMSNorm

__all__ = ["DecodeStep", "linear_fn"]

# (B, in) fp32 rows -> (B, out) fp32 rows; `residual` variants add the product to x in the same call
Matmul = Callable[[torch.Tensor], torch.Tensor]
Residual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
INT4_GROUP = 32  # QuantLinear.GROUP; kept here so this module needs nothing from quantize.py


def linear_fn(module: torch.nn.Module) -> tuple[Matmul, Residual]:
    """A linear layer of the engine's decode copy as two closures: y = x W^T + b, and x_res + (x W^T + b).

    The layer kinds are told apart by their tensors, not their classes (nanophi.quantize defines them and
    this module): `weight_t` is StreamingLinear's (in, out) fp32 matrix, `weight_q` QuantLinear's packed 4- or
    8-bit codes, `_packed_params` fbgemm's dynamic int8 Linear. Anything else is called as a module."""
    bias = getattr(module, "bias", None)
    bias = bias() if callable(bias) else bias  # fbgemm's Linear has a bias() method; its bias is packed anyway
    if hasattr(module, "weight_t"):
        w = module.weight_t
        if bias is None:
            return (lambda x: torch.mm(x, w)), (lambda r, x: torch.addmm(r, x, w))
        return (lambda x: torch.addmm(bias, x, w)), (lambda r, x: torch.addmm(r, x, w).add_(bias))
    if hasattr(module, "weight_q"):
        wq, sz = module.weight_q, module.scale_zero
        if module.bits == 4:
            def mm(x: torch.Tensor) -> torch.Tensor:
                return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), wq, INT4_GROUP, sz)
        else:
            def mm(x: torch.Tensor) -> torch.Tensor:
                return torch._weight_int8pack_mm(x.to(torch.bfloat16), wq, sz)
        if bias is None:  # fp32 + bf16 promotes to fp32: the add is also the cast back
            return (lambda x: mm(x).float()), (lambda r, x: r + mm(x))
        return (lambda x: mm(x).float().add_(bias)), (lambda r, x: (r + mm(x)).add_(bias))
    if hasattr(module, "_packed_params"):
        packed = module._packed_params._packed_params
        reduce_range = module.version is not None and module.version >= 4  # what its forward passes

        def mm(x: torch.Tensor) -> torch.Tensor:  # the bias is inside the packed weights
            return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=reduce_range)
        return mm, (lambda r, x: r + mm(x))
    return (lambda x: module(x)), (lambda r, x: r + module(x))


@dataclass
class _Layer:
    norm_1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Matmul
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None
    out_res: Residual
    norm_2: Callable[[torch.Tensor], torch.Tensor]
    fc: Matmul
    proj_res: Residual


def _norm_fn(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """One fused call; the model's RMSNorm casts to fp32 and back, a no-op on the fp32 residual stream."""
    w, eps = norm.weight, norm.eps
    if isinstance(norm, RMSNorm):
        return lambda x: F.rms_norm(x, w.shape, w, eps)
    b = norm.bias
    return lambda x: F.layer_norm(x, w.shape, w, b, eps)


class DecodeStep:
    """`GPT.forward(ids[:, None], cache=cache)[0][:, -1]` for a CPU engine in fp32 activations, with fewer
    operator calls (module docstring). It reads the model's tensors, so it must be built after the engine's
    decode copy and serves only that copy."""

    def __init__(self, model: GPT) -> None:
        cfg = model.config
        self.config = cfg
        self.nh, self.nkv, self.hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wte = model.transformer.wte.weight
        self.wpe = model.transformer.wpe.weight if "wpe" in model.transformer else None
        self.rotary = model.rotary
        self.layers = []
        for block in model.transformer.h:
            attn, mlp = block.attn, block.mlp
            self.layers.append(_Layer(
                norm_1=_norm_fn(block.ln_1), qkv=linear_fn(attn.c_attn)[0],
                q_norm=_norm_fn(attn.q_norm) if attn.q_norm is not None else None,
                k_norm=_norm_fn(attn.k_norm) if attn.k_norm is not None else None,
                out_res=linear_fn(attn.c_proj)[1], norm_2=_norm_fn(block.ln_2), fc=linear_fn(mlp.c_fc)[0],
                proj_res=linear_fn(mlp.c_proj)[1]))
        self.mlp = cfg.mlp
        self.hidden = cfg.mlp_hidden
        self.ln_f = _norm_fn(model.transformer.ln_f)
        self.head = linear_fn(model.lm_head)[0]
        self.softcap = cfg.logit_softcap

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (B,) -> logits (B, V) of the next token; writes this token's keys and values into `cache`."""
        B, nh, nkv, hs = ids.size(0), self.nh, self.nkv, self.hs
        assert cache.free >= 1, "KV cache full: the engine refills it before a decode step"
        pos = cache.pos
        positions = cache.positions(1)[:, 0]  # (B,) counted from each row's first real token
        x = F.embedding(ids, self.wte)  # (B, C)
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        rot = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(positions)  # (B, hs): one position per row
            rot = cos[:, None], sin[:, None]  # (B, 1, hs): every head of every layer
        mask = cache.attn_mask(1)  # None unless rows are left-padded: (B, 1, 1, pos + 1)
        gqa = nkv != nh
        nq = (nh + nkv) * hs
        for layer, ks, vs in zip(self.layers, cache.k.unbind(0), cache.v.unbind(0)):  # ks: (B, nkv, L, hs)
            qkv = layer.qkv(layer.norm_1(x))  # (B, (nh + 2 nkv) hs)
            qk = qkv[:, :nq].view(B, nh + nkv, hs)
            if layer.q_norm is not None:
                qk = torch.cat([layer.q_norm(qk[:, :nh]), layer.k_norm(qk[:, nh:])], dim=1)
            if rot is not None:
                # Rotary.rotate's arithmetic (the same roundings), on queries and keys in one go
                swapped = torch.cat([qk[..., hs // 2 :], qk[..., : hs // 2]], dim=-1)
                qk = torch.addcmul(qk * rot[0], swapped, rot[1])  # (B, nh + nkv, hs)
            ks.select(2, pos).copy_(qk[:, nh:])
            vs.select(2, pos).copy_(qkv[:, nq:].view(B, nkv, hs))
            y = F.scaled_dot_product_attention(qk[:, :nh].unsqueeze(2), ks[:, :, : pos + 1], vs[:, :, : pos + 1],
                                               attn_mask=mask, enable_gqa=gqa)  # (B, nh, 1, hs)
            x = layer.out_res(x, y.view(B, nh * hs))
            h = layer.fc(layer.norm_2(x))
            if self.mlp == "swiglu":  # [gate; up] in one matrix
                h = F.silu(h[:, : self.hidden]) * h[:, self.hidden :]
            elif self.mlp == "relu2":
                h = F.relu(h).square()
            else:
                h = F.gelu(h, approximate="tanh")
            x = layer.proj_res(x, h)
        cache.advance(1)
        logits = self.head(self.ln_f(x))
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits
