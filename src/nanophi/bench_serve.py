"""`nanophi bench serve`: generated tokens/s of `nanophi serve` under C concurrent OpenAI clients, beside the
Engine's own batch-C throughput on the same prompts in the same process (issue 18's target: serving keeps >= 80 %).

    nanophi bench serve --model smollm2-135m-instruct --clients 16 --max-tokens 32 --rounds 2 --threads 1

The server is `nanophi serve`'s app (`create_app`: its batcher, limits and endpoints) under uvicorn on a free
loopback port in a thread of this process. Each round, C threads, each with its own `openai.OpenAI` client, send
one completion request at the same instant (C random token-id prompts of --prompt-tokens, --max-tokens, temperature
0), and the Engine runs the same C prompts as one `generate_ids` batch with the same budgets and stop ids; which
goes first alternates between rounds. Both count generated tokens over wall time, prompt reading included, so
the ratio serve / engine is what HTTP, JSON, the batcher's window, the streaming text bookkeeping and a batch
split by late arrivals cost. The clients share the process (and its GIL) with the server: a client on another
machine would cost the server less, so the ratio is if anything pessimistic.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import torch

from nanophi.bench_decode import cpu_flags, spread
from nanophi.errors import UserError

DEFAULT_CLIENTS = 16
SERVE_PIP = "pip install 'nanophi[serve]'"
NAME = "bench"  # the model name the server answers to
STARTUP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 3600  # one request of a loaded machine's batch may take minutes; never retried
TARGET_RATIO = 0.8  # issue 18: serve keeps >= 80 % of the engine's batch throughput


def _import_serve_deps() -> Any:
    """The openai module, once fastapi, uvicorn and openai are all known importable."""
    try:
        import fastapi  # noqa: F401  (create_app imports it; fail here with the one line instead)
        import openai
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"bench serve needs the serve extra (fastapi, uvicorn, openai), and {e.name} is not "
                        f"installed: {SERVE_PIP}") from None
    return openai


class LocalServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread, for a `with` block that gets its root
    URL (the tests' servers are these too)."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:  # a port the kernel says is free now
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="nanophi-bench-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.server.should_exit = True
            raise UserError(f"the server did not start on 127.0.0.1:{self.port} within {STARTUP_TIMEOUT_S} s")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _wave(clients: list[Any], prompts: list[list[int]], max_tokens: int) -> tuple[float, list[Any], list[float]]:
    """Every client sends its prompt at the same instant: (wall seconds until the last answer, the answers in
    prompt order, each request's seconds)."""
    n = len(clients)
    answers: list[Any] = [None] * n
    ends = [0.0] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)

    def client(i: int) -> None:
        start.wait()
        try:
            answers[i] = clients[i].completions.create(model=NAME, prompt=prompts[i], max_tokens=max_tokens,
                                                       temperature=0)
        except BaseException as e:  # reported below, in the caller's thread
            errors.append(e)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed; the first: {errors[0]!r}")
    return max(ends) - t0, answers, [e - t0 for e in ends]


