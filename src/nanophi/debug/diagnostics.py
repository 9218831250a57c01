"""Network-health diagnostics every `--debug-interval` steps: the numbers that tell a sick network from a slow one.

On a diagnostic step `HealthMonitor` hooks the model for one forward/backward and adds to the step's record:

    act/block{i}/{mean,std,sat}        residual stream after block i (sat: share of |x - mean| > 3 std)
    act/block{i}.attn/..., act/block{i}.mlp/...   the attention and MLP branch outputs, same statistics
    mlp/block{i}/dead_frac             share of MLP hidden units never > 0 over the batch (dead ReLU/GELU units)
    mlp/block{i}/sat_frac              share of MLP pre-activations with |x| > 3 (GELU's flat, zero-gradient tail)
    attn/block{i}/head{h}/entropy      mean attention entropy (nats) of head h, first sequence of the batch
    grad/{block{i},embed,ln_f,head}/norm   gradient norm per parameter group, before clipping
    update/{param}/log10               log10(std(dp) / std(p)) of the optimizer step (about -3 is healthy)

Hooks exist only during that step, so the other steps run the bare model. Statistics stay on the device until
the end of the step and come back in one transfer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from nanophi.callbacks import Callback

if TYPE_CHECKING:
    from nanophi.model import GPT
    from nanophi.train import Trainer

# A value further than this many standard deviations from its mean counts as an outlier ("saturated").
OUTLIER_STD = 3.0
# GELU(x) is ~0 with ~0 gradient for x < -3: pre-activations beyond this are in its flat tail.
PREACT_SATURATION = 3.0
# SwiGLU outputs can be negative, so a unit is dead when its output never leaves this band around 0.
DEAD_EPS = 1e-6
# log10 of the update ratio for a parameter the step did not move at all (log10(0) would be -inf).
NO_UPDATE_LOG10 = -10.0


def attention_probs(attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> torch.Tensor:
    """Causal attention probabilities (nh, T, T) of `attn` for one sequence x (T, C), its input, with the rotary
    tables `rope` it was called with.

    SDPA never materialises the weights, so they are rebuilt here from the model's own heads (`attn.heads`: c_attn,
    split, QK-norm, rotary), then the GQA repeat, scaled dot product, causal mask and softmax SDPA does inside."""
    T = x.size(0)
    nh, nkv, hs = attn.n_head, attn.n_kv_head, attn.head_dim
    q, k, _ = attn.heads(x[None], rope)
    q, k = q[0].float(), k[0].float()  # (nh, T, hs), (nkv, T, hs)
    if nkv != nh:
        k = k.repeat_interleave(nh // nkv, dim=0)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over query positions of each head's entropy in nats: (nh, T, T) -> (nh,).

    A head attending uniformly over its causal window has entropy ln(t + 1) at position t, so its mean is
    ln(T!) / T; a head locked on one token has 0."""
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    return -plogp.sum(-1).mean(-1)


def param_group(name: str) -> str:
    """The group a parameter's gradient norm is reported under: block{i}, embed, ln_f or head."""
    parts = name.split(".")
    if parts[:2] == ["transformer", "h"]:
        return f"block{parts[2]}"
    if parts[:2] in (["transformer", "wte"], ["transformer", "wpe"]):
        return "embed"
    if parts[:2] == ["transformer", "ln_f"]:
        return "ln_f"
    return "head" if parts[0] == "lm_head" else parts[0]


def _act_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().float()
    mean, std = x.mean(), x.std()
    sat = ((x - mean).abs() > OUTLIER_STD * std).float().mean()
    return mean, std, sat


