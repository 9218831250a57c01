"""An OpenAI-compatible HTTP server: `nanophi serve MODEL --port 8000`.

    GET  /v1/models             the one model served (its name: --model-name, default the reference's name)
    POST /v1/completions        prompt (string, token ids, or a list of either) -> continuation
    POST /v1/chat/completions   messages -> reply, through the tokenizer's chat template
    POST /tokenize              {"prompt": text} -> {"tokens": ids}        (vLLM's; lm-eval's remote tokenizer)
    POST /detokenize            {"tokens": ids} -> {"prompt": text}
    GET  /tokenizer_info        eos/bos tokens, chat template, context length
    GET  /health                liveness, and the batcher's counters (never needs the API key)

Completions take OpenAI's legacy `logprobs: K` (the K most likely tokens at each position, and always the chosen
one) and `echo: true` (the prompt's tokens come back first, scored, the first one `null`), with `max_tokens: 0`
to score a prompt without generating: what lm-evaluation-harness's `local-completions` sends for loglikelihood
tasks. Chat completions take `logprobs: true` and `top_logprobs: K` in the chat shape. Log-probabilities are the
model's own (before temperature or top-p), from one forward pass over prompt and completion
(`nanophi.scoring.score_tokens`); a prompt scored with `max_tokens: 0` may be longer than the context.

`"stream": true` answers with server-sent events (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`). Errors are 4xx/5xx
with OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Requests are queued; one worker thread takes up to --max-batch waiting choices (after waiting --batch-window-ms
for company) and runs them as one Engine batch: each row keeps its own temperature, top_p, top_k and seed, so
concurrent clients share each forward pass whatever they ask for. A choice whose client has gone (streaming or
not) is cancelled at its next token.

No request can ask for unbounded work: prompts per request, prompt tokens per request, completions (n x prompts)
per request, max_tokens and the body size are capped (`Limits`, one flag each), and a full queue answers 429 with
Retry-After. With --api-key (or $NANOPHI_API_KEY) every endpoint but /health needs `Authorization: Bearer KEY`.
SIGINT/SIGTERM stop accepting, give requests in flight --shutdown-grace seconds to finish, cancel the rest and
exit 0; a second signal exits at once. FastAPI and uvicorn are imported only when the server starts.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the
# Request class they name is imported lazily inside `create_app`.
import argparse
import asyncio
import collections
import hmac
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nanophi.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256  # when a request does not say
MAX_TOKENS_LIMIT = 4096  # the most one request may ask for (--max-tokens-limit)
MAX_N = 8  # choices per prompt
MAX_STOPS = 16  # OpenAI allows 4; lm-eval sends a task's stop strings plus the EOS text (often 5+)
TEMPERATURE_RANGE = (0.0, 2.0)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # vLLM's extension; 1 = off
UNSUPPORTED = ("suffix", "tools", "functions", "logit_bias", "best_of")
MAX_LOGPROBS = 20  # most alternatives per position (vLLM's default cap; OpenAI's chat allows 20)
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there
RETRY_AFTER_S = 1  # what a 429 tells the client to wait
API_KEY_ENV = "NANOPHI_API_KEY"
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, liveness probes)


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


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send back."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the batching worker -------------------------------------------------------------------------------------
@dataclass
class Job:
    """One choice of one request: a prompt to continue and where its text goes."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # nanophi.generate.Sampling: this row's own temperature, top_k, top_p, seed, penalty
    stops: list[str]
    on_delta: Callable[[str], None] | None  # streaming: called from the worker thread
    on_done: Callable[[str, str, int, BaseException | None], None]  # text, finish_reason, tokens, error
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # score prompt + completion, with this many alternatives; None: do not score
    new_ids: list[int] = field(default_factory=list)  # set by the worker: the completion's tokens (its text's)
    scores: Any = None  # set by the worker when logprobs is asked: nanophi.scoring.TokenScores


