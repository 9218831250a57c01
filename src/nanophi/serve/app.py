"""The FastAPI app: the endpoints, the API-key middleware, bounded body reading, and the answers (whole or as
server-sent events) assembled from the batcher's results."""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and the
# Request class they name is imported lazily inside `create_app`.
import asyncio
import hmac
import json
import time
import uuid
from typing import Any, Callable

from nanophi.errors import UserError
from nanophi.serve.batcher import Batcher, Job
from nanophi.serve.errors import APIError
from nanophi.serve.logprobs import chat_logprobs, completion_logprobs
from nanophi.serve.request import (MAX_TOKENS_LIMIT, Limits, Request, parse_json, parse_request, render_chat,
                                   tokenizer_card)

DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, liveness probes)


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
        body = parse_json(raw)
        check_model(body)
        if "messages" in body:
            text = render_chat(body["messages"], engine.tokenizer)
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
        body = parse_json(raw)
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
        return parse_request(parse_json(raw), kind, engine, model_name, limits)

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
