"""Fine-tuning on exercises with the problem masked out of the loss (phi-1's CodeExercises stage, Jina's recipe).

Each example is the exercise's prompt (imports, signature, docstring) followed by its solution and an
end-of-text token. Prompt and solution are tokenized separately and concatenated, so no BPE merge straddles the
boundary, and the targets of the prompt tokens are -1 (ignored by the model's cross-entropy): the model is
taught to write the body, not to predict docstrings. Used for the students' D arms and for the teacher.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from nanophi.textbook.experiment_data import Exercise

log = logging.getLogger(__name__)

IGNORE = -1  # the target value GPT.forward's cross-entropy ignores
MIN_LR_FRACTION = 0.1  # cosine decays to this share of the peak


def encode_examples(tokenizer: Any, exercises: Sequence[Exercise], block_size: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per exercise, cut to block_size + 1 tokens.

    When too long, the prompt loses its head (the docstring's end and the body matter most); an example
    whose solution alone does not fit keeps the start of its solution."""
    eot = getattr(tokenizer, "eot_id", None)
    out = []
    for ex in exercises:
        prompt = list(tokenizer.encode(ex.prompt))
        solution = list(tokenizer.encode(ex.solution)) + ([eot] if eot is not None else [])
        room = block_size + 1
        if len(solution) >= room:
            prompt, solution = prompt[-1:], solution[:room - 1]
        elif len(prompt) + len(solution) > room:
            prompt = prompt[len(prompt) + len(solution) - room:]
        out.append((prompt + solution, len(prompt)))
    return out


def make_batch(examples: Sequence[tuple[list[int], int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), both (B, T) with T the longest example minus one; padding and prompt targets are IGNORE."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.zeros((len(examples), T), dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        t = torch.tensor(ids, dtype=torch.long)
        x[row, :len(ids) - 1] = t[:-1]
        y[row, :len(ids) - 1] = t[1:]
        y[row, :max(0, n_prompt - 1)] = IGNORE  # target i is token i+1: the first solution token stays scored
    return x.to(device), y.to(device)


def lr_multiplier(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to MIN_LR_FRACTION at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def finetune_masked(model: torch.nn.Module, examples: Sequence[tuple[list[int], int]], *, steps: int,
                    batch_size: int, lr: float, seed: int, warmup: int = 0, weight_decay: float = 0.01,
                    grad_clip: float = 1.0) -> dict[str, Any]:
    """AdamW over shuffled epochs of `examples` for `steps` steps; returns loss trace and token counts.

    The batch order depends only on `seed` and the examples, so two models fine-tuned with the same seed on
    the same exercises see exactly the same batches (the equal-budget comparison of the D arms)."""
    if not examples or steps < 1:
        raise ValueError("fine-tuning needs at least one example and one step")
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses, tokens, targets = [], 0, 0
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        if len(order) < batch_size:  # a new epoch: reshuffle, keep the leftovers first
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        x, y = make_batch([examples[i] for i in picked], device)
        for g in opt.param_groups:
            g["lr"] = lr * lr_multiplier(step, steps, warmup)
        _, loss = model(x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(x.numel())
        targets += int((y != IGNORE).sum())
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "tokens": tokens, "scored_tokens": targets,
            "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
            "seconds": round(time.perf_counter() - t0, 2)}