class HealthMonitor(Callback):
    """Activation, attention, gradient and update statistics every `interval` steps (see the module doc)."""

    def __init__(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.handles: list[Any] = []
        self.stats: dict[str, torch.Tensor] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.active = False

    # --- the hooks -------------------------------------------------------------------------------------------
    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        self.active = step % self.interval == 0
        if not self.active:
            return
        self.stats = {}
        self._attach(trainer.raw_model)

    def _attach(self, model: GPT) -> None:
        stats, seen = self.stats, set()

        def record(key: str, fn: Callable[[], dict[str, torch.Tensor]]) -> None:
            # with gradient accumulation the hooks fire once per micro-batch: the first one is measured
            if key not in seen:
                seen.add(key)
                stats.update(fn())

        def on_output(prefix: str) -> Callable:
            def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
                def compute() -> dict[str, torch.Tensor]:
                    mean, std, sat = _act_stats(out)
                    return {f"act/{prefix}/mean": mean, f"act/{prefix}/std": std, f"act/{prefix}/sat": sat}
                record(f"act/{prefix}", compute)
            return hook

        def on_attn_input(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:  # args: (x, rope, ...) of CausalSelfAttention
                def compute() -> dict[str, torch.Tensor]:
                    with torch.no_grad():
                        ent = attention_entropy(attention_probs(module, args[0][0].detach(), args[1]))
                    return {f"attn/block{i}/head{h}/entropy": ent[h] for h in range(ent.numel())}
                record(f"attn/{i}", compute)
            return hook

        def on_preact(i: int) -> Callable:
            def hook(module: nn.Module, args: Any, h: torch.Tensor) -> None:
                record(f"preact/{i}", lambda: {
                    f"mlp/block{i}/sat_frac": (h.detach().float().abs() > PREACT_SATURATION).float().mean()})
            return hook

        def on_hidden(i: int, swiglu: bool) -> Callable:
            def hook(module: nn.Module, args: Any, h: torch.Tensor) -> None:
                def compute() -> dict[str, torch.Tensor]:
                    flat = h.detach().float().reshape(-1, h.size(-1))
                    alive = flat.abs().amax(0) > DEAD_EPS if swiglu else flat.amax(0) > 0
                    return {f"mlp/block{i}/dead_frac": 1.0 - alive.float().mean()}
                record(f"dead/{i}", compute)
            return hook

        for i, block in enumerate(model.transformer.h):
            self.handles += [block.register_forward_hook(on_output(f"block{i}")),
                             block.attn.register_forward_hook(on_output(f"block{i}.attn")),
                             block.mlp.register_forward_hook(on_output(f"block{i}.mlp")),
                             block.attn.register_forward_pre_hook(on_attn_input(i)),
                             block.mlp.c_fc.register_forward_hook(on_preact(i)),
                             block.mlp.act.register_forward_hook(on_hidden(i, block.mlp.kind == "swiglu"))]

    def _detach_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # --- gradients and updates --------------------------------------------------------------------------------
    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        if not self.active:
            return
        self._detach_hooks()  # the forward passes of this step are done
        squares: dict[str, torch.Tensor] = {}
        for name, p in trainer.raw_model.named_parameters():
            if p.grad is not None:
                g = param_group(name)
                squares[g] = squares.get(g, 0) + p.grad.detach().float().square().sum()
        for g, sq in squares.items():
            self.stats[f"grad/{g}/norm"] = sq.sqrt()
        # the parameters before the optimizer step; on_step_end compares with after
        self.before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if p.requires_grad}

    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.active = False
        self._detach_hooks()  # in case the backward never happened
        for name, p in trainer.raw_model.named_parameters():
            old = self.before.get(name)
            if old is None or not p.requires_grad:
                continue
            delta = (p.detach() - old).float()
            # std for matrices; rms for vectors, whose values (norm gains all 1 at init) can have std 0
            scale = old.float().std() if old.numel() > 1 and old.dim() > 1 else old.float().square().mean().sqrt()
            spread = delta.std() if delta.numel() > 1 and delta.dim() > 1 else delta.square().mean().sqrt()
            # a parameter that is all zeros (a bias at init) has no scale to compare with: left out (nan)
            ratio = torch.where(scale > 0, (spread / scale).log10(), math.nan)
            self.stats[f"update/{name}/log10"] = torch.where(spread > 0, ratio, NO_UPDATE_LOG10)
        self.before = {}
        if self.stats:
            keys = list(self.stats)
            values = torch.stack([v.detach().float().reshape(()) for v in self.stats.values()]).tolist()
            record.update((k, v) for k, v in zip(keys, values) if not math.isnan(v))
        self.stats = {}

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._detach_hooks()
