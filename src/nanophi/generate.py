"""Text generation: a batched engine with a preallocated KV cache, and the `nanophi sample` command.

    model, tok = load_model_for_inference("runs/book")
    Engine(model, tok).generate(["It is a truth", "Mr. Darcy"], max_new_tokens=50, temperature=0)
    Engine(model, tok).chat([{"role": "user", "content": "Hi!"}])   # with the tokenizer's chat template

Prompts of different lengths share one batch (left padding, see `KVCache`); each step is one (B, 1) forward.
The cache holds what the batch needs (longest prompt + new tokens), at most the model's context; when a row
reaches the context length, the cache is rebuilt from the last half-context of tokens, so generation can run
past `block_size` the way nanoGPT's crop-the-context loop does, at a fraction of the cost. Rows that finish
early (EOS, stop string, their own token budget) are dropped from the batch once half of it is done.

Decoding a few rows reads every weight once per token, so memory traffic bounds it. On a CPU the engine therefore
keeps its linear weights transposed, (in, out), which BLAS streams faster at one row (`StreamingLinear`), and can
run them in int8 (`quantize="int8"`: a quarter of the bytes) or int4 (`quantize="int4"`: an eighth).
`dtype=torch.bfloat16` multiplies with bf16 weight copies (GPUs, CPUs with native bf16). The residual stream,
norms and embeddings stay fp32 in every mode.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nanophi.device import autocast
from nanophi.engine_static import DecodeStep
from nanophi.errors import UserError
from nanophi.kv_cache import KVCache
from nanophi.model import GPT
from nanophi.refs import load_model as load_model_for_inference

__all__ = ["Engine", "Sampling", "TextStream", "bench_generate", "load_model_for_inference", "sample_logits"]

log = logging.getLogger(__name__)

# Characters that decode from an incomplete UTF-8 sequence: hold them back from the stream until complete.
REPLACEMENT_CHAR = "\ufffd"
# Drop finished rows from the batch once at least this fraction of it is done (compaction copies the cache).
COMPACT_FRACTION = 0.5
# --quantize choices, CPU decoding: "int8" fbgemm's dynamic int8 (fastest for batches), "int4" weight-only 4-bit
# `QuantLinear` (fastest for one stream; a Q4_1 GGUF's own codes).
QUANTIZE = (None, "int8", "int4")
# torch.Generator seeds are 64-bit: larger (or negative) seeds are taken modulo 2**64.
SEED_MODULUS = 2**64
MAX_NUM_SAMPLES = 1024  # `nanophi sample --num-samples`: one batch, so its KV cache must fit in memory


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


class TextStream:
    """The text of one row as its tokens arrive: cut at the first stop string, and streamed in safe pieces.

    A piece is held back while it could still be the start of a stop string, or ends in an incomplete UTF-8
    character, so what `on_text` receives never has to be taken back."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer, self.stops, self.on_text = tokenizer, [s for s in stops if s], on_text
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, ids: list[int]) -> bool:
        """All new ids so far -> True when a stop string has appeared (the row is done)."""
        self.text = self.tokenizer.decode(ids)
        self.stopped = any(s in self.text for s in self.stops)
        if self.on_text is not None:
            safe = _cut_at_stop(self.text, self.stops)
            if not self.stopped:
                hold = max((len(s) - 1 for s in self.stops), default=0)
                safe = safe[: max(self.emitted, len(safe) - hold)].rstrip(REPLACEMENT_CHAR)
            self._emit(safe)
        return self.stopped

    def finish(self, ids: list[int]) -> str:
        """The final text (cut at a stop string); streams whatever was held back."""
        text = _cut_at_stop(self.tokenizer.decode(ids), self.stops)
        self._emit(text)
        return text

    def _emit(self, safe: str) -> None:
        if self.on_text is not None and len(safe) > self.emitted:
            self.on_text(safe[self.emitted:])
            self.emitted = len(safe)


