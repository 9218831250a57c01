"""How the next token is picked from the logits: temperature, top-k, top-p and repetition penalty, batch-wide
(`sample_logits`) or per row (`Sampling` settings, drawn by a `RowSampler`), and the checks that turn meaningless
settings into one clear error. Used by the engine (nanophi.engine), the server and the harness."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from nanophi.errors import UserError

# torch.Generator seeds are 64-bit: larger (or negative) seeds are taken modulo 2**64.
SEED_MODULUS = 2**64


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Hugging Face's `repetition_penalty` (CTRL, Keskar et al. 2019): the logit of every token already in the
    row's context (`seen`, (B, V) bool) is divided by `penalty` when positive and multiplied when negative, so
    > 1 discourages repeats. Small models loop without it ("Your code is correct." x 40). `penalty` may be a
    (B, 1) tensor: one per row."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely token always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float = 1.0,
                   prefix: str = "") -> None:
    """UserError for sampling settings that mean nothing (NaN, inf, out of range). `prefix` is "--" for CLI flags,
    so the message names what the user typed."""
    def name(key: str) -> str:
        return prefix + (key.replace("_", "-") if prefix else key)

    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"{name('top_k')} must be >= 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"{name('top_p')} must be in (0, 1], got {top_p}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise UserError(f"{name('repetition_penalty')} must be a finite number > 0 (1 = off), got {repetition_penalty}")


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. Rows of one batch may each have their own: they still share every forward
    pass. A row with a seed draws from its own generator, so its output does not depend on its batch-mates."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # taken modulo 2**64
    repetition_penalty: float = 1.0  # Hugging Face's; 1 = off

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


class RowSampler:
    """Per-row sampling for a batch: temperature, top-k, top-p and repetition penalty as (B, 1) tensors, and one
    torch.Generator per seeded row (unseeded rows share torch's global one). `keep(rows)` follows the batch when
    finished rows are dropped."""

    def __init__(self, rows: Sequence[Sampling], device: torch.device) -> None:
        self.rows = list(rows)

        def f(xs: list[float]) -> torch.Tensor:  # (B, 1): broadcasts against (B, V) logits
            return torch.tensor(xs, dtype=torch.float32, device=device)[:, None]

        self.temperature = f([r.temperature for r in self.rows])
        self.top_p = f([r.top_p if r.top_p is not None else 1.0 for r in self.rows])
        self.penalty = f([r.repetition_penalty for r in self.rows])
        self.top_k = torch.tensor([r.top_k or 0 for r in self.rows], dtype=torch.long, device=device)  # 0 = off
        self.generators = [torch.Generator(device=device).manual_seed(r.seed % SEED_MODULUS)
                           if r.seed is not None else None for r in self.rows]
        self.penalized = any(r.repetition_penalty != 1.0 for r in self.rows)

    def keep(self, kept: list[int]) -> None:
        idx = torch.tensor(kept, dtype=torch.long, device=self.temperature.device)
        self.rows = [self.rows[j] for j in kept]
        self.temperature, self.top_p, self.penalty, self.top_k = (
            self.temperature[idx], self.top_p[idx], self.penalty[idx], self.top_k[idx])
        self.generators = [self.generators[j] for j in kept]

    def penalize(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        return logits if seen is None else apply_repetition_penalty(logits, seen, self.penalty)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) token ids; greedy rows take the argmax."""
        ids = logits.argmax(dim=-1)
        hot = (self.temperature[:, 0] > 0).nonzero()[:, 0].tolist()
        if not hot:
            return ids
        x = logits[hot].float() / self.temperature[hot]
        V = x.size(-1)
        k = self.top_k[hot]
        if bool(((k > 0) & (k < V)).any()):
            k = torch.where((k > 0) & (k < V), k, V)
            kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            kth = torch.where((k < V)[:, None], kth, float("-inf"))  # rows without top-k keep everything
            x = x.masked_fill(x < kth, float("-inf"))
        p = self.top_p[hot]
        if bool((p < 1).any()):
            sorted_x, order = torch.sort(x, descending=True, dim=-1)
            probs = sorted_x.softmax(dim=-1)
            # drop a token when the tokens before it already reach top_p; the most likely token always stays
            drop_sorted = ((probs.cumsum(dim=-1) - probs) >= p) & (p < 1)
            x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        probs = x.softmax(dim=-1)
        unseeded = [j for j, r in enumerate(hot) if self.generators[r] is None]
        if unseeded:
            ids[[hot[j] for j in unseeded]] = torch.multinomial(probs[unseeded], 1).squeeze(-1)
        for j, r in enumerate(hot):  # one draw per seeded row from its own generator: batch-independent
            if self.generators[r] is not None:
                ids[r] = torch.multinomial(probs[j : j + 1], 1, generator=self.generators[r])[0, 0]
        return ids


def row_sampling(n: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                 repetition_penalty: float) -> list[Sampling]:
    """One batch-wide setting as n rows. A batch seed s gives row i the seed s + i: samples of one batch differ,
    and row i's is the same whatever the batch size."""
    return [Sampling(temperature, top_k, top_p, None if seed is None else seed + i, repetition_penalty)
            for i in range(n)]

