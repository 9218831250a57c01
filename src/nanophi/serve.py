"""An OpenAI-compatible HTTP server: `nanophi serve MODEL --port 8000`.

    GET  /v1/models             the one model served (its name: --model-name, default the reference's name)
    POST /v1/completions        prompt (string, list of strings, or token ids) -> continuation
    POST /v1/chat/completions   messages -> reply, through the tokenizer's chat template
    GET  /health                liveness, and how many requests the batcher has grouped so far

`"stream": true` answers with server-sent events (`data: {...}\\n\\n` ... `data: [DONE]\\n\\n`). Errors are 4xx/5xx
with OpenAI's body: {"error": {"message", "type", "param", "code"}}.

Requests are queued; one worker thread takes every waiting request with the same sampling settings (up to
--max-batch, after waiting --batch-window-ms for company) and runs them as one Engine batch, so concurrent clients
share each forward pass. SIGINT/SIGTERM stop accepting connections, let requests in flight finish, and exit 0.
FastAPI and uvicorn are imported only when the server starts.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the
# Request class they name is imported lazily inside `create_app`.
import argparse
import asyncio
import collections
import json
import logging
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
MAX_N = 8  # choices per request
MAX_STOPS = 4  # OpenAI's limit on stop strings
TEMPERATURE_RANGE = (0.0, 2.0)
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias", "best_of")


class APIError(Exception):
    """A request the server refuses, with the status and OpenAI error fields to send back."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the batching worker -------------------------------------------------------------------------------------