class Engine:
    """Batched generation from a GPT with a KV cache: token ids (`generate_ids`), text (`generate`), chat."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        quantize: str | None = None,
    ) -> None:
        """`dtype`: precision of the matmuls (bf16 pays off on GPUs and CPUs with native bf16). `quantize="int8"`
        (CPU): int8 weights with dynamically quantized activations (fbgemm), ~2x faster decoding, fastest for
        batches; `quantize="int4"` (CPU): 4-bit weights (`QuantLinear`), ~2.2x faster for one stream. Outputs
        are close to but not bit-identical with fp32. The engine reads the model's weights now: later updates are
        not seen, except by int8's prompt reading (below)."""
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.block_size = model.config.block_size
        self.model = decode_copy(model, self.device, dtype, quantize)
        # fbgemm's dynamic int8 quantizes activations with one scale per call: over a whole prompt, outlier
        # features crush everything else (SmolLM2's loss on 512-token chunks: 2.16 fp32, 3.39 int8). Prompts are
        # compute-bound anyway, so with int8 the model itself reads them in fp32 and int8 only decodes.
        self.prefill_model = model if quantize == "int8" else self.model
        # on a CPU in fp32 activations, decoding runs a leaner step than the model's forward (engine_static.py)
        self.step = DecodeStep(self.model) if self.device.type == "cpu" and dtype == torch.float32 else None

    def decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (B,) -> (B, V) logits of the next token, through the cache."""
        if self.step is not None:
            return self.step(ids, cache)
        with autocast(self.device, self.dtype):
            out, _ = self.model(ids[:, None], cache=cache)
        return out[:, -1]

    # --- token level ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: set[int] | None = None,
        should_stop: Callable[[int, list[int]], bool] | None = None,
        on_token: Callable[[int, list[int]], None] | None = None,
        use_cache: bool = True,
        repetition_penalty: float = 1.0,
        sampling: Sequence[Sampling] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt (prompt excluded, a stop id excluded).

        `max_new_tokens` is one budget for all rows or one per row. `should_stop(row, new_ids)` ends a row early
        (stop strings, a client gone); `on_token(row, new_ids)` streams. `sampling` gives each row its own
        settings (one `Sampling` per prompt) in place of the batch-wide temperature ... repetition_penalty; a
        batch seed s seeds row i with s + i."""
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(budgets) != len(prompts):
            raise UserError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
        if any(b < 0 for b in budgets):
            raise UserError(f"max_new_tokens must be >= 0, got {min(budgets)}")
        if any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        if sampling is None:
            check_sampling(temperature, top_k, top_p, repetition_penalty)
            sampling = row_sampling(len(prompts), temperature, top_k, top_p, seed, repetition_penalty)
        elif len(sampling) != len(prompts):
            raise UserError(f"{len(sampling)} sampling settings for {len(prompts)} prompts")
        new: list[list[int]] = [[] for _ in prompts]
        if not prompts or max(budgets) == 0:
            return new
        was_training = self.model.training, self.prefill_model.training
        self.model.eval()
        self.prefill_model.eval()
        try:
            decode = self._decode if use_cache else self._decode_uncached
            decode(prompts, budgets, new, sampling, stop_ids, should_stop, on_token)
        finally:
            self.model.train(was_training[0])
            self.prefill_model.train(was_training[1])
        return new

    def _accept(self, i: int, tok: int, new: list[list[int]], budgets: list[int], stop_ids: set[int] | None,
                should_stop: Callable | None, on_token: Callable | None) -> bool:
        """Record token `tok` for row i; True when the row is now done."""
        if stop_ids and tok in stop_ids:
            return True
        new[i].append(tok)
        if on_token is not None:
            on_token(i, new[i])
        return len(new[i]) >= budgets[i] or (should_stop is not None and should_stop(i, new[i]))

    def _seen(self, rows: list[list[int]], vocab: int) -> torch.Tensor:
        """(B, vocab) bool: which token ids each row's context holds (for the repetition penalty)."""
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=self.device)
        for r, ids in enumerate(rows):
            seen[r, torch.tensor(ids, dtype=torch.long, device=self.device)] = True
        return seen

    def _decode(self, prompts, budgets, new, sampling: Sequence[Sampling], stop_ids, should_stop, on_token) -> None:
        def context(i: int, n: int) -> list[int]:  # the last n tokens of row i, prompt and generated
            return (list(prompts[i]) + new[i])[-n:]

        live = [i for i, b in enumerate(budgets) if b > 0]  # batch row j generates for prompt live[j]
        keep = self.block_size - 1  # room for at least one generated token before the first refill
        rows = [context(i, keep) for i in live]
        # a cache as long as this batch can use, not the model's whole context (SmolLM2: 8192 x 30 layers)
        cache_len = min(self.block_size, max(map(len, rows)) + max(budgets[i] for i in live))
        sampler = RowSampler([sampling[i] for i in live], self.device)
        cache, logits = self._prefill(rows, cache_len)
        # the whole prompt counts, as in HF, not only what fits the cache
        seen = self._seen([list(prompts[i]) for i in live], logits.size(-1)) if sampler.penalized else None
        finished: set[int] = set()
        while True:
            next_ids = sampler(sampler.penalize(logits, seen))
            if seen is not None:
                seen[torch.arange(len(live), device=self.device), next_ids] = True
            for i, tok in zip(live, next_ids.tolist()):
                if i not in finished and self._accept(i, tok, new, budgets, stop_ids, should_stop, on_token):
                    finished.add(i)
            if len(finished) == len(live):
                return
            if len(finished) >= COMPACT_FRACTION * len(live):  # stop computing rows nobody reads
                kept = [j for j, i in enumerate(live) if i not in finished]
                live, finished = [live[j] for j in kept], set()
                next_ids = next_ids[kept]
                seen = seen[kept] if seen is not None else None
                sampler.keep(kept)
                cache.keep_rows(torch.tensor(kept, device=self.device))
            if cache.free == 0:  # a row reached the context: restart from the last half-context
                cache, logits = self._prefill([context(i, self.block_size // 2) for i in live], self.block_size)
                continue
            logits = self.decode_step(next_ids, cache)  # finished rows not yet dropped decode on; nobody reads them

    def _prefill(self, rows: list[list[int]], cache_len: int) -> tuple[KVCache, torch.Tensor]:
        """Left-pad the rows, run them through the model once; the cache and the last position's logits."""
        T = max(len(r) for r in rows)
        pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
        x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=self.device)  # (B, T)
        cfg = self.model.config
        cache_dtype = self.dtype if self.dtype != torch.float32 else next(self.model.parameters()).dtype
        cache = KVCache(cfg.n_layer, len(rows), cfg.n_kv_head, cfg.head_dim, cache_len, pad, self.device, cache_dtype)
        with autocast(self.device, self.dtype):
            out, _ = self.prefill_model(x, cache=cache)
        return cache, out[:, -1]

    def _decode_uncached(self, prompts, budgets, new, sampling: Sequence[Sampling], stop_ids, should_stop,
                         on_token) -> None:
        """nanoGPT's loop, row by row: the whole (cropped) context through the model every step. For tests."""
        live = [i for i, b in enumerate(budgets) if b > 0]
        sampler = RowSampler([sampling[i] for i in live], self.device)
        while live:
            outs = []
            for i in live:
                x = torch.tensor([(list(prompts[i]) + new[i])[-self.block_size:]], device=self.device)
                with autocast(self.device, self.dtype):
                    out, _ = self.model(x)
                outs.append(out[:, -1])
            logits = torch.cat(outs)
            seen = self._seen([list(prompts[i]) + new[i] for i in live], logits.size(-1)) if sampler.penalized \
                else None
            next_ids = sampler(sampler.penalize(logits, seen)).tolist()
            kept = [j for j, (i, tok) in enumerate(zip(live, next_ids))
                    if not self._accept(i, tok, new, budgets, stop_ids, should_stop, on_token)]
            live = [live[j] for j in kept]
            sampler.keep(kept)

    # --- text level -----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        encoded = [tok.encode(p) for p in prompts]
        if any(len(e) == 0 for e in encoded):
            bos = getattr(tok, "bos_id", None)
            bos = bos if bos is not None else getattr(tok, "eot_id", None)
            if bos is None:
                raise UserError("an empty prompt needs a tokenizer with a start token; pass --prompt TEXT")
            encoded = [e or [bos] for e in encoded]
        return encoded

    def stop_ids(self) -> set[int]:
        tok = self.tokenizer
        return {t for t in (getattr(tok, "eos_id", None), getattr(tok, "eot_id", None)) if t is not None}

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        on_text: Callable[[int, str], None] | None = None,
        stop_at_eos: bool = True,
        repetition_penalty: float = 1.0,
        sampling: Sequence[Sampling] | None = None,
    ) -> list[str]:
        """The continuation of each prompt, cut before the first stop string. `on_text(row, delta)` streams;
        `sampling`: one `Sampling` per prompt (see `generate_ids`)."""
        streams = [TextStream(self.tokenizer, stop or (), None if on_text is None else _bind(on_text, i))
                   for i in range(len(prompts))]
        ids = self.generate_ids(self.encode_prompts(prompts), max_new_tokens, temperature, top_k, top_p, seed,
                                stop_ids=self.stop_ids() if stop_at_eos else None,
                                should_stop=lambda i, new: streams[i].push(new),
                                on_token=None, repetition_penalty=repetition_penalty, sampling=sampling)
        return [s.finish(r) for s, r in zip(streams, ids)]

    def chat(
        self,
        messages: list[dict[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}]), rendered with the tokenizer's
        chat template (a plain "role: content" transcript when it has none)."""
        from nanophi.chat_template import apply_chat_template

        prompt = apply_chat_template(self.tokenizer, messages, add_generation_prompt=True)
        return self.generate([prompt], max_new_tokens, temperature, top_k, top_p, stop, seed,
                             on_text=None if on_text is None else (lambda i, d: on_text(d)))[0]


def _bind(on_text: Callable[[int, str], None], i: int) -> Callable[[str], None]:
    return lambda delta: on_text(i, delta)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


class StreamingLinear(torch.nn.Module):
    """nn.Linear for decoding on a CPU: y = x @ W^T + b with W^T stored contiguous, (in, out).

    At one row per step the matmul is a matrix-vector product bound by reading the weights; BLAS streams an
    (in, out) matrix ~1.5x faster than nn.Linear's (out, in) one here (MKL, AVX2), and at many rows it is as fast."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def decode_copy(model: GPT, device: torch.device, dtype: torch.dtype, quantize: str | None = None) -> GPT:
    """The model the engine runs. On a GPU in fp32: the model itself. Otherwise a copy that shares every tensor
    with `model` except the linear layers' weights, which become
      - int8 (quantize="int8", CPU): torch's dynamically quantized Linear, per-channel weight scales;
      - int4 (quantize="int4", CPU): `QuantLinear`, 4-bit weights in groups of 32, bf16 products;
      - (in, out) fp32 StreamingLinear on a CPU;
      - `dtype` copies (bf16/fp16), for autocast to multiply without casting the weights every step.
    The output head is thereby untied from the embedding, which stays fp32, so the residual stream does too."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(q for q in QUANTIZE if q)}, got {quantize!r}")
    if quantize and (device.type != "cpu" or dtype != torch.float32):
        raise UserError(f"{quantize} quantization is a CPU option (torch's packed kernels) with the default "
                        "--dtype float32; drop --quantize or --dtype")
    if device.type != "cpu" and dtype == torch.float32:
        return model
    # deepcopy the module tree but not the tensors: the memo maps every parameter and buffer to itself
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    shadow = copy.deepcopy(model, memo)
    for module in shadow.modules():  # training-time diagnostics hooks stay with the training model
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module.__dict__.pop("act_out", None)
    if quantize == "int8":
        return _quantize_int8(shadow)
    if quantize == "int4":
        return _quantize_int4(shadow)
    for module in list(shadow.modules()):
        for name, child in module.named_children():
            if not isinstance(child, torch.nn.Linear):
                continue
            if device.type == "cpu" and dtype == torch.float32:
                setattr(module, name, StreamingLinear(child))
            else:
                new = torch.nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                      device=child.weight.device, dtype=dtype)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
    return shadow.eval()


def quantize_q4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantization of w (N, K) in groups of `group` inputs, GGUF Q4_1's
    scheme: w ~ code * scale + lo with code in 0..15, lo the group's minimum and scale = (max - min) / 15.
    Returns codes (N, K) int32 and scale, lo (N, K / group) fp32. Weights dequantized from a Q4_1 file come back
    as exactly their own codes, because each Q4_1 group holds its min (code 0) and its max (code 15)."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_(min=1e-12)  # a constant group: every code 0, any scale
    codes = ((groups - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32)
    return codes.view(n, k), scale, lo


class QuantLinear(torch.nn.Module):
    """A weight-only quantized nn.Linear for decoding on a CPU (`quantize="int4"`): the weights are stored in 4
    or 8 bits and multiplied by torch's packed kernels, which read 8x or 4x fewer bytes than fp32 -- the bytes
    bound decoding one stream.

      - 4 bits: asymmetric, a scale and a zero per group of 32 inputs (`torch._weight_int4pack_mm_for_cpu`): the
        layout of GGUF's Q4_1, so a Q4_1 GGUF (SmolLM2's) is re-quantized to exactly its own 4-bit codes;
      - 8 bits (the output head): symmetric, one scale per output channel (`torch._weight_int8pack_mm`).

    Only the weights are quantized; the activations are not (fbgemm's dynamic int8 rounds them to 8 bits per
    call). The kernels' fast path on CPU is bf16 (AVX-512 BF16 / AMX), so the product runs in bf16 with fp32 in
    and out; the scales are rounded to bf16 too. The residual stream, norms and attention stay fp32."""

    GROUP = 32

    def __init__(self, linear: torch.nn.Linear, bits: int) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits = bits
        if bits == 4:
            codes, scale, lo = quantize_q4(w, self.GROUP)
            zero = lo + 8 * scale  # the kernel computes (code - 8) * scale + zero
            self.register_buffer("weight_q", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
            self.register_buffer("scale_zero", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                                 .to(torch.bfloat16))  # (K / 32, N, 2)
        else:
            scale = (w.abs().amax(dim=1) / 127).clamp_(min=1e-12)
            self.register_buffer("weight_q", (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8))
            self.register_buffer("scale_zero", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    @classmethod
    def packs_int4(cls, linear: torch.nn.Linear) -> bool:
        """int4 needs whole groups of 32 inputs and the packing's tile of 16 outputs."""
        out_features, in_features = linear.weight.shape
        return in_features % cls.GROUP == 0 and out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 4:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_q, self.GROUP, self.scale_zero)
        else:
            y = torch._weight_int8pack_mm(x2, self.weight_q, self.scale_zero)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _quantize_int8(shadow: GPT) -> GPT:
    """Replace the linear layers of `shadow` (whose tensors are shared with the caller's model: nothing is
    modified in place) by fbgemm's dynamic int8 Linear: weights int8 with a scale per output channel, activations
    quantized per call. Reads a quarter of fp32's bytes per token, which is what bounds decoding on a CPU."""
    import warnings

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise UserError("this torch has no torch.ao.quantization (dynamic int8); run without --quantize") from None
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise UserError("int8 needs torch's fbgemm quantized kernels (x86 CPUs); run without --quantize")
    with warnings.catch_warnings():  # torch points eager-mode quantization users at torchao; it still works
        warnings.simplefilter("ignore")
        quantize_dynamic(shadow, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return shadow.eval()


def _quantize_int4(shadow: GPT) -> GPT:
    """Replace the linear layers of `shadow` (whose tensors are shared with the caller's model: nothing is
    modified in place) by weight-only 4-bit `QuantLinear`s. The output head gets 8 bits: it is the token
    embedding, which quantized GGUFs keep at 8 bits too (SmolLM2's is Q8_0), and its errors move every logit."""
    if not hasattr(torch, "_weight_int8pack_mm") or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise UserError("this torch has no packed int4 CPU kernels; run without --quantize or with int8")
    from nanophi.device import cpu_has_amx_bf16

    if not cpu_has_amx_bf16():  # the kernel's bf16 path is what makes int4 fast; elsewhere int8 usually wins
        log.warning("--quantize int4 multiplies in bf16, which this CPU has no AMX for: try --quantize int8 too")
    for module in list(shadow.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                bits = 4 if child is not shadow.lm_head and QuantLinear.packs_int4(child) else 8
                setattr(module, name, QuantLinear(child, bits))
    return shadow.eval()


# --- benchmark -----------------------------------------------------------------------------------------------
def bench_generate(
    model_ref: str | Path | tuple[GPT, Any],
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_tokens: int = 64,
    dtype: str | torch.dtype = "float32",
    compare_hf: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    seed: int = 0,
    quantize: str | None = None,
    quality: bool = False,
) -> dict[str, Any]:
    """Decode tokens/s (all rows together) and prefill time of greedy generation, best of `repeats`.

    With `compare_hf`, the same weights (exported to a temporary HF directory) run through transformers'
    `generate` in fp32 at this batch size and at batch 1, the baseline the engine is measured against.
    With `quality`, the loss of this mode's decoding beside fp32's (`decode_loss`), so speed comes with its cost."""
    from nanophi.device import pick_device

    if batch_size < 1 or new_tokens < 2 or prompt_tokens < 1 or repeats < 1:
        raise UserError("bench generate needs batch_size >= 1, new_tokens >= 2, prompt_tokens >= 1, repeats >= 1")
    torch_dtype = _parse_dtype(dtype)
    dev = pick_device(device)
    model, tokenizer = model_ref if isinstance(model_ref, tuple) else load_model_for_inference(model_ref, dev)
    model = model.to(dev).eval()
    if prompt_tokens + new_tokens > model.config.block_size:
        raise UserError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} > the model's context "
                        f"{model.config.block_size}; ask for fewer")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), generator=g).tolist()
    engine = Engine(model, tokenizer, dev, torch_dtype, quantize)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        engine.generate_ids(prompts, n, temperature=0)
        return time.perf_counter() - t0

    run(2)  # warm-up: allocator, kernels' first-call setup
    prefill = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    result: dict[str, Any] = {
        "model": str(model_ref) if not isinstance(model_ref, tuple) else "(in memory)",
        "params_m": round(model.num_params(non_embedding=False) / 1e6, 1), "batch_size": batch_size,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "dtype": str(torch_dtype).removeprefix("torch."),
        "quantize": quantize, "device": str(dev), "threads": torch.get_num_threads(), "prefill_s": round(prefill, 4),
        "decode_tok_s": round(batch_size * (new_tokens - 1) / max(total - prefill, 1e-9), 1),
        "total_tok_s": round(batch_size * new_tokens / total, 1),
    }
    if quality:
        result["loss"] = decode_loss(engine, tokenizer, batch_size, prompt_tokens, new_tokens)
        fp32 = Engine(model, tokenizer, dev) if (torch_dtype, quantize) != (torch.float32, None) else engine
        result["fp32_loss"] = decode_loss(fp32, tokenizer, batch_size, prompt_tokens, new_tokens)
        result["loss_vs_fp32"] = round(result["loss"] / result["fp32_loss"] - 1, 4)
    if compare_hf:
        result |= _bench_hf(model, tokenizer, prompts, new_tokens, repeats, dev)
        result["speedup_vs_hf"] = round(result["decode_tok_s"] / result["hf_decode_tok_s"], 2)
        result["speedup_vs_hf_batch1"] = round(result["decode_tok_s"] / result["hf_batch1_decode_tok_s"], 2)
    return result


