"""Optimizers and the learning-rate schedule.

`lr_multiplier(step)` is a pure function of the step (so resume needs no scheduler state); each param group
keeps its own `base_lr` and the trainer sets `lr = base_lr * multiplier` before every step. Under `--max-time`
the trainer also passes the share of the time budget used by the end of the step, and the schedule follows
whichever of steps and time is further along, so a run the clock cuts short still decays to min_lr.
"""

from __future__ import annotations

import math

import torch

from nanophi.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig, time_frac: float | None = None) -> float:
    """Linear warmup to 1, then cosine to min_lr/lr, or warmup-stable-decay (WSD), or constant.

    `time_frac` (0..1, under --max-time) is the share of the time budget spent when this step ends: progress is
    then max(step / max_iters, time_frac), i.e. the step counter moves to where the clock says the run is, and
    time_frac = 1 (the last step the budget allows) gives the floor. Warmup stays counted in real steps: it is
    there for the optimizer's moment estimates, which need steps, however long they take.
    """
    floor = cfg.min_lr / cfg.lr
    horizon = cfg.decay_iters or cfg.max_iters
    if step < cfg.warmup_iters and (time_frac is None or time_frac < 1.0):
        return (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return 1.0
    at: float = step if time_frac is None else max(step, min(1.0, time_frac) * cfg.max_iters)
    if cfg.schedule == "wsd":
        decay_start = int(horizon * (1 - cfg.decay_frac))
        if at < decay_start:
            return 1.0
        frac = (at - decay_start) / max(1, horizon - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, frac)
    # cosine from the end of warmup to the horizon, then stay at the floor
    frac = min(1.0, max(0.0, at - cfg.warmup_iters) / max(1, horizon - cfg.warmup_iters))
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * frac))


def schedule_warnings(cfg: TrainConfig) -> list[str]:
    """Settings that are legal but almost always a mistake."""
    out = []
    if cfg.warmup_iters >= cfg.max_iters:
        out.append(f"warmup ({cfg.warmup_iters} steps) is not shorter than training ({cfg.max_iters} steps): "
                   "the learning rate never reaches its peak")
    elif cfg.warmup_iters > 0.5 * cfg.max_iters:
        out.append(f"warmup takes {cfg.warmup_iters / cfg.max_iters:.0%} of training; 1-10% is usual")
    if cfg.min_lr > cfg.lr:
        out.append(f"min_lr {cfg.min_lr} is above the peak lr {cfg.lr}: the schedule increases")
    if cfg.lr > 1e-1 and cfg.optimizer == "adamw":
        out.append(f"lr {cfg.lr} is very high for AdamW; 1e-4..3e-3 is the usual range")
    if cfg.eval_interval > cfg.max_iters:
        out.append(f"eval_interval {cfg.eval_interval} > max_iters {cfg.max_iters}: only the final eval will run")
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings), not biases or norm gains (nanoGPT's rule: dim >= 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        from nanophi.muon import build_muon

        return build_muon(model, cfg)
    # Fused AdamW (one kernel per tensor) on GPUs and CPUs. On CPU, foreach has no multi-tensor kernels and was
    # ~15x slower than fused for the 4-layer char model (9.8 vs 0.67 ms per step, 1 thread; docs/experiments.md).
    kwargs = {"fused": True} if device_type in ("cuda", "cpu") else {"foreach": True}
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kwargs
    )
    for g in opt.param_groups:
        g["base_lr"] = cfg.lr
    return opt
