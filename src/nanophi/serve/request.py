"""Request parsing: an OpenAI body checked against the server's `Limits`, tokenized, and turned into one
`Request` (a prompt and a `Sampling` per choice); APIError (4xx) on anything the server cannot honour."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nanophi.errors import UserError
from nanophi.serve.errors import APIError

DEFAULT_MAX_TOKENS = 256  # when a request does not say
MAX_TOKENS_LIMIT = 4096  # the most one request may ask for (--max-tokens-limit)
MAX_N = 8  # choices per prompt
MAX_STOPS = 16  # OpenAI allows 4; lm-eval sends a task's stop strings plus the EOS text (often 5+)
TEMPERATURE_RANGE = (0.0, 2.0)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # vLLM's extension; 1 = off
UNSUPPORTED = ("suffix", "tools", "functions", "logit_bias", "best_of")
MAX_LOGPROBS = 20  # most alternatives per position (vLLM's default cap; OpenAI's chat allows 20)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a `nanophi serve` flag. Checked before any tokenization, so an
    oversized request costs a JSON parse at most, and the body size bounds that."""

    max_prompts: int = 128  # prompts in one /v1/completions request
    max_prompt_tokens: int = 65536  # prompt tokens in one request, all prompts together (each counted once)
    max_completions: int = 128  # n x prompts: the rows one request adds to the queue
    max_tokens: int = MAX_TOKENS_LIMIT  # the largest max_tokens a request may ask for
    max_body_bytes: int = 8 * 2**20  # request body (413 beyond it, from Content-Length or while reading)
    max_queue: int = 512  # choices waiting for a batch; a request that would overflow it gets 429

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.max_queue < self.max_completions:  # else a request within limits could never be queued
            raise UserError(f"--max-queue ({self.max_queue}) must be >= --max-completions ({self.max_completions})")


@dataclass
class Request:
    prompts: list[list[int]]  # one per choice (n copies of each prompt)
    max_tokens: int
    sampling: list[Any]  # one nanophi.sampling.Sampling per choice
    stops: list[str]
    stream: bool
    logprobs: int | None = None  # alternatives per position; None: no logprobs asked
    echo: bool = False  # completions: the prompt's tokens come back first, scored