@torch.inference_mode()
def decode_loss(engine: Engine, tokenizer: Any, batch_size: int, prompt_tokens: int, new_tokens: int) -> float:
    """Mean cross-entropy of the engine's decoding steps on real text, teacher-forced: `batch_size` rows of
    CPython's documentation (the offline default corpus), each prefilled with `prompt_tokens` and then fed its
    next `new_tokens` one at a time through the KV cache, exactly as generation runs -- so it prices what a
    --dtype or --quantize choice does to the prompt's keys and values and to every decoding step."""
    from nanophi.sources import pydoc_documents

    need = batch_size * (prompt_tokens + new_tokens)
    ids: list[int] = []
    for doc in pydoc_documents():
        try:
            ids += tokenizer.encode(doc.text + "\n\n")
        except UserError:  # a char model trained elsewhere cannot spell every topic; the others still count
            continue
        if len(ids) > need:
            break
    if len(ids) <= need:
        raise UserError(f"the model's tokenizer encodes {len(ids)} tokens of CPython's documentation and --quality "
                        f"needs {need + 1}; ask for fewer --batch-size/--prompt-tokens/--new-tokens")
    rows = torch.tensor(ids[:need]).view(batch_size, -1)
    targets = torch.tensor(ids[1 : need + 1]).view(batch_size, -1)
    engine.model.eval()
    engine.prefill_model.eval()
    cache, logits = engine._prefill(rows[:, :prompt_tokens].tolist(), prompt_tokens + new_tokens)
    total = 0.0
    for t in range(prompt_tokens, prompt_tokens + new_tokens):
        total += torch.nn.functional.cross_entropy(logits.float(), targets[:, t - 1].to(logits.device),
                                                   reduction="sum").item()
        if t + 1 < prompt_tokens + new_tokens:
            logits = engine.decode_step(rows[:, t].to(engine.device), cache)
    return round(total / (batch_size * new_tokens), 4)


