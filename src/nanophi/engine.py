"""Text generation: a batched engine with a preallocated KV cache (`nanophi sample`, chat, serve, the harness).

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
norms and embeddings stay fp32 in every mode (the weights: nanophi.quantize).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from nanophi.device import autocast
from nanophi.engine_static import DecodeStep
from nanophi.errors import UserError
from nanophi.kv_cache import KVCache
from nanophi.model import GPT
from nanophi.quantize import decode_copy
from nanophi.refs import load_model as load_model_for_inference
from nanophi.sampling import RowSampler, Sampling, check_sampling, row_sampling

__all__ = ["Engine", "TextStream", "load_model_for_inference", "parse_dtype"]


# Characters that decode from an incomplete UTF-8 sequence: hold them back from the stream until complete.
REPLACEMENT_CHAR = "\ufffd"
# Drop finished rows from the batch once at least this fraction of it is done (compaction copies the cache).
COMPACT_FRACTION = 0.5


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
        batches; `quantize="int4"` (CPU): 4-bit weights (`quantize.QuantLinear`), ~2.2x faster for one stream. Outputs
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



def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A --dtype name (or a torch.dtype) as a torch.dtype; a UserError naming the choices for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise UserError(f"--dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]

