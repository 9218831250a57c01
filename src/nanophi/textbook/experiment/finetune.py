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

from nanophi.textbook.experiment.data import Exercise

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


@torch.no_grad()
def masked_loss(model: torch.nn.Module, examples: Sequence[tuple[list[int], int]], batch_size: int = 8) -> float:
    """Mean cross-entropy over the solution tokens of `examples` (the loss the fine-tune minimises)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = make_batch(examples[i:i + batch_size], device)
        _, loss = model(x, y)
        n = int((y != IGNORE).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(1, count)


def finetune_masked(model: torch.nn.Module, examples: Sequence[tuple[list[int], int]], *, steps: int,
                    batch_size: int, lr: float, seed: int, warmup: int = 0, weight_decay: float = 0.01,
                    grad_clip: float = 1.0, val_examples: Sequence[tuple[list[int], int]] = (),
                    eval_every: int = 0, patience: int = 0) -> dict[str, Any]:
    """AdamW over shuffled epochs of `examples` for `steps` steps; returns loss trace and token counts.

    The batch order depends only on `seed` and the examples, so two models fine-tuned with the same seed on
    the same exercises see exactly the same batches (the equal-budget comparison of the D arms).

    Early stopping: with `val_examples` and `eval_every`, the masked loss on them is measured every `eval_every`
    steps (and at the end); the weights of the best measurement are put back into the model at the end, and
    training stops after `patience` measurements without improvement (0: never stops early)."""
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
    val_trace: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (math.inf, 0, None)
    validate = bool(val_examples) and eval_every > 0

    def measure(step: int) -> bool:
        """Record the validation loss after `step` steps; True when training should stop."""
        nonlocal best
        val = masked_loss(model, val_examples)
        val_trace.append({"step": step, "val_loss": round(val, 4),
                          "train_loss": round(sum(losses[-eval_every:]) / len(losses[-eval_every:]), 4)
                          if losses else None})
        log.info("finetune: step %d/%d, val loss %.4f", step, steps, val)
        if val < best[0]:  # a CPU copy of the weights: the model keeps training in place
            best = (val, step, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            return False
        return patience > 0 and step - best[1] >= patience * eval_every

    t0 = time.perf_counter()
    if validate:
        measure(0)
    model.train()
    step = 0
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # a new epoch: reshuffle, keep the leftovers first
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        x, y = make_batch([examples[i] for i in picked], device)
        for g in opt.param_groups:
            g["lr"] = lr * lr_multiplier(step - 1, steps, warmup)
        _, loss = model(x, y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(x.numel())
        targets += int((y != IGNORE).sum())
        if validate and (step % eval_every == 0 or step == steps) and measure(step):
            break
    model.eval()
    result: dict[str, Any] = {
        "steps": step, "max_steps": steps, "batch_size": batch_size, "lr": lr, "tokens": tokens,
        "scored_tokens": targets, "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": round(time.perf_counter() - t0, 2)}
    if validate:
        if best[2] is not None and best[1] != step:
            model.load_state_dict(best[2])
        result |= {"val_examples": len(val_examples), "eval_every": eval_every, "patience": patience,
                   "best_step": best[1], "best_val_loss": round(best[0], 4), "val_trace": val_trace,
                   "stopped_early": step < steps}
    return result


# ------------------------------------------------------------------ Jina's experiment at full strength

TEACHER_REF = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 160  # as in the case study's teacher runs, so before/after compare with them
VAL_EXERCISES = 24  # training exercises kept aside for early stopping (the held-out set stays untouched)
SAMPLE_TEMPERATURE = 0.8  # Codex's temperature for pass@10
SAMPLE_TOP_P = 0.95
GEN_BATCH = 16


def run_teacher_finetune(out_dir: Any, exercises_cache: Any, *, ref: str = TEACHER_REF, steps: int = 150,
                         batch_size: int = 8, lr: float = 5e-5, block: int = 384, eval_every: int = 10,
                         patience: int = 3, pass_k_samples: int = 10, pass_k_problems: int | None = None,
                         max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0, skip_before: bool = False,
                         weights_out: Any = None) -> dict[str, Any]:
    """Jina's experiment on the mined exercise set: greedy HumanEval (164) and held-out pass@1 before, a masked
    fine-tune with early stopping on a validation slice of the training exercises, the same after, then pass@k
    from `pass_k_samples` samples per problem on the first `pass_k_problems` HumanEval problems (all: None).
    Every completion and verdict is written under `out_dir` as the stage finishes; metrics.json last."""
    import json
    from pathlib import Path

    from nanophi.humaneval import load_problems
    from nanophi.refs import load_model
    from nanophi.textbook.experiment.eval import pass_at_1, sampled_pass_at_k
    from nanophi.textbook.experiment.exercises import exercise_set

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train, heldout, counts = exercise_set(exercises_cache)
    val, fit = train[:VAL_EXERCISES], train[VAL_EXERCISES:]
    problems = load_problems()
    held = [e.as_problem() for e in heldout]
    model, tokenizer = load_model(ref, "cpu")
    quantize = "int8"  # int8 decoding halves a CPU's generation time; before and after decode the same way
    result: dict[str, Any] = {"model": ref, "max_new_tokens": max_new_tokens, "decode": quantize,
                              "exercises": {"fit": len(fit), "val": len(val), "heldout": len(heldout),
                                            "counts": counts}, "timings": {}}

    def save() -> None:
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")

    def greedy(when: str) -> dict[str, Any]:
        res = {}
        for name, probs in (("humaneval", problems), ("heldout", held)):
            t0 = time.perf_counter()
            res[name] = pass_at_1(model, tokenizer, probs, max_new_tokens, out / f"{when}_{name}.jsonl",
                                  batch_size=GEN_BATCH, quantize=quantize)
            result["timings"][f"{when}_{name}_s"] = round(time.perf_counter() - t0, 1)
            log.info("teacher %s: %s %d/%d", when, name, res[name]["passed"], res[name]["n"])
        return res

    if not skip_before:
        result["before"] = greedy("before")
        save()
    room = min(block, model.config.block_size - 1)
    result["finetune"] = finetune_masked(model, encode_examples(tokenizer, fit, room), steps=steps,
                                         batch_size=batch_size, lr=lr, seed=seed, warmup=max(1, steps // 10),
                                         val_examples=encode_examples(tokenizer, val, room),
                                         eval_every=eval_every, patience=patience)
    save()
    if weights_out is not None:  # the fine-tuned weights, for a later look (hundreds of MB: not for git)
        torch.save(model.state_dict(), weights_out)
    result["after"] = greedy("after")
    save()
    if pass_k_samples > 0:
        t0 = time.perf_counter()
        subset = problems[:pass_k_problems]
        result["after"]["humaneval_sampled"] = sampled_pass_at_k(
            model, tokenizer, subset, max_new_tokens, n=pass_k_samples, seed=seed, temperature=SAMPLE_TEMPERATURE,
            top_p=SAMPLE_TOP_P, quantize=quantize, problems_per_batch=max(1, GEN_BATCH // pass_k_samples),
            samples_path=out / f"after_humaneval_samples_t{SAMPLE_TEMPERATURE}.jsonl")
        result["timings"]["after_pass_k_s"] = round(time.perf_counter() - t0, 1)
    result["timings"]["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    """python -m nanophi.textbook.experiment.finetune OUT CACHE [--steps ...]: the run above, logged."""
    import argparse
    import json

    from nanophi.errors import UserError

    p = argparse.ArgumentParser(prog="python -m nanophi.textbook.experiment.finetune",
                                description="Jina's experiment on the mined exercise set (see run_teacher_finetune)")
    p.add_argument("out", help="folder for completions, verdicts and metrics.json")
    p.add_argument("cache", help="exercise set cache (built on first use; see experiment.exercises.exercise_set)")
    p.add_argument("--ref", default=TEACHER_REF)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--pass-k-samples", type=int, default=10)
    p.add_argument("--pass-k-problems", type=int, default=None)
    p.add_argument("--skip-before", action="store_true")
    p.add_argument("--weights-out", default=None, help="save the fine-tuned state dict here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run_teacher_finetune(args.out, args.cache, ref=args.ref, steps=args.steps,
                                      batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                                      patience=args.patience, pass_k_samples=args.pass_k_samples,
                                      pass_k_problems=args.pass_k_problems, skip_before=args.skip_before,
                                      weights_out=args.weights_out)
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps({k: result.get(k) for k in ("before", "after")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