def _bench_hf(model: GPT, tokenizer: Any, prompts: list[list[int]], new_tokens: int, repeats: int,
              device: torch.device) -> dict[str, Any]:
    import tempfile

    from transformers import AutoModelForCausalLM

    from nanophi.convert.hf import export_hf

    with tempfile.TemporaryDirectory(prefix="nanophi-bench-hf-") as d:
        export_hf(model, tokenizer, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    out: dict[str, Any] = {}
    for name, batch in (("hf", prompts), ("hf_batch1", prompts[:1])):
        x = torch.tensor(batch, device=device)

        def run(n: int) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        run(2)
        prefill = min(run(1) for _ in range(repeats))
        total = min(run(new_tokens) for _ in range(repeats))
        out[f"{name}_prefill_s"] = round(prefill, 4)
        out[f"{name}_decode_tok_s"] = round(len(batch) * (new_tokens - 1) / max(total - prefill, 1e-9), 1)
    return out


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"--dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the context (Hugging Face's; 1.1-1.3 typical)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (in one batch)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantize, shared by sample, chat and serve."""
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 for bf16 matmuls (faster on "
                        "GPUs and CPUs with native bf16; much slower on AVX2-only CPUs)")
    parser.add_argument("--quantize", choices=[q for q in QUANTIZE if q], default=None,
                        help="CPU: int8 (fbgemm dynamic quantization; fastest for batches) or int4 (4-bit "
                             "weights in groups of 32, GGUF Q4_1's layout; fastest for one stream): 2-3x faster "
                             "decoding, output close to fp32")


def engine_from_args(args: argparse.Namespace) -> Engine:
    """Load args.model on args.device and wrap it in an Engine with the --dtype/--quantize choices."""
    from nanophi.device import pick_device

    device = pick_device(args.device)
    model, tokenizer = load_model_for_inference(args.model, device)
    return Engine(model, tokenizer, device, _parse_dtype(args.dtype), args.quantize)


def check_sampling_args(args: argparse.Namespace) -> None:
    """sample's and chat's sampling flags, checked before the model loads: NaN, inf and out-of-range values are
    one line, not a traceback from inside torch."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, prefix="--")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    if not 1 <= args.num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"--num-samples must be from 1 to {MAX_NUM_SAMPLES} (one batch), got {args.num_samples}")
    engine = engine_from_args(args)
    stream = args.num_samples == 1

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    outs = engine.generate([args.prompt] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                           args.top_p, args.stop, args.seed, on_text=on_text if stream else None,
                           repetition_penalty=args.repetition_penalty)
    if not stream:
        sys.stdout.write("\n---\n".join(outs))
    sys.stdout.write("\n")
    return 0
