"""Text generation: a batched engine with a preallocated KV cache, and the `nanophi sample` command.

    model, tok = load_model_for_inference("runs/book")
    Engine(model, tok).generate(["It is a truth", "Mr. Darcy"], max_new_tokens=50, temperature=0)

Prompts of different lengths share one batch (left padding, see `KVCache`); each step is one (B, 1) forward.
When a row reaches the model's context length, the cache is rebuilt from the last half-context of tokens, so
generation can run past `block_size` the way nanoGPT's crop-the-context loop does, at a fraction of the cost.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

import torch

from nanophi.device import autocast
from nanophi.errors import UserError
from nanophi.kv_cache import KVCache
from nanophi.model import GPT
from nanophi.refs import load_model as load_model_for_inference

__all__ = ["Engine", "load_model_for_inference", "sample_logits"]

# Characters that decode from an incomplete UTF-8 sequence: hold them back from the stream until complete.
REPLACEMENT_CHAR = "\ufffd"


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
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely token always stays
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    def __init__(
        self,
        model: GPT,
        tokenizer: Any,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.block_size = model.config.block_size

    # --- token level ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: set[int] | None = None,
        should_stop: Callable[[int, list[int]], bool] | None = None,
        on_token: Callable[[int, list[int]], None] | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """New token ids for each prompt (prompt excluded, a stop id excluded).

        `should_stop(row, new_ids)` ends a row early (stop strings); `on_token(row, new_ids)` streams."""
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        if temperature < 0:
            raise UserError(f"temperature must be >= 0, got {temperature}")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        was_training = self.model.training
        self.model.eval()
        rows = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        done = [max_new_tokens == 0] * len(prompts)
        cache = self._prefill(rows) if use_cache else None
        logits = self._last_logits if use_cache else None
        for _ in range(max_new_tokens):
            if all(done):
                break
            if not use_cache:
                logits = self._uncached_logits(rows)
            next_ids = sample_logits(logits, temperature, top_k, top_p, gen).tolist()
            for i, tok in enumerate(next_ids):
                if done[i]:
                    continue
                if stop_ids and tok in stop_ids:
                    done[i] = True
                    continue
                rows[i].append(tok)
                new[i].append(tok)
                if on_token is not None:
                    on_token(i, new[i])
                if len(new[i]) >= max_new_tokens or (should_stop is not None and should_stop(i, new[i])):
                    done[i] = True
            if all(done) or not use_cache:
                continue
            if cache.free == 0:
                cache = self._prefill([r[-(self.block_size // 2):] for r in rows])
                logits = self._last_logits
            else:
                x = torch.tensor(next_ids, device=self.device)[:, None]  # (B, 1); finished rows keep going, unused
                with autocast(self.device, self.dtype):
                    out, _ = self.model(x, cache=cache)
                logits = out[:, -1]
        self.model.train(was_training)
        return new

    def _prefill(self, rows: list[list[int]]) -> KVCache:
        """Left-pad the rows, run them through the model once, and keep the cache and last logits."""
        keep = self.block_size - 1  # room for at least one generated token before the first refill
        rows = [r[-keep:] if len(r) > keep else r for r in rows]
        T = max(len(r) for r in rows)
        pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
        x = torch.tensor([[0] * (T - len(r)) + r for r in rows], device=self.device)  # (B, T)
        cfg = self.model.config
        param = next(self.model.parameters())
        cache_dtype = self.dtype if self.dtype != torch.float32 else param.dtype
        cache = KVCache(cfg.n_layer, len(rows), cfg.n_kv_head, cfg.head_dim, self.block_size, pad, self.device,
                        cache_dtype)
        with autocast(self.device, self.dtype):
            out, _ = self.model(x, cache=cache)
        self._last_logits = out[:, -1]
        return cache

    def _uncached_logits(self, rows: list[list[int]]) -> torch.Tensor:
        """nanoGPT's loop, row by row: the whole (cropped) context through the model every step. For tests."""
        outs = []
        for r in rows:
            x = torch.tensor([r[-self.block_size:]], device=self.device)
            with autocast(self.device, self.dtype):
                out, _ = self.model(x)
            outs.append(out[:, -1])
        return torch.cat(outs)

    # --- text level -----------------------------------------------------------------------------------------
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
    ) -> list[str]:
        """The continuation of each prompt, cut before the first stop string. `on_text(row, delta)` streams."""
        tok = self.tokenizer
        encoded = [tok.encode(p) for p in prompts]
        if any(len(e) == 0 for e in encoded):
            bos = getattr(tok, "bos_id", None) or getattr(tok, "eot_id", None)
            if bos is None:
                raise UserError("an empty prompt needs a tokenizer with a start token; pass --prompt TEXT")
            encoded = [e or [bos] for e in encoded]
        stops = [s for s in (stop or []) if s]
        emitted = [0] * len(prompts)  # characters already streamed per row
        texts = [""] * len(prompts)

        def update(i: int, ids: list[int]) -> None:
            texts[i] = tok.decode(ids)

        def should_stop(i: int, ids: list[int]) -> bool:
            return any(s in texts[i] for s in stops)

        def on_token(i: int, ids: list[int]) -> None:
            update(i, ids)
            if on_text is None:
                return
            safe = _cut_at_stop(texts[i], stops)
            if not any(s in texts[i] for s in stops):
                # hold back a possible prefix of a stop string, and an incomplete UTF-8 character
                hold = max((len(s) - 1 for s in stops), default=0)
                safe = safe[: max(emitted[i], len(safe) - hold)]
                safe = safe.rstrip(REPLACEMENT_CHAR)
            if len(safe) > emitted[i]:
                on_text(i, safe[emitted[i]:])
                emitted[i] = len(safe)

        eos = {t for t in (getattr(tok, "eos_id", None), getattr(tok, "eot_id", None)) if t is not None}
        ids = self.generate_ids(encoded, max_new_tokens, temperature, top_k, top_p, seed,
                                stop_ids=eos if stop_at_eos else None, should_stop=should_stop if stops else None,
                                on_token=on_token)
        results = [_cut_at_stop(tok.decode(r), stops) for r in ids]
        if on_text is not None:
            for i, text in enumerate(results):
                if len(text) > emitted[i]:
                    on_text(i, text[emitted[i]:])
        return results


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (in one batch)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")


def run(args: argparse.Namespace) -> int:
    from nanophi.device import pick_device

    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = pick_device(args.device)
    model, tokenizer = load_model_for_inference(args.model, device)
    engine = Engine(model, tokenizer, device)
    stream = args.num_samples == 1

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    outs = engine.generate([args.prompt] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                           args.top_p, args.stop, args.seed, on_text=on_text if stream else None)
    if not stream:
        sys.stdout.write("\n---\n".join(outs))
    sys.stdout.write("\n")
    return 0
