"""Shared fixtures: a small corpus written per test, a private cache so tests never share state, and a loopback
server for the HTTP tests."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# A few paragraphs of plain English with some unicode, repeated so a tiny model has something to learn.
CORPUS = """It was the best of small models, it was the worst of small models. The tokenizer counted every
character, the optimizer took its steps, and the loss went down — slowly at first, then all at once.
Miss Bennet read the letter twice; the second time she smiled. « Naïve », said the café owner, and the
conversation turned to the weather, which was fine, and to the ball, which was finer still.
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("nanophi-cache")
    monkeypatch.setenv("NANOPHI_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS * 40, encoding="utf-8")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free loopback port in a daemon thread; yields its base URL."""
    from nanophi.bench_serve import LocalServer

    with LocalServer(app) as root:
        yield root


@contextlib.contextmanager
def serve_gutenberg(tmp_path: Path, book: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A loopback HTTP server holding `book` as Gutenberg #1342 where gutenberg.org keeps it, with
    $NANOPHI_GUTENBERG_URL pointing at it; yields the list of paths requested."""
    root = tmp_path / "site"
    (root / "cache/epub/1342").mkdir(parents=True)
    (root / "cache/epub/1342/pg1342.txt").write_bytes(book.encode("utf-8"))
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NANOPHI_GUTENBERG_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield requests
    finally:
        server.shutdown()
        server.server_close()


ASCII = "".join(chr(c) for c in range(32, 127)) + "\n"


def tiny_ascii_model() -> Any:
    """A random-weights llama-style GPT over printable ASCII (`ASCII`, as a CharTokenizer's sorted alphabet): no
    EOS, so every row runs its whole budget; weights N(0, 0.3) so greedy text varies by prompt."""
    import torch

    from nanophi.model import GPT, PRESETS, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=len(ASCII), **PRESETS["llama"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()