def bench_serve(
    model_ref: str | tuple[Any, Any] = "smollm2-135m-instruct",
    clients: int = DEFAULT_CLIENTS,
    max_tokens: int = 32,
    prompt_tokens: int = 64,
    rounds: int = 2,
    max_batch: int = 16,
    batch_window_ms: float = 10.0,
    dtype: str = "float32",
    quantize: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregate generated tokens/s of `nanophi serve` (its app, in-process) under `clients` concurrent openai
    clients and of the Engine's batch of the same prompts, `rounds` interleaved rounds; the ratio serve/engine
    per round, how many engine batches the server split each wave into, request latencies, and how many
    completions are exactly the engine's greedy text. `max_batch` and `batch_window_ms` are `nanophi serve`'s
    flags (its defaults)."""
    import math

    from nanophi.engine import Engine, load_model_for_inference, parse_dtype
    from nanophi.serve import create_app

    openai = _import_serve_deps()
    if clients < 1 or max_tokens < 1 or prompt_tokens < 1 or rounds < 1 or max_batch < 1:
        raise UserError("bench serve needs --clients, --max-tokens, --prompt-tokens, --rounds and --max-batch >= 1")
    if not (math.isfinite(batch_window_ms) and batch_window_ms >= 0):
        raise UserError(f"--batch-window-ms must be a finite number >= 0, got {batch_window_ms}")
    model, tokenizer = model_ref if isinstance(model_ref, tuple) else load_model_for_inference(model_ref, "cpu")
    model.eval()
    if prompt_tokens + max_tokens > model.config.block_size:
        raise UserError(f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} > the model's context "
                        f"{model.config.block_size}; ask for fewer")
    engine = Engine(model, tokenizer, "cpu", parse_dtype(dtype), quantize)
    prompts = torch.randint(0, model.config.vocab_size, (clients, prompt_tokens),
                            generator=torch.Generator().manual_seed(seed)).tolist()
    app = create_app(engine, NAME, max_batch=max_batch, batch_window_ms=batch_window_ms)
    stats = app.state.batcher.stats
    load_start = os.getloadavg()[0]

    def engine_run(n: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        ids = engine.generate_ids(prompts, n, temperature=0, stop_ids=engine.stop_ids())
        return time.perf_counter() - t0, ids

    tok_s: dict[str, list[float]] = {"serve": [], "engine": []}
    batches: list[int] = []
    with LocalServer(app) as root:
        pool = [openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
                for _ in range(clients)]
        _wave(pool, prompts, 2)  # warm-up: connections, thread pools, kernels' first-call setup
        engine_run(2)
        for r in range(rounds):
            order = ["serve", "engine"] if r % 2 == 0 else ["engine", "serve"]
            for side in order:
                if side == "serve":
                    before = stats["batches"]
                    wall, answers, latencies = _wave(pool, prompts, max_tokens)
                    batches.append(stats["batches"] - before)
                    tok_s["serve"].append(sum(a.usage.completion_tokens for a in answers) / wall)
                else:
                    wall, ids = engine_run(max_tokens)
                    tok_s["engine"].append(sum(map(len, ids)) / wall)
        for c in pool:
            c.close()
    texts = [a.choices[0].text for a in answers]
    same = sum(t == tokenizer.decode(row) for t, row in zip(texts, ids))
    ratios = [s / e for s, e in zip(tok_s["serve"], tok_s["engine"])]
    return {
        "model": "(in memory)" if isinstance(model_ref, tuple) else str(model_ref), "clients": clients,
        "max_batch": max_batch, "batch_window_ms": batch_window_ms, "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens, "rounds": rounds, "dtype": dtype, "quantize": quantize,
        "threads": torch.get_num_threads(), "serve_tok_s": spread(tok_s["serve"]),
        "engine_tok_s": spread(tok_s["engine"]),
        "ratio": spread(ratios),  # serve / engine per round; issue 18's target is >= TARGET_RATIO
        "target_ratio": TARGET_RATIO,
        "serve_batches": batches,  # engine batches each wave of requests became (1: all clients shared one)
        "request_s": spread(latencies),  # the last wave's request latencies
        "completions_equal_engine": same,  # of `clients`: the last wave's texts exactly the engine's greedy ones
        "torch": torch.__version__, "cpu_flags": cpu_flags(),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # at the start and the end
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="run directory, checkpoint, GGUF file, HF directory or alias (default: smollm2-135m-instruct)")
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS,
                   help=f"concurrent openai clients, one request each per round (default: {DEFAULT_CLIENTS})")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="random prompt length in tokens (default: 64)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of serve and engine (default: 2)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default: 16, serve's)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="the server's --batch-window-ms (default: 10, serve's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="CPU: int8 or int4 linear layers, as `nanophi serve --quantize` takes them")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")


def bench_serve_cmd(args: argparse.Namespace) -> dict[str, Any]:
    """`bench_serve` with `nanophi bench serve`'s flags."""
    _import_serve_deps()  # before the model loads: a missing extra is one line, at once
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return bench_serve(args.model, clients=args.clients, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
                       rounds=args.rounds, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                       dtype=args.dtype, quantize=args.quantize)
