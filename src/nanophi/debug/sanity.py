"""`nanophi overfit`: the first test of any new model or training change: can it memorise a single batch?

    nanophi overfit --data book.txt --n-layer 4 --n-embd 128 --steps 500

A correct model and optimizer drive the loss on one fixed batch to ~0 within a few hundred steps (Karpathy's
"overfit one batch" recipe). If it can't, something is broken before any real training is worth running:
gradients not reaching the weights, a wrong loss, a learning rate far off. The command also checks that the
initial loss is about ln(vocab), what uniform predictions give.

Prints the loss curve's summary and a verdict; exit code 0 for PASS, 1 for FAIL. Model, data and optimizer
flags are the same as `nanophi train`'s. Weight decay and dropout default to 0 here: both fight memorisation.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from nanophi.config import DataConfig, RunConfig, TrainConfig, add_dataclass_arguments, load_toml, resolve
from nanophi.model import GPT, GPTConfig

# TrainConfig fields that mean something for a single-batch run; the others are left out of the flags.
TRAIN_FLAGS = ("preset", "batch_size", "lr", "weight_decay", "beta1", "beta2", "grad_clip", "device", "dtype", "seed")
OVERFIT_DEFAULTS = {"weight_decay": 0.0, "dropout": 0.0}
DEFAULT_STEPS = 500
DEFAULT_TARGET = 0.05  # nats/token; "~0" for a batch the model has memorised
INIT_LOSS_TOLERANCE = 0.5  # nats away from ln(vocab) before the initial loss is called suspicious
BARELY_MOVED = 0.9  # a final loss above this share of the first means the weights are not learning at all
CURVE_POINTS = 8  # losses printed in the curve summary


# --- shared with lr_find: the flags and what they build ------------------------------------------------------------
def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """`nanophi train`'s data and model flags, and the optimizer flags a short run uses."""
    parser.add_argument("--config", metavar="FILE.toml", help="TOML recipe of overrides, as for nanophi train")
    add_dataclass_arguments(parser, DataConfig)
    add_dataclass_arguments(parser, GPTConfig)
    add_dataclass_arguments(parser, TrainConfig, skip=tuple(f.name for f in fields(TrainConfig)
                                                            if f.name not in TRAIN_FLAGS))


def config_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig `nanophi train` would build from the same flags; `defaults` apply where no flag was given."""
    owned = {f.name for cls in (DataConfig, GPTConfig, TrainConfig) for f in fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in owned}
    toml = load_toml(args.config) if getattr(args, "config", None) else None
    typed = set(flags) | {k for section in (toml or {}).values() for k in section}
    flags = {k: v for k, v in (defaults or {}).items() if k not in typed} | flags
    return resolve(flags, toml)


@dataclass
class Setup:
    cfg: RunConfig
    data: Any  # nanophi.prepare.PreparedData
    model: GPT
    optimizer: torch.optim.Optimizer
    loader: Any  # nanophi.dataloader.BatchLoader
    device: torch.device
    dtype: torch.dtype


def build_setup(cfg: RunConfig) -> Setup:
    """Prepared data, a freshly initialised model, its AdamW and a batch loader, as the trainer would make them."""
    from nanophi.dataloader import BatchLoader
    from nanophi.device import pick_device, pick_dtype
    from nanophi.optim import build_optimizer
    from nanophi.train import prepare_data

    data = prepare_data(cfg)
    cfg.model.vocab_size = data.vocab_size
    tc = cfg.train
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    optimizer = build_optimizer(model, tc, device.type)
    loader = BatchLoader(data.train, cfg.model.block_size, tc.batch_size, tc.seed, device)
    return Setup(cfg, data, model, optimizer, loader, device, pick_dtype(tc.dtype, device))


def train_step(s: Setup, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """One optimizer step at learning rate `lr`; returns the loss before it."""
    from nanophi.device import autocast

    for g in s.optimizer.param_groups:
        g["lr"] = lr
    with autocast(s.device, s.dtype):
        _, loss = s.model(x, y)
    loss.backward()
    if s.cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.train.grad_clip)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return loss.item()


# --- overfit -------------------------------------------------------------------------------------------------------
@dataclass
class OverfitResult:
    passed: bool
    losses: list[float]
    verdict: str


def overfit(s: Setup, steps: int, target: float) -> OverfitResult:
    """Train on one fixed batch until the loss is below `target` or `steps` run out."""
    x, y = s.loader.next()
    s.model.train()
    losses: list[float] = []
    for _ in range(steps):
        losses.append(train_step(s, x, y, s.cfg.train.lr))
        if not math.isfinite(losses[-1]) or losses[-1] < target:
            break
    first, last, n = losses[0], losses[-1], len(losses)
    if not math.isfinite(last):
        return OverfitResult(False, losses, f"FAIL: the loss became non-finite at step {n - 1}; lower --lr "
                                            f"(now {s.cfg.train.lr:g}) or check the model for overflow")
    if last < target:
        return OverfitResult(True, losses, f"PASS: loss {last:.3f} after {n} steps (from {first:.3f}) — "
                                           "the model can learn")
    if last > BARELY_MOVED * first:
        return OverfitResult(False, losses, f"FAIL: the loss barely moved ({first:.3f} -> {last:.3f} in {n} steps): "
                                            "gradients are not reaching the weights (frozen or detached "
                                            "parameters?) or --lr is far too small")
    return OverfitResult(False, losses, f"FAIL: loss {last:.3f} after {n} steps (from {first:.3f}), not below "
                                        f"{target}: it learns, but too slowly to memorise one batch; try more "
                                        "--steps, a higher --lr, or look for a bug that limits capacity")


def curve_summary(losses: list[float]) -> str:
    from nanophi.debug.dashboard import sparkline

    idx = sorted({round(i * (len(losses) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)})
    points = "  ".join(f"{i}: {losses[i]:.3f}" for i in idx)
    return f"loss by step  {points}\n{sparkline(losses, 60)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setup_arguments(parser)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="most optimizer steps to try")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="loss (nats/token) that counts as ~0")


def run(args: argparse.Namespace) -> int:
    from nanophi.errors import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg = config_from_args(args, OVERFIT_DEFAULTS)
    s = build_setup(cfg)
    V = cfg.model.vocab_size
    print(f"overfitting one batch of {cfg.train.batch_size} x {cfg.model.block_size} tokens with a "
          f"{s.model.num_params() / 1e6:.2f}M-parameter model (vocab {V}), lr {cfg.train.lr:g}")
    result = overfit(s, args.steps, args.target)
    init, expected = result.losses[0], math.log(V)
    ok = abs(init - expected) <= INIT_LOSS_TOLERANCE
    print(f"initial loss {init:.3f}, ln(vocab) = {expected:.3f}: "
          + ("as expected for a fresh model" if ok else "suspicious, the init is not giving uniform predictions"))
    print(curve_summary(result.losses))
    print(result.verdict)
    return 0 if result.passed else 1