def parse_request(body: Any, kind: str, engine: Any, model_name: str, limits: Limits = Limits()) -> Request:
    """Validate an OpenAI request body; APIError (4xx) on anything the server cannot honour. Counts are checked
    before anything is tokenized, and tokenizing stops as soon as the request is over its token budget."""
    from nanophi.sampling import Sampling

    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required (a string)", param="model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    for key in UNSUPPORTED:
        value = body.get(key)
        if value not in (None, False, [], {}) and not (key == "best_of" and value == 1):
            raise APIError(400, f"'{key}' is not supported by nanophi serve", param=key, code="unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise APIError(400, f"'{key}' is not supported by nanophi serve (use 0)", param=key,
                           code="unsupported_parameter")
    n = _int(body, "n", 1, 1, MAX_N)
    logprobs, echo = _logprobs(body, kind)
    prompt_param = "messages" if kind == "chat" else "prompt"
    if kind == "chat":
        texts: list[str | list[int]] = [render_chat(body.get("messages"), engine.tokenizer)]
    else:
        texts = _prompts(body.get("prompt"), limits.max_prompts)
    if len(texts) * n > limits.max_completions:
        raise APIError(400, f"{len(texts)} prompts x n={n} asks for {len(texts) * n} completions; this server "
                       f"allows {limits.max_completions} per request (--max-completions)", param="n",
                       code="too_many_completions")
    vocab = engine.model.config.vocab_size
    max_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    # max_tokens 0 only scores the prompt (echo): no room is needed for a new token, and a prompt longer than the
    # context is scored in windows
    max_tokens = _int(body, max_key, min(DEFAULT_MAX_TOKENS, limits.max_tokens), 0 if echo else 1, limits.max_tokens)
    limit = engine.block_size - 1 if max_tokens > 0 else limits.max_prompt_tokens
    prompts, total = [], 0
    for t in texts:
        try:
            p = t if isinstance(t, list) else engine.encode_prompts([t])[0]
        except UserError as e:  # e.g. a character a char-level model has never seen
            raise APIError(400, f"cannot tokenize the prompt: {e}", param=prompt_param) from None
        total += len(p)
        if total > limits.max_prompt_tokens:
            raise APIError(400, f"the prompts have more than {limits.max_prompt_tokens} tokens together, the most "
                           "one request may send (--max-prompt-tokens); send fewer per request",
                           param=prompt_param, code="too_many_tokens")
        if any(not 0 <= x < vocab for x in p):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        if len(p) > limit:
            raise APIError(400, f"the prompt has {len(p)} tokens; this model's context holds {engine.block_size}, "
                           f"so a prompt may have at most {limit} (with echo and max_tokens 0 a longer prompt is "
                           "scored in windows)", param=prompt_param, code="context_length_exceeded")
        prompts.append(p)
    temperature = _number(body, "temperature", 1.0, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be > 0", param="top_p")
    top_k = body.get("top_k")  # not OpenAI's, but vLLM and llama.cpp accept it (so does repetition_penalty)
    if top_k is not None:
        top_k = _int(body, "top_k", None, 1, vocab)
    penalty = _number(body, "repetition_penalty", 1.0, *REPETITION_PENALTY_RANGE)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(400, "'seed' must be an integer", param="seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    if stream and len(prompts) * n > 1:
        raise APIError(400, "streaming serves one prompt with n=1", param="stream")
    if stream and (logprobs is not None or echo):
        raise APIError(400, "logprobs and echo are answered without streaming; send \"stream\": false",
                       param="stream")
    # choice i draws with seed + i: the n choices differ, and each is the same alone or batched with others
    sampling = [Sampling(temperature, top_k, top_p if top_p < 1 else None,
                         None if seed is None or temperature == 0 else seed + i, penalty)
                for i in range(len(prompts) * n)]
    return Request([p for p in prompts for _ in range(n)], max_tokens, sampling, stops, stream, logprobs, echo)


def _logprobs(body: dict, kind: str) -> tuple[int | None, bool]:
    """(alternatives per position or None, echo) in OpenAI's two shapes: completions' integer `logprobs` and
    boolean `echo`; chat's boolean `logprobs` with an integer `top_logprobs`."""
    if kind == "chat":
        if body.get("echo") not in (None, False):
            raise APIError(400, "'echo' is a completions parameter; chat completions do not take it", param="echo",
                           code="unsupported_parameter")
        asked = body.get("logprobs")
        if asked not in (None, True, False):
            raise APIError(400, "'logprobs' must be true or false in chat completions (top_logprobs: how many)",
                           param="logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not asked:
            raise APIError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
        return (top or 0) if asked else None, False
    if body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' is a chat parameter; completions take an integer 'logprobs'",
                       param="top_logprobs", code="unsupported_parameter")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be true or false", param="echo")
    return _int(body, "logprobs", None, 0, MAX_LOGPROBS), echo


def _prompts(prompt: Any, max_prompts: int) -> list[str | list[int]]:
    def token_list(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and len(prompt) > max_prompts:  # before looking at a million of them
        raise APIError(400, f"'prompt' lists {len(prompt)} prompts; this server takes at most {max_prompts} per "
                       "request (--max-prompts)", param="prompt", code="too_many_prompts")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_list(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a string, a list of strings, or a list of token ids", param="prompt")


def render_chat(messages: Any, tokenizer: Any) -> str:
    from nanophi.chat_template import apply_chat_template

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "message content parts must be text", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, "message content must be a string", param="messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return apply_chat_template(tokenizer, clean, add_generation_prompt=True)
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be an integer from {lo} to {hi}, got {value!r}", param=key)
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be a number from {lo} to {hi}, got {value!r}", param=key)
    return float(value)


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


def tokenizer_card(tokenizer: Any, block_size: int) -> dict[str, Any]:
    """What /tokenizer_info tells a client (vLLM's keys): the special tokens as text, each only when it encodes
    back to its own id (lm-eval's remote tokenizer finds the EOS id by encoding this text), the chat template and
    the context length."""
    def special(key: str) -> str | None:
        t = getattr(tokenizer, key, None)
        if t is None:
            return None
        text = tokenizer.decode([t])
        try:
            return text if tokenizer.encode(text) == [t] else None
        except UserError:
            return None

    eos = special("eos_id") or special("eot_id")
    return {"eos_token": eos, "bos_token": special("bos_id"), "pad_token": None,
            "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": block_size,
            "tokenizer_class": type(tokenizer).__name__}
