"""No request can stall `nanophi serve` (issue 14): limits refused fast in OpenAI's error shape, the API key,
abandoned requests cancelled, and a bounded shutdown. Loopback only (127.0.0.1); real `nanophi serve`
subprocesses on a tiny model, the real `openai` client. Timings are printed (pytest -s), bounded loosely."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ASCII as CHARS
from conftest import free_port, serve_in_thread
from conftest import tiny_ascii_model as tiny_model

from nanophi import checkpoint
from nanophi.tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-nanophi"
AUTH = {"Authorization": f"Bearer {KEY}"}




def save_run(tmp: Path) -> Path:
    model, tok = tiny_model(), CharTokenizer(sorted(CHARS))
    tok.save(tmp / "tok")
    checkpoint.save(tmp / "run", 0, model, {"model": model.config.to_dict()}, {}, None, tmp / "tok")
    return tmp / "run"


def start_server(run: Path, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanophi.cli", "serve", str(run), "--port", str(port), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stdout.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def health(base: str) -> dict:
    return httpx.get(base + "/health", timeout=10).json()


def wait_for(base: str, cond, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(base)
        if cond(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting; /health says {h}")


def open_request(base: str, body: dict, headers: dict = AUTH) -> socket.socket:
    """A raw POST left unread: the test decides when this client hangs up."""
    port = int(base.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`nanophi serve` with the default limits, the key from $NANOPHI_API_KEY and a 2 s shutdown grace."""
    proc, base = start_server(save_run(tmp_path_factory.mktemp("served")), "--shutdown-grace", "2",
                              env={"NANOPHI_API_KEY": KEY})
    yield proc, base
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_the_api_key_is_required_everywhere_but_health(served) -> None:
    _, base = served
    assert httpx.get(base + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(base + "/v1/models", headers=headers)
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert client.completions.create(model="run", prompt="It was", max_tokens=3).usage.completion_tokens == 3
    r = httpx.post(base + "/v1/completions", json={"model": "run", "prompt": "It", "max_tokens": 2})
    assert r.status_code == 401  # checked before anything else: not a 400 about the body


def post_raw(base: str, head: bytes, body_chunks, read_timeout: float = 30.0) -> tuple[int, float]:
    """Send a request by hand (so a 50 MB body can be refused mid-upload); its status and the seconds it took."""
    port = int(base.rsplit(":", 1)[1])
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(read_timeout)
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server refused and closed: read its answer
            pass
        reply = b""
        try:
            while b"\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except ConnectionResetError:
            pass
    return int(reply.split(b" ", 2)[1]), time.perf_counter() - t0


def test_oversized_requests_are_refused_fast_while_a_normal_request_is_served(served) -> None:
    proc, base = served
    rss_before = rss_mb(proc.pid)
    million = json.dumps({"model": "run", "prompt": ["a"] * 1_000_000, "max_tokens": 1}).encode()  # 6 MB
    auth = f"Authorization: Bearer {KEY}\r\n".encode()

    def million_prompts() -> tuple[int, float]:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth + \
            f"Content-Length: {len(million)}\r\n\r\n".encode()
        return post_raw(base, head, [million])

    def fifty_mb_declared() -> tuple[int, float]:  # Content-Length says it all
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + f"Content-Length: {50 * 2**20}\r\n\r\n".encode()
        return post_raw(base, head, (b"x" * 2**20 for _ in range(50)))

    def fifty_mb_chunked() -> tuple[int, float]:  # no length: refused once 8 MiB have been read
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
        return post_raw(base, head, (b"100000\r\n" + b"x" * 2**20 + b"\r\n" for _ in range(50)))

    def normal() -> tuple[int, float]:
        time.sleep(0.05)  # while the big ones are being sent
        t0 = time.perf_counter()
        r = httpx.post(base + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "run", "prompt": "It was", "max_tokens": 2})
        return r.status_code, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(f) for name, f in [("million", million_prompts), ("declared", fifty_mb_declared),
                                                         ("chunked", fifty_mb_chunked), ("normal", normal)]}
        got = {name: f.result() for name, f in futures.items()}
    rss_after = rss_mb(proc.pid)
    print(f"\nrefused: 1M-prompt list {got['million'][1]:.3f} s, 50 MB declared {got['declared'][1]:.3f} s, "
          f"50 MB chunked {got['chunked'][1]:.3f} s; normal request during them: {got['normal'][1]:.3f} s; "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert [got[k][0] for k in ("million", "declared", "chunked", "normal")] == [400, 413, 413, 200]
    assert got["normal"][1] < 10  # well under a second on an idle machine; this one is shared
    assert rss_after - rss_before < 200  # a million queued jobs used to take GBs
    assert health(base)["queued"] == 0


def test_an_abandoned_request_stops_costing_compute(served) -> None:
    _, base = served
    for stream in (False, True):
        before = health(base)
        n, max_tokens = (1, 4096) if stream else (8, 1024)
        sock = open_request(base, {"model": "run", "prompt": "It", "n": n, "max_tokens": max_tokens,
                                   "temperature": 1.0, "stream": stream})
        wait_for(base, lambda h: h["running"] == n)  # it is generating: now the client hangs up
        if stream:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.close()
        t0 = time.perf_counter()
        after = wait_for(base, lambda h: h["running"] == 0 and h["cancelled"] - before["cancelled"] == n)
        stopped = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = httpx.post(base + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "run", "prompt": "It was", "max_tokens": 2})
        small = time.perf_counter() - t0
        spent = after["completion_tokens"] - before["completion_tokens"]
        print(f"\nabandoned {n} x {max_tokens} tokens ({'streaming' if stream else 'not streaming'}): stopped "
              f"{stopped:.2f} s after the hang-up, {spent} tokens generated; a 2-token request then took {small:.3f} s")
        assert r.status_code == 200 and spent < n * max_tokens // 4


