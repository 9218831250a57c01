"""Per-token log-probabilities of token sequences under a model: the one forward pass that both `nanophi serve`
(echo + logprobs) and the lm-eval adapter (`nanophi.harness`) score with.

Core, like model.py: it imports no command module, so the tools above it (evaluate, serve, harness) can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


# Logits of one scoring batch are (rows, T, vocab) fp32: cap their elements so a 50k vocabulary over a long
# context does not need gigabytes (2**26 floats = 256 MiB).
SCORE_LOGIT_BUDGET = 2**26


@dataclass
class TokenScores:
    """How the model scores one sequence ids[0..n): entry j is about token j + 1 given ids[0..j]."""

    logprobs: list[float]  # log p(ids[j+1] | ids[:j+1])
    greedy: list[bool]  # ids[j+1] is the model's most likely next token there
    top: list[list[tuple[int, float]]]  # the top_k (id, logprob) there, most likely first ([] when top_k = 0)


def score_tokens(model: Any, rows: Sequence[Sequence[int]], top_k: int = 0, dtype: Any = None) -> list[TokenScores]:
    """Per-token log-probabilities of each row (n - 1 entries for n tokens), in batches of right-padded rows
    (the model is causal, so padding after a token never changes its logits). A row longer than the context is
    read in windows of block_size tokens that advance by half a context, each position scored once with at
    least half a context before it (Engine's refill rule)."""
    import torch

    from nanophi.device import autocast

    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = dtype or torch.float32
    # (row, window start, first position scored in it, window end): every position 1..n-1 in exactly one window
    windows: list[tuple[int, int, int, int]] = []
    for r, ids in enumerate(rows):
        n, end = len(ids), min(len(ids), block)
        windows.append((r, 0, 1, end))
        while end < n:
            new_end = min(n, end + block // 2)
            windows.append((r, new_end - block, end, new_end))
            end = new_end
    per_batch = max(1, SCORE_LOGIT_BUDGET // (block * model.config.vocab_size))
    out = [TokenScores([], [], []) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(windows), per_batch):
                batch = windows[b:b + per_batch]
                T = max(e - s for _, s, _, e in batch)
                x = torch.zeros(len(batch), T, dtype=torch.long)
                for i, (r, s, _, e) in enumerate(batch):
                    x[i, :e - s] = torch.tensor(rows[r][s:e], dtype=torch.long)
                x = x.to(device)
                with autocast(device, dtype):
                    logits, _ = model(x, all_logits=True)
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
                for i, (r, s, first, e) in enumerate(batch):
                    pred = logp[i, first - 1 - s:e - 1 - s]  # the distributions that predict tokens first..e-1
                    target = x[i, first - s:e - s]
                    out[r].logprobs += pred.gather(-1, target[:, None])[:, 0].tolist()
                    out[r].greedy += (pred.argmax(-1) == target).tolist()
                    if top_k:
                        values, ids = pred.topk(min(top_k, pred.size(-1)), dim=-1)
                        out[r].top += [list(zip(i_row, v_row)) for i_row, v_row in zip(ids.tolist(), values.tolist())]
    finally:
        model.train(was_training)
    return out
