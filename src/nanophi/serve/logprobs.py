"""Log-probabilities in OpenAI's two shapes: legacy completions' and chat's."""

from __future__ import annotations

from typing import Any, Callable

from nanophi.serve.batcher import Job


def completion_logprobs(tokenizer: Any, job: Job, k: int, echo: bool) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: `tokens`, `token_logprobs` (the first prompt token `null`: nothing
    predicts it), `top_logprobs` (the k most likely and the chosen token: up to k + 1 entries) and `text_offset`
    (each token's first character in the choice's text), for the completion, preceded by the prompt with echo."""
    piece = _pieces(tokenizer)
    scores, n_prompt = job.scores, len(job.prompt_ids)
    ids = job.prompt_ids + job.new_ids
    start = 0 if echo else n_prompt  # scores[j] is about ids[j + 1]
    tokens = [piece(t) for t in ids[start:]]
    logprobs: list[float | None] = ([None] if echo else []) + scores.logprobs[max(start - 1, 0):]
    top: list[dict[str, float] | None] = [None] if echo else []
    for j in range(max(start - 1, 0), len(scores.logprobs)):
        # lowest first, so that of two ids that print alike the likelier one's value stays
        alternatives = [*scores.top[j][:k], (ids[j + 1], scores.logprobs[j])]
        top.append({piece(t): lp for t, lp in sorted(alternatives, key=lambda a: a[1])})
    offset = 0 if echo else len(tokenizer.decode(job.prompt_ids))
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, job: Job, k: int) -> dict[str, Any]:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}
    for each token of the reply."""
    piece = _pieces(tokenizer)
    n_prompt, scores = len(job.prompt_ids), job.scores

    def entry(t: int, lp: float) -> dict[str, Any]:
        text = piece(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = []
    for j, t in enumerate(job.new_ids, start=n_prompt - 1):
        content.append(entry(t, scores.logprobs[j]) | {"top_logprobs": [entry(a, lp) for a, lp in scores.top[j][:k]]})
    return {"content": content}


def _pieces(tokenizer: Any) -> Callable[[int], str]:
    """Token id -> its text, decoded alone (a byte-level piece of a character prints as U+FFFD), memoized for
    one response."""
    seen: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in seen:
            seen[t] = tokenizer.decode([t])
        return seen[t]

    return piece