def test_sigterm_cancels_what_outlives_the_grace_and_exits_0(served) -> None:
    """Last in this module: it stops the shared server."""
    proc, base = served
    sock = open_request(base, {"model": "run", "prompt": "It", "n": 8, "max_tokens": 4096})
    wait_for(base, lambda h: h["running"] == 8)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.perf_counter() - t0
    out = proc.stdout.read()
    sock.close()
    print(f"\nSIGTERM with 8 x 4096 tokens in flight and a 2 s grace: exited {rc} after {took:.2f} s")
    assert rc == 0 and "Traceback" not in out, out


def test_a_second_signal_exits_at_once_without_a_traceback(tmp_path: Path) -> None:
    proc, base = start_server(save_run(tmp_path), "--shutdown-grace", "600")
    try:
        sock = open_request(base, {"model": "run", "prompt": "It", "n": 8, "max_tokens": 4096}, headers={})
        wait_for(base, lambda h: h["running"] == 8)
        proc.send_signal(signal.SIGTERM)  # graceful: would wait up to 600 s for the request
        time.sleep(0.5)
        assert proc.poll() is None
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        print(f"\nsecond signal: exited {rc} after {time.perf_counter() - t0:.3f} s")
        out = proc.stdout.read()
        assert rc == 128 + signal.SIGINT and "Traceback" not in out and "exiting now" in out, out
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- limits, in process (an app per case: small limits) --------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """An in-process server with small limits and one row per batch, so its queue fills."""
    from nanophi.engine import Engine
    from nanophi.serve import Limits, create_app

    engine = Engine(tiny_model(), CharTokenizer(sorted(CHARS)))
    limits = Limits(max_prompts=4, max_prompt_tokens=40, max_completions=6, max_tokens=500, max_body_bytes=4096,
                    max_queue=6)
    app = create_app(engine, "tiny", max_batch=1, batch_window_ms=0, limits=limits)
    with serve_in_thread(app) as base:
        yield base


@pytest.mark.parametrize("body,status,param,code", [
    (dict(prompt=["a"] * 5), 400, "prompt", "too_many_prompts"),
    (dict(prompt=["a", "b"], n=4), 400, "n", "too_many_completions"),
    (dict(prompt=["It was the best of"] * 3), 400, "prompt", "too_many_tokens"),
    (dict(prompt=[[1] * 30, [2] * 30]), 400, "prompt", "too_many_tokens"),
    (dict(max_tokens=501), 400, "max_tokens", None),
    (dict(prompt="x" * 5000), 413, None, "request_too_large"),
    (dict(temperature=float("nan")), 400, "temperature", None),
    (dict(temperature=float("inf")), 400, "temperature", None),
    (dict(top_p=float("nan")), 400, "top_p", None),
    (dict(top_k=0), 400, "top_k", None),
    (dict(top_k=1.5), 400, "top_k", None),
    (dict(repetition_penalty=float("nan")), 400, "repetition_penalty", None),
    (dict(repetition_penalty=0), 400, "repetition_penalty", None),
    (dict(max_tokens=float("nan")), 400, "max_tokens", None),
    (dict(n=float("inf")), 400, "n", None),
])
def test_limits_and_nonsense_get_openai_errors(small: str, body: dict, status: int, param: str | None,
                                                code: str | None) -> None:
    # json.dumps writes NaN/Infinity, which Python's and many clients' JSON accept: the range checks refuse them
    r = httpx.post(small + "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "It"} | body),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    if code:
        assert err["code"] == code


def test_a_full_queue_answers_429_with_retry_after(small: str) -> None:
    client = openai.OpenAI(base_url=small + "/v1", api_key="unused", max_retries=0, timeout=120)
    busy = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="It", n=6, max_tokens=300))
    busy.start()  # one row runs (max_batch=1), five wait: the queue (6) has room for one more
    wait_for(small, lambda h: h["running"] == 1 and h["queued"] == 5)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="It", n=2, max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "rate_limit_exceeded"
    assert client.completions.create(model="tiny", prompt="It", max_tokens=2).choices[0].text is not None
    busy.join(timeout=120)


def test_serve_flags_are_checked_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nanophi.cli import main

    for flags in (["--max-prompts", "0"], ["--max-queue", "4", "--max-completions", "8"],
                  ["--shutdown-grace", "nan"], ["--api-key", ""]):
        assert main(["serve", str(tmp_path / "none"), "--port", str(free_port()), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("nanophi serve: error:"), err


def test_only_loopback_hosts_count_as_private() -> None:
    """`nanophi serve --host H` without a key warns unless H is loopback (the warning itself is one log line)."""
    from nanophi.serve.cli import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))