@dataclass
class Job:
    """One choice of one request: a prompt to continue and where its text goes."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: tuple[float, int | None, float | None, int | None]  # temperature, top_k, top_p, seed
    stops: list[str]
    on_delta: Callable[[str], None] | None  # streaming: called from the worker thread
    on_done: Callable[[str, str, int, BaseException | None], None]  # text, finish_reason, tokens, error
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """A queue of Jobs and one thread that runs them in Engine batches of equal sampling settings."""

    def __init__(self, engine: Any, max_batch: int = 16, window_s: float = 0.01) -> None:
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.closing = False
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0}
        self.thread = threading.Thread(target=self._loop, name="nanophi-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self.queue.append(job)
            self.stats["requests"] += 1
            self.cond.notify()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if not self.queue:
                return None
        time.sleep(self.window_s)  # let concurrent requests arrive and join this batch
        with self.cond:
            key = self.queue[0].sampling
            batch = [j for j in self.queue if j.sampling == key][: self.max_batch]
            for j in batch:
                self.queue.remove(j)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.stats["batches"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            try:
                self._run(batch)
            except BaseException as e:  # a bug or OOM: fail these requests, keep serving
                log.exception("generation failed")
                for job in batch:
                    job.on_done("", "error", 0, e)

    def _run(self, batch: list[Job]) -> None:
        from nanophi.generate import TextStream

        streams = [TextStream(self.engine.tokenizer, j.stops, j.on_delta) for j in batch]
        temperature, top_k, top_p, seed = batch[0].sampling

        def should_stop(i: int, ids: list[int]) -> bool:
            return streams[i].push(ids) or batch[i].cancelled.is_set()

        ids = self.engine.generate_ids([j.prompt_ids for j in batch], [j.max_tokens for j in batch], temperature,
                                       top_k, top_p, seed, stop_ids=self.engine.stop_ids(), should_stop=should_stop)
        for job, stream, new in zip(batch, streams, ids):
            text = stream.finish(new)
            finish = "length" if len(new) >= job.max_tokens and not stream.stopped else "stop"
            job.on_done(text, finish, len(new), None)


# --- request parsing -----------------------------------------------------------------------------------------
@dataclass
class Request:
    prompts: list[list[int]]  # one per choice (n copies of each prompt)
    max_tokens: int
    sampling: tuple[float, int | None, float | None, int | None]
    stops: list[str]
    stream: bool


def parse_request(body: Any, kind: str, engine: Any, model_name: str, max_tokens_limit: int) -> Request:
    """Validate an OpenAI request body; APIError (4xx) on anything the server cannot honour."""
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
    tokenizer = engine.tokenizer
    if kind == "chat":
        texts = [_render_chat(body.get("messages"), tokenizer)]
    else:
        texts = _prompts(body.get("prompt"))
    try:
        prompts = [t if isinstance(t, list) else engine.encode_prompts([t])[0] for t in texts]
    except UserError as e:  # e.g. a character a char-level model has never seen
        raise APIError(400, f"cannot tokenize the prompt: {e}", param="messages" if kind == "chat" else "prompt")
    vocab = engine.model.config.vocab_size
    limit = engine.block_size - 1
    for p in prompts:
        if any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        if len(p) > limit:
            raise APIError(400, f"the prompt has {len(p)} tokens; this model's context holds {engine.block_size}, "
                           f"so a prompt may have at most {limit}", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
    max_key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _int(body, max_key, DEFAULT_MAX_TOKENS, 1, max_tokens_limit)
    n = _int(body, "n", 1, 1, MAX_N)
    temperature = _number(body, "temperature", 1.0, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise APIError(400, "'top_p' must be > 0", param="top_p")
    top_k = body.get("top_k")  # not OpenAI's, but vLLM and llama.cpp accept it
    if top_k is not None:
        top_k = _int(body, "top_k", None, 1, vocab)
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
    sampling = (0.0, None, None, None) if temperature == 0 else (temperature, top_k, top_p, seed)
    return Request([p for p in prompts for _ in range(n)], max_tokens, sampling, stops, stream)


def _prompts(prompt: Any) -> list[str | list[int]]:
    def token_list(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_list(p) for p in prompt):
        return list(prompt)
    raise APIError(400, "'prompt' must be a string, a list of strings, or a list of token ids", param="prompt")


def _render_chat(messages: Any, tokenizer: Any) -> str:
    from nanophi.chat import apply_chat_template

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


# --- the app -------------------------------------------------------------------------------------------------
def create_app(engine: Any, model_name: str, max_batch: int = 16, batch_window_ms: float = 10.0,
               max_tokens_limit: int = MAX_TOKENS_LIMIT) -> Any:
    """The FastAPI app serving `engine` as `model_name`."""
    import contextlib

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = Batcher(engine, max_batch, batch_window_ms / 1000)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        batcher.start()
        yield
        batcher.close()  # uvicorn has already waited for requests in flight

    app = FastAPI(title="nanophi", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **batcher.stats}

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

    async def handle(request: HTTPRequest, kind: str) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        req = parse_request(body, kind, engine, model_name, max_tokens_limit)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(item: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        jobs = [Job(p, req.max_tokens, req.sampling, req.stops,
                    (lambda d, i=i: post(("delta", i, d))) if req.stream else None,
                    lambda text, finish, n, err, i=i: post(("done", i, (text, finish, n, err))))
                for i, p in enumerate(req.prompts)]
        for job in jobs:
            batcher.submit(job)
        usage_prompt = sum(len(p) for p in req.prompts)
        if not req.stream:
            results: dict[int, tuple] = {}
            while len(results) < len(jobs):
                _, i, payload = await events.get()
                results[i] = payload
            errors = [r[3] for r in results.values() if r[3] is not None]
            if errors:
                raise APIError(500, f"generation failed: {errors[0]!r}", type="server_error")
            choices = []
            for i in range(len(jobs)):
                text, finish, _, _ = results[i]
                content = {"message": {"role": "assistant", "content": text}} if kind == "chat" else \
                    {"text": text, "logprobs": None}
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
                        failure = APIError(500, f"generation failed: {err!r}", type="server_error")
                        yield f"data: {json.dumps(failure.body())}\n\n"
                    else:
                        yield chunk(None, finish)
                    yield "data: [DONE]\n\n"
                    return
            finally:
                for job in jobs:  # the client went away: stop generating for it
                    job.cancelled.set()

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
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument("--model-name", default=None, help="the name clients ask for (default: the model's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests generated together")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a request waits for others to share its batch")
    parser.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT,
                        help="the largest max_tokens a request may ask for")
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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from nanophi.generate import engine_from_args

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be from 1 to 65535, got {args.port}")
    if args.max_batch < 1 or args.max_tokens_limit < 1 or args.batch_window_ms < 0:
        raise UserError("--max-batch and --max-tokens-limit must be >= 1, --batch-window-ms >= 0")
    _check_port_free(args.host, args.port)
    engine = engine_from_args(args)
    name = args.model_name or default_model_name(args.model)
    app = create_app(engine, name, args.max_batch, args.batch_window_ms, args.max_tokens_limit)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    log.info(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops after requests in flight)")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler it found:
    # a no-op one, so a clean shutdown exits 0 instead of dying of the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading the model (and with one line) when the address cannot be bound."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