class Batcher:
    """A queue of Jobs and one thread that runs them in Engine batches (rows with different sampling settings
    share a batch: the Engine samples each row with its own)."""

    def __init__(self, engine: Any, max_batch: int = 16, window_s: float = 0.01, max_queue: int = 512) -> None:
        self.engine, self.max_batch, self.window_s, self.max_queue = engine, max_batch, window_s, max_queue
        self.queue: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.accepting, self.stopped = True, False
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "queued": 0, "running": 0,
                      "completion_tokens": 0, "cancelled": 0, "refused_busy": 0}
        self.thread = threading.Thread(target=self._loop, name="nanophi-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's choices, or none (429 when the queue cannot take them all)."""
        with self.cond:
            if not self.accepting:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self.queue) + len(jobs) > self.max_queue:
                self.stats["refused_busy"] += 1
                raise APIError(429, f"the server is busy ({len(self.queue)} choices queued, at most "
                               f"{self.max_queue}); retry after {RETRY_AFTER_S} s", type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.queue.extend(jobs)
            self.stats["requests"] += 1
            self.stats["queued"] = len(self.queue)
            self.cond.notify()

    def stop_accepting(self) -> None:
        """Shutdown, first step: new requests get 503; what is queued still runs."""
        with self.cond:
            self.accepting = False

    def close(self, timeout_s: float = 10.0) -> None:
        """Shutdown, last step: cancel what is queued or running, then stop the thread (bounded: a running batch
        ends at its next token)."""
        with self.cond:
            self.accepting, self.stopped = False, True
            dropped = list(self.queue)
            self.queue.clear()
            for job in [*dropped, *self.running]:
                job.cancelled.set()
            self.cond.notify()
        gone = APIError(503, "the server shut down before this request ran", type="server_error",
                        code="shutting_down")
        for job in dropped:
            job.on_done("", "cancelled", 0, gone)
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return None
        time.sleep(self.window_s)  # let concurrent requests arrive and join this batch
        with self.cond:
            batch: list[Job] = []
            while self.queue and len(batch) < self.max_batch:
                job = self.queue.popleft()
                if job.cancelled.is_set():  # its client left while it waited: never compute it
                    self.stats["cancelled"] += 1
                    continue
                batch.append(job)
            self.running = batch
            self.stats["queued"], self.stats["running"] = len(self.queue), len(batch)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            try:
                self._run(batch)
            except BaseException as e:  # a bug or OOM: fail these requests, keep serving
                log.exception("generation failed")
                for job in batch:
                    job.on_done("", "error", 0, e)
            finally:
                with self.cond:
                    self.running = []
                    self.stats["running"] = 0

    def _run(self, batch: list[Job]) -> None:
        from nanophi.generate import TextStream

        streams = [TextStream(self.engine.tokenizer, j.stops, j.on_delta) for j in batch]

        def should_stop(i: int, ids: list[int]) -> bool:
            return streams[i].push(ids) or batch[i].cancelled.is_set()

        ids = self.engine.generate_ids([j.prompt_ids for j in batch], [j.max_tokens for j in batch],
                                       sampling=[j.sampling for j in batch], stop_ids=self.engine.stop_ids(),
                                       should_stop=should_stop)
        texts = [stream.finish(new) for stream, new in zip(streams, ids)]
        scored = [j for j in batch if j.logprobs is not None and not j.cancelled.is_set()]
        for job, new, text in zip(batch, ids, texts):
            job.new_ids = _tokens_of(self.engine.tokenizer, new, text)
        if scored:
            from nanophi.scoring import score_tokens

            rows = [j.prompt_ids + j.new_ids for j in scored]
            k = max(max(j.logprobs for j in scored), 1)  # the top 1 tells whether each token was the greedy one
            for job, scores in zip(scored, score_tokens(self.engine.prefill_model, rows, k, self.engine.dtype)):
                job.scores = scores
        for job, stream, new, text in zip(batch, streams, ids, texts):
            self.stats["completion_tokens"] += len(new)
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
            finish = "length" if len(new) >= job.max_tokens and not stream.stopped else "stop"
            job.on_done(text, finish, len(new), None)


def _tokens_of(tokenizer: Any, new: list[int], text: str) -> list[int]:
    """The fewest leading tokens of `new` whose text covers `text` (all of them unless a stop string cut it):
    the tokens a completion's logprobs report."""
    if len(tokenizer.decode(new)) <= len(text):
        return list(new)
    for k in range(len(new) + 1):
        if len(tokenizer.decode(new[:k])) >= len(text):
            return list(new[:k])
    return list(new)


# --- request parsing -----------------------------------------------------------------------------------------
@dataclass
class Request:
    prompts: list[list[int]]  # one per choice (n copies of each prompt)
    max_tokens: int
    sampling: list[Any]  # one nanophi.generate.Sampling per choice
    stops: list[str]
    stream: bool
    logprobs: int | None = None  # alternatives per position; None: no logprobs asked
    echo: bool = False  # completions: the prompt's tokens come back first, scored


def parse_request(body: Any, kind: str, engine: Any, model_name: str, limits: Limits = Limits()) -> Request:
    """Validate an OpenAI request body; APIError (4xx) on anything the server cannot honour. Counts are checked
    before anything is tokenized, and tokenizing stops as soon as the request is over its token budget."""
    from nanophi.generate import Sampling

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
        texts: list[str | list[int]] = [_render_chat(body.get("messages"), engine.tokenizer)]
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


def _render_chat(messages: Any, tokenizer: Any) -> str:
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


def _json(raw: bytes) -> Any:
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


# --- logprobs in OpenAI's shapes -----------------------------------------------------------------------------
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


# --- the app -------------------------------------------------------------------------------------------------
class RequireAPIKey:
    """ASGI middleware: every HTTP path but OPEN_PATHS needs `Authorization: Bearer KEY` (what the openai client
    sends for `api_key=`); 401 in OpenAI's error shape otherwise. Pure ASGI, so streaming and disconnect
    detection pass through untouched."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # constant time: the key cannot be guessed byte by byte
            return await self.app(scope, receive, send)
        message = "Incorrect API key provided" if given else \
            "You didn't provide an API key: send 'Authorization: Bearer KEY'"
        body = json.dumps(APIError(401, message, code="invalid_api_key").body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be too big: from Content-Length before
    reading anything, else while reading (a chunked upload), so a 50 MB body is never held in memory."""
    too_big = APIError(413, f"the request body is larger than {max_bytes} bytes, the most this server accepts "
                       "(--max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Any, model_name: str, max_batch: int = 16, batch_window_ms: float = 10.0,
               max_tokens_limit: int = MAX_TOKENS_LIMIT, limits: Limits | None = None,
               api_key: str | None = None) -> Any:
    """The FastAPI app serving `engine` as `model_name`. `limits` bounds each request (default: `Limits()` with
    `max_tokens_limit`); with `api_key`, every endpoint but /health needs it."""
    import contextlib

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    limits = limits or Limits(max_tokens=max_tokens_limit)
    batcher = Batcher(engine, max_batch, batch_window_ms / 1000, limits.max_queue)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        batcher.start()
        yield
        batcher.close()  # uvicorn has waited for requests in flight (up to its graceful timeout)

    app = FastAPI(title="nanophi", lifespan=lifespan)
    app.state.batcher = batcher
    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if batcher.accepting else "shutting_down", **batcher.stats}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanophi"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    def check_model(body: Any) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model_name):
            raise APIError(404, f"the model {body['model']!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def tokenize(raw: bytes) -> dict[str, Any]:
        body = _json(raw)
        check_model(body)
        if "messages" in body:
            text = _render_chat(body["messages"], engine.tokenizer)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise APIError(400, "'prompt' must be a string (or send 'messages')", param="prompt")
        if not isinstance(body.get("add_special_tokens", False), bool):
            raise APIError(400, "'add_special_tokens' must be true or false", param="add_special_tokens")
        try:
            # add_special_tokens adds nothing: nanophi's tokenizers (and their HF export, add_bos_token false)
            # never prepend a start token, so these ids are the ones a completion request is scored on
            ids = engine.tokenizer.encode(text)
        except UserError as e:
            raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.block_size}

    def detokenize(raw: bytes) -> dict[str, Any]:
        body = _json(raw)
        check_model(body)
        ids = body.get("tokens")
        vocab = engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(ids)}

    @app.post("/tokenize")
    async def tokenize_endpoint(request: HTTPRequest) -> Any:
        return await asyncio.to_thread(tokenize, await read_body(request, limits.max_body_bytes))

    @app.post("/detokenize")
    async def detokenize_endpoint(request: HTTPRequest) -> Any:
        return await asyncio.to_thread(detokenize, await read_body(request, limits.max_body_bytes))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenizer_card(engine.tokenizer, engine.block_size)

    def parse(raw: bytes, kind: str) -> Request:
        return parse_request(_json(raw), kind, engine, model_name, limits)

    async def handle(request: HTTPRequest, kind: str) -> Any:
        try:
            raw = await read_body(request, limits.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=499)  # the client closed the request: nobody reads this
        # parsing and tokenizing run off the event loop: a big (but allowed) request does not stall the others
        req = await asyncio.to_thread(parse, raw, kind)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(item: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        jobs = [Job(p, req.max_tokens, s, req.stops,
                    (lambda d, i=i: post(("delta", i, d))) if req.stream else None,
                    lambda text, finish, n, err, i=i: post(("done", i, (text, finish, n, err))),
                    logprobs=req.logprobs)
                for i, (p, s) in enumerate(zip(req.prompts, req.sampling))]
        batcher.submit(jobs)
        usage_prompt = sum(len(p) for p in req.prompts)

        shut_down = APIError(503, "the server shut down before this request finished", type="server_error",
                             code="shutting_down")

        def cancel() -> None:
            for job in jobs:
                job.cancelled.set()

        if not req.stream:
            async def watch() -> None:  # a client that hangs up is seen within DISCONNECT_POLL_S
                while not await request.is_disconnected():
                    await asyncio.sleep(DISCONNECT_POLL_S)
                events.put_nowait(("gone", -1, None))

            watcher = asyncio.ensure_future(watch())
            results: dict[int, tuple] = {}
            try:
                while len(results) < len(jobs):
                    what, i, payload = await events.get()
                    if what == "gone":
                        cancel()
                        return Response(status_code=499)  # never sent: the client closed the request
                    results[i] = payload
            except asyncio.CancelledError:  # uvicorn's shutdown grace is over: an answer, not a traceback
                return JSONResponse(shut_down.body(), status_code=shut_down.status)
            finally:  # also when uvicorn cancels this task at the end of the shutdown grace
                watcher.cancel()
                if len(results) < len(jobs):
                    cancel()
            errors = [r[3] for r in results.values() if r[3] is not None]
            if errors:
                if isinstance(errors[0], APIError):
                    raise errors[0]
                raise APIError(500, f"generation failed: {errors[0]!r}", type="server_error")
            choices = []
            for i, job in enumerate(jobs):
                text, finish, _, _ = results[i]
                if kind == "chat":
                    content: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
                    if req.logprobs is not None:
                        content["logprobs"] = chat_logprobs(engine.tokenizer, job, req.logprobs)
                else:
                    prompt_text = engine.tokenizer.decode(job.prompt_ids) if req.echo else ""
                    content = {"text": prompt_text + text, "logprobs": None if req.logprobs is None else
                               completion_logprobs(engine.tokenizer, job, req.logprobs, req.echo)}
                choices.append({"index": i, **content, "finish_reason": finish})
            completion = sum(r[2] for r in results.values())
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices,
                    "usage": {"prompt_tokens": usage_prompt, "completion_tokens": completion,
                              "total_tokens": usage_prompt + completion}}

        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat":
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                    ({"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                       "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        async def sse() -> Any:
            try:
                if kind == "chat":
                    yield chunk(None, None, first=True)
                while True:
                    what, _, payload = await events.get()
                    if what == "delta":
                        yield chunk(payload, None)
                        continue
                    text, finish, _, err = payload
                    if err is not None:
                        failure = err if isinstance(err, APIError) else \
                            APIError(500, f"generation failed: {err!r}", type="server_error")
                        yield f"data: {json.dumps(failure.body())}\n\n"
                    else:
                        yield chunk(None, finish)
                    yield "data: [DONE]\n\n"
                    return
            except asyncio.CancelledError:  # the client left, or the shutdown grace is over
                return
            finally:
                cancel()  # the client went away (Starlette cancels the stream): stop generating for it

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Any:
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Any:
        return await handle(request, "chat")

    return app


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Limits()
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--model-name", default=None, help="the name clients ask for (default: the model's name)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: "
                             f"${API_KEY_ENV}; none: no authentication)")
    parser.add_argument("--max-batch", type=int, default=16, help="most choices generated together")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a request waits for others to share its batch")
    parser.add_argument("--max-tokens-limit", type=int, default=d.max_tokens,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max-prompts", type=int, default=d.max_prompts, help="most prompts in one request")
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                        help="most prompt tokens in one request, all prompts together")
    parser.add_argument("--max-completions", type=int, default=d.max_completions,
                        help="most completions (n x prompts) in one request")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body (413 beyond it)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="most choices waiting for a batch (429 with Retry-After beyond it)")
    parser.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="seconds SIGTERM/SIGINT gives requests in flight before cancelling them")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    from nanophi.generate import add_engine_arguments

    add_engine_arguments(parser)


