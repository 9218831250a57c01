"""Muon (MomentUm Orthogonalized by Newton-schulz, K. Jordan et al. 2024, modded-nanogpt) with AdamW for the rest.

Muon updates a 2-D hidden weight matrix with the orthogonalised momentum: U V^T of the momentum's SVD U S V^T,
approximated by five Newton-Schulz iterations. Every direction of the update then has the same size, so rare
directions learn as fast as common ones. It is only for hidden matrices: the token embedding and the output
head (a lookup and a classifier, not linear maps between hidden states), and the norm gains and biases
(vectors), stay on AdamW, as in modded-nanogpt.

One `torch.optim.Optimizer` holds both kinds of parameter groups (flag `use_muon`), so `param_groups`,
`state_dict` and `load_state_dict` are the stock ones and a checkpoint round-trips exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam

from nanophi.config import TrainConfig

# Quintic Newton-Schulz coefficients from modded-nanogpt: chosen to push singular values into roughly
# [0.7, 1.2] in 5 steps as fast as possible, rather than to converge exactly to 1 (which needs more steps
# and buys no training speed).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# In fp32, use the Gram form of the iteration when the long side is at least this many times the short one:
# its m^3 matmuls then cost less than the m^2 n ones of the direct form.
GRAM_MIN_ASPECT = 2
MUON_MOMENTUM = 0.95
ADAM_EPS = 1e-8


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate U V^T for G = U S V^T with the quintic Newton-Schulz iteration; G is (..., m, n).

    bf16 on GPUs (it is stable there and tensor cores make it cheap); fp32 on CPUs: without AVX512-BF16 they run
    bf16 matmuls dozens of times slower than fp32, and with AMX the bf16 direct form measured no faster than the
    fp32 Gram form at these sizes (docs/experiments.md). In fp32, clearly rectangular matrices take the Gram form
    of the same iteration (`_gram_newton_schulz`), 2-3x cheaper for the MLP and QKV matrices."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32).reshape(-1, *g.shape[-2:])  # (batch, m, n)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.mT
    # scale so every singular value is <= 1, where the iteration converges
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    if x.dtype == torch.float32 and x.size(-1) >= GRAM_MIN_ASPECT * x.size(-2):
        x = _gram_newton_schulz(x, steps)
    else:
        a, b, c = NS_COEFFS
        for _ in range(steps):
            A = x @ x.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A in one call
            x = torch.baddbmm(x, B, x, beta=a)  # a*x + B@x
    if tall:
        x = x.mT
    return x.to(g.dtype).reshape(g.shape)


def _gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration X <- (aI + bA + cA^2) X, A = X X^T, for a wide X (m x n, n >= 2m), run on m x m matrices.

    Every iterate is X_k = P_k X_0 for an m x m polynomial P_k, so A_k = P_k A_0 P_k^T: four m^3 matmuls per step
    instead of two m^2 n and one m^3, and one m^2 n at each end. Same result up to fp32 rounding (~1e-6)."""
    a, b, c = NS_COEFFS
    A0 = x @ x.mT  # (batch, m, m)
    P, A = None, A0
    for k in range(steps):
        Q = torch.baddbmm(A, A, A, beta=b, alpha=c)  # bA + cA^2 ...
        Q.diagonal(dim1=-2, dim2=-1).add_(a)  # ... + aI
        P = Q if P is None else Q @ P
        if k < steps - 1:
            A = P @ A0 @ P.mT
    return P @ x


class MuonAdamW(torch.optim.Optimizer):
    """Muon for param groups with `use_muon=True`, AdamW (decoupled weight decay, as torch.optim.AdamW) for the
    others. Muon groups: lr, momentum, weight_decay, ns_steps. AdamW groups: lr, betas, eps, weight_decay."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        for g in param_groups:
            if g.get("use_muon"):
                g.setdefault("momentum", MUON_MOMENTUM)
                g.setdefault("ns_steps", NS_STEPS)
                g.setdefault("weight_decay", 0.0)
                if any(p.dim() != 2 for p in g["params"]):
                    raise ValueError("Muon groups hold 2-D matrices only; put vectors in an AdamW group")
            else:
                g["use_muon"] = False
                g.setdefault("betas", (0.9, 0.95))
                g.setdefault("eps", ADAM_EPS)
                g.setdefault("weight_decay", 0.0)
                # fused kernels exist for CPU and CUDA; the flag also tells load_state_dict where `step` lives
                g.setdefault("fused", all(p.device.type in ("cpu", "cuda") for p in g["params"]))
        super().__init__(param_groups, defaults={"lr": 1e-3})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "MuonAdamW does not support closures"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["use_muon"] else self._adamw)(group, params)

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        updates = torch._foreach_lerp(grads, bufs, beta)  # Nesterov: look one momentum step ahead
        # matrices of the same shape are orthogonalised together: one batched matmul instead of many small ones
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        for shape, idx in by_shape.items():
            ortho = orthogonalize(torch.stack([updates[i] for i in idx]), group["ns_steps"])
            # orthogonal matrices have RMS 1/sqrt(max dim); scale tall ones up so the update RMS does not
            # shrink with the fan-out (modded-nanogpt's max(1, m/n)^0.5)
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            for j, i in enumerate(idx):
                params[i].add_(ortho[j], alpha=-lr * scale)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, s in zip(params, states):
            if not s:  # a float32 step tensor on the parameter's device, as torch's fused kernels expect
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
        # torch's own AdamW arithmetic (decoupled weight decay), fused: on CPU the foreach path is ~15x slower
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [], [s["step"] for s in states], foreach=None if group["fused"] else True, fused=group["fused"] or None,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def muon_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Hidden matrices (2-D weights inside the blocks) -> Muon; embeddings, head -> AdamW with weight decay;
    norm gains and biases -> AdamW without. Each group carries `base_lr` for the trainer's schedule."""
    hidden, matrices, vectors = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied head is the embedding: one parameter, one group
            continue
        seen.add(id(p))
        if p.dim() == 2 and ".h." in f".{name}":
            hidden.append(p)
        elif p.dim() >= 2:
            matrices.append(p)
        else:
            vectors.append(p)
    adam = {"use_muon": False, "betas": (cfg.beta1, cfg.beta2), "lr": cfg.lr, "base_lr": cfg.lr}
    groups = [
        {"params": hidden, "use_muon": True, "lr": cfg.muon_lr, "base_lr": cfg.muon_lr, "weight_decay": 0.0},
        {"params": matrices, **adam, "weight_decay": cfg.weight_decay},
        {"params": vectors, **adam, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_muon(model: torch.nn.Module, cfg: TrainConfig) -> MuonAdamW:
    """The `--optimizer muon` optimizer: Muon at `--muon-lr` for hidden matrices, AdamW at `--lr` for the rest.
    Muon's matrices get no weight decay (modded-nanogpt); `--weight-decay` applies to embeddings and head."""
    return MuonAdamW(muon_param_groups(model, cfg))

