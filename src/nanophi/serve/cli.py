"""`nanophi serve MODEL`: the flags, the checks made before the model loads, and uvicorn with nanophi's
shutdown (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

from nanophi.errors import UserError
from nanophi.serve.app import create_app
from nanophi.serve.batcher import Batcher
from nanophi.serve.request import Limits

log = logging.getLogger(__name__)

API_KEY_ENV = "NANOPHI_API_KEY"


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