def default_model_name(ref: str) -> str:
    path = Path(ref)
    if path.exists():
        name = path.resolve().name
        return path.resolve().parent.name if name in ("best", "last") or name.startswith("ckpt-") else \
            name.removesuffix(".gguf")
    return ref


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def run(args: argparse.Namespace) -> int:
    import math

    import uvicorn

    from nanophi.generate import engine_from_args

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_batch < 1 or not (math.isfinite(args.batch_window_ms) and args.batch_window_ms >= 0):
        raise UserError("--max-batch must be >= 1 and --batch-window-ms a finite number >= 0")
    if not (math.isfinite(args.shutdown_grace) and args.shutdown_grace >= 0):
        raise UserError(f"--shutdown-grace must be a finite number of seconds >= 0, got {args.shutdown_grace}")
    limits = Limits(args.max_prompts, args.max_prompt_tokens, args.max_completions, args.max_tokens_limit,
                    args.max_body_bytes, args.max_queue)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and (not api_key or any(c.isspace() for c in api_key) or not api_key.isprintable()):
        raise UserError("--api-key must be non-empty printable text without spaces")
    _check_port_free(args.host, args.port)
    engine = engine_from_args(args)
    name = args.model_name or default_model_name(args.model)
    app = create_app(engine, name, args.max_batch, args.batch_window_ms, limits=limits, api_key=api_key)
    if not api_key and not is_loopback(args.host):
        log.warning(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use "
                    f"it; set --api-key or ${API_KEY_ENV}")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_grace)
    server = _server_class()(config, app.state.batcher)
    log.info(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C: finish requests in flight within "
             f"{args.shutdown_grace:g} s; twice: exit now)")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it found:
    # a no-op one, so a clean shutdown exits 0 instead of dying of the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with nanophi's shutdown: the first signal stops the batcher taking new requests and
        starts uvicorn's bounded graceful shutdown; a second one (SIGTERM or SIGINT) exits at once."""

        def __init__(self, config: Any, batcher: Batcher) -> None:
            super().__init__(config)
            self.batcher = batcher

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a signal handler: no logging machinery, no traceback, no cleanup
                os.write(2, f"nanophi serve: {signal.Signals(sig).name} again, exiting now\n".encode())
                os._exit(128 + sig)
            self.batcher.stop_accepting()
            super().handle_exit(sig, frame)

    return Server


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading the model (and with one line) when the address cannot be bound."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
