"""The OpenAI-compatible server, through the official `openai` client on 127.0.0.1: completions, chat, streaming,
errors, concurrent requests sharing batches, and a graceful SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, serve_in_thread
import torch

from nanophi import checkpoint
from nanophi.chat_template import PLAIN_TEMPLATE, apply_chat_template
from nanophi.engine import Engine
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

NAME = "tiny"
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=len(CHARS),
                          **PRESETS["llama"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def engine(model: GPT) -> Engine:
    return Engine(model, CharTokenizer(sorted(CHARS)))


@pytest.fixture(scope="module")
def server(engine: Engine):
    from nanophi.serve import create_app

    app = create_app(engine, NAME, max_batch=8, batch_window_ms=300)  # a wide window: concurrent tests batch
    with serve_in_thread(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_completion_is_the_engines_greedy_text(client, engine: Engine) -> None:
    r = client.completions.create(model=NAME, prompt="It was the", max_tokens=20, temperature=0)
    expected = engine.generate(["It was the"], 20, temperature=0)[0]
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("It was the") and r.usage.completion_tokens == 20
    several = client.completions.create(model=NAME, prompt=["It was the", "Mr"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == expected[:5]


def test_stop_string_ends_the_completion(client, engine: Engine) -> None:
    full = engine.generate(["It was the"], 20, temperature=0)[0]
    r = client.completions.create(model=NAME, prompt="It was the", max_tokens=20, temperature=0, stop=[full[6:8]])
    assert r.choices[0].text == full[: full.find(full[6:8])] and r.choices[0].finish_reason == "stop"


def test_chat_completion_uses_the_template(client, engine: Engine) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    prompt = apply_chat_template(engine.tokenizer, msgs, template=PLAIN_TEMPLATE)  # a char model has no template
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == engine.generate([prompt], 12, temperature=0)[0]


def test_streaming_gives_the_same_text(client) -> None:
    kw = dict(model=NAME, max_tokens=25, temperature=0)
    whole = client.completions.create(prompt="The", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="The", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole and chunks[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole


def test_raw_sse_framing(server) -> None:
    with httpx.stream("POST", server[0] + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": "It", "max_tokens": 3, "stream": True}) as r:
        body = "".join(r.iter_text())
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2]) and len(events) >= 3
    assert r.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize("kw,status,param", [
    (dict(max_tokens=-1), 400, "max_tokens"),
    (dict(max_tokens=10**9), 400, "max_tokens"),
    (dict(temperature=5.0), 400, "temperature"),
    (dict(temperature="hot"), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(n=100), 400, "n"),
    (dict(stop=list("abcdefghijklmnopq")), 400, "stop"),
    (dict(prompt="x" * 500), 400, "prompt"),
    (dict(prompt="caf\u00e9"), 400, "prompt"),  # a character the char-level model has never seen
    (dict(model="gpt-4"), 404, "model"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(logprobs=True), 400, "logprobs"),
    (dict(max_tokens=0), 400, "max_tokens"),  # 0 only scores a prompt: with echo
    (dict(suffix="x"), 400, "suffix"),
])
def test_bad_requests_get_openai_errors(client, kw: dict, status: int, param: str) -> None:
    args = dict(model=NAME, prompt="It was", max_tokens=5) | kw
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**args)
    assert e.value.status_code == status
    err = e.value.body if "message" in e.value.body else e.value.body["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if kw.get("prompt", "").startswith("xxx"):
        assert err["code"] == "context_length_exceeded"


def test_malformed_bodies_and_paths(server, client) -> None:
    base = server[0]
    for body in (b"{not json", b"[1, 2]", b'{"model": "tiny"}'):
        r = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "wizard"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(base + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)


def test_concurrent_requests_share_batches_and_stay_correct(server, client, engine: Engine) -> None:
    prompts = ["It was", "The loss went", "M", "small models, it", "Hello", "went down"]
    expected = engine.generate(prompts, 15, temperature=0)
    before = httpx.get(server[0] + "/health").json()

    def ask(p: str) -> str:
        return client.completions.create(model=NAME, prompt=p, max_tokens=15, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert got == expected
    after = httpx.get(server[0] + "/health").json()
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # some requests shared a forward pass


def test_different_seeds_and_settings_share_one_batch(server, client, engine: Engine) -> None:
    """12 clients, each its own seed/temperature/top_p/top_k: one or two forward-pass batches (they used to run
    two at a time), and each gets what it would alone: a row's seed is its own generator."""
    from nanophi.sampling import Sampling

    settings = [dict(seed=s, temperature=0.5 + 0.1 * s, top_p=[1.0, 0.9, 0.7][s % 3], top_k=[None, 5, 20][s % 3])
                for s in range(12)]
    before = httpx.get(server[0] + "/health").json()

    def ask(kw: dict) -> str:
        return client.completions.create(model=NAME, prompt="It was", max_tokens=12, extra_body=(
            {"top_k": kw["top_k"]} if kw["top_k"] else None), seed=kw["seed"], temperature=kw["temperature"],
            top_p=kw["top_p"]).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        got = list(pool.map(ask, settings))
    after = httpx.get(server[0] + "/health").json()
    print(f"\n{len(settings)} clients with different sampling settings ran in {after['batches'] - before['batches']} "
          f"batch(es)")
    assert after["batches"] - before["batches"] <= 2
    for kw, text in zip(settings, got):
        alone = Sampling(kw["temperature"], kw["top_k"], kw["top_p"] if kw["top_p"] < 1 else None, kw["seed"])
        assert text == engine.generate(["It was"], 12, sampling=[alone])[0]
    assert len(set(got)) > 1


def test_sigterm_finishes_the_request_in_flight_and_exits_0(model: GPT, engine: Engine, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    engine.tokenizer.save(tok_dir)
    run = tmp_path / "run"
    checkpoint.save(run, 0, model, {"model": model.config.to_dict()}, {}, None, tok_dir)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanophi.cli", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(base + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        text = ""
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"model": "run", "prompt": "It", "max_tokens": 400, "stream": True,
                                "temperature": 0}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):  # generation has started: now ask the server to stop
                    text += json.loads(line[6:])["choices"][0]["text"]
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        text += "".join(json.loads(l[6:])["choices"][0]["text"] for l in rest[:-1])
        assert text == engine.generate(["It"], 400, temperature=0)[0]
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
