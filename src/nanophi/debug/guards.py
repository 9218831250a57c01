"""Guards: find where a non-finite value was born, and cheap shape/dtype/range checks at module boundaries.

When the loss or the gradient norm goes NaN/inf, the trainer calls `locate_nonfinite` on the failing batch. It
re-runs forward and backward with hooks on every module and names the first one whose output (in forward
order) or whose parameter's gradient (in backward order) is non-finite: the place to look, instead of "loss nan".

`install_checks(model)` adds forward hooks that assert what every boundary expects (token ids are (B, T) int64,
T <= block_size, ids < vocab; blocks see (B, T, n_embd) floats). The trainer installs them only with
`--checks on`, so `--checks off` runs the model with no hooks at all: zero cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from nanophi.device import autocast
from nanophi.errors import UserError


# --- where did the NaN come from? ------------------------------------------------------------------------------
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _nonfinite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def locate_nonfinite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                     dtype: torch.dtype) -> str:
    """Re-run forward and backward on (x, y) and say where the first non-finite value appears.

    Forward hooks fire child-before-parent, so the first module seen with a non-finite output is the innermost
    one that produced it (e.g. `transformer.h.1.mlp.c_fc`, or `transformer.h.1.attn` when its inner matmuls were
    fine but the softmax overflowed). If the forward is clean, gradients are checked in backward order: the
    first non-finite one is closest to where the blow-up started."""
    names = {m: name for name, m in model.named_modules() if name}
    order: list[str] = []  # modules in forward execution order
    first_bad: list[str] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        name = names[module]
        order.append(name)
        if not first_bad and any(_nonfinite(t) for t in _tensors(out)):
            first_bad.append(name)

    handles = [m.register_forward_hook(hook) for m in names]
    model.zero_grad(set_to_none=True)  # we are failing anyway: the step's gradients are not needed any more
    try:
        with torch.enable_grad(), autocast(device, dtype):
            _, loss = model(x, y)
    finally:
        for h in handles:
            h.remove()
    if first_bad:
        bad = first_bad[0]
        bad_params = [f"{bad}.{n}" for n, p in model.get_submodule(bad).named_parameters() if _nonfinite(p)]
        where = f"first non-finite output in {bad} (forward)"
        if bad_params:
            # the weights themselves are broken: an earlier update put them there, or they were loaded so
            where += f"; its parameter {bad_params[0]} is itself non-finite"
        return where
    if loss is None or _nonfinite(loss):
        return "every module's output is finite but the loss is not (check the targets and the logit scale)"
    loss.backward()
    rank = {name: i for i, name in enumerate(order)}
    params = []
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        params.append((-rank.get(owner, -1), name, p))  # backward visits modules in reverse forward order
    for _, name, p in sorted(params, key=lambda t: t[0]):
        if p.grad is not None and _nonfinite(p.grad):
            return f"first non-finite gradient in {name}"
    # every element finite, yet the total norm (a sum of squares) can still overflow float32
    norms = {name: p.grad.double().norm().item() for name, p in model.named_parameters() if p.grad is not None}
    total = math.sqrt(sum(n * n for n in norms.values()))
    if total > torch.finfo(torch.float32).max ** 0.5:
        worst = max(norms, key=norms.get)
        return (f"every gradient is finite but their norm overflows float32; the largest is {worst} "
                f"(norm {norms[worst]:.1e})")
    return ("the re-run of the failing batch was finite everywhere (the overflow came from another micro-batch "
            "or from mixed precision; try --dtype float32)")


# --- boundary checks -------------------------------------------------------------------------------------------
class CheckHandles:
    """The hooks `install_checks` added; `remove()` takes them all off again."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def install_checks(model: nn.Module) -> CheckHandles:
    """Hooks asserting the shapes, dtypes and id ranges a GPT's boundaries expect. Bad inputs (wrong ids, too
    long) raise UserError; a wrong shape inside the model is a bug and raises AssertionError.

    Checks that need a value from the device (the id range) are skipped while torch.compile traces, so they
    never break a compiled graph."""
    cfg = model.config
    handles = [model.register_forward_pre_hook(_gpt_input_check(cfg), with_kwargs=True),
               model.register_forward_hook(_gpt_output_check(cfg))]
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_pre_hook(_block_input_check(cfg.n_embd, f"transformer.h.{i}")))
    return CheckHandles(handles)


def _gpt_input_check(cfg: Any):
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        idx = args[0] if args else kwargs["idx"]
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        if idx.dim() != 2:
            raise UserError(f"the model expects token ids of shape (batch, time), got {tuple(idx.shape)}")
        if idx.dtype != torch.int64:
            raise UserError(f"the model expects int64 token ids, got {idx.dtype}; convert with .long()")
        if cache is None and idx.size(1) > cfg.block_size:
            raise UserError(f"a sequence of {idx.size(1)} tokens is longer than the context ({cfg.block_size}); "
                            "crop it or train with a larger --block-size")
        if targets is not None and targets.shape != idx.shape:
            raise UserError(f"targets {tuple(targets.shape)} and inputs {tuple(idx.shape)} differ in shape")
        if torch.compiler.is_compiling():
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise UserError(f"token id {hi if hi >= cfg.vocab_size else lo} is outside the model's vocabulary "
                            f"[0, {cfg.vocab_size}); the data was tokenized with another tokenizer")
        if targets is not None and (int(targets.min()) < -1 or int(targets.max()) >= cfg.vocab_size):
            raise UserError(f"a target id is outside [-1, {cfg.vocab_size}) (-1 masks a position)")

    return check


def _gpt_output_check(cfg: Any):
    def check(module: nn.Module, args: tuple, out: tuple) -> None:
        logits = out[0]
        if logits.size(-1) != cfg.vocab_size:
            raise AssertionError(f"logits have {logits.size(-1)} entries, the vocabulary {cfg.vocab_size}")

    return check


def _block_input_check(n_embd: int, name: str):
    def check(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if x.dim() != 3 or x.size(-1) != n_embd or not x.is_floating_point():
            raise AssertionError(f"{name} expects a (B, T, {n_embd}) float tensor, got {tuple(x.shape)} {x.dtype}")

    return check
