"""Best-of-n exercise generation: selection, repair and solution-only, on real sandbox runs.

The teacher here is a stub that returns fixed strings (the point is which candidate is kept and what repair
may change), a real loopback OpenAI-compatible HTTP server, or nanophi's Engine on a tiny random model; the real
SmolLM2 teacher is exercised by `python -m nanophi.textbook.bestofn yield` (docs/textbook_yield.json).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nanophi.textbook import bestofn as b
from nanophi.textbook.records import read_jsonl
from nanophi.textbook.teacher import LocalTeacher, OpenAITeacher


def answer(name: str, expected: int = 3, defined: str | None = None, tail: str = "") -> str:
    """An exercise answer: `defined` (default `name`) sums a list; the asserts call `name`."""
    fn = defined or name
    return (f"```python\ndef {fn}(xs):\n    \"\"\"Return the sum of `xs`.\"\"\"\n    return sum(xs)\n\n\n"
            f"assert {name}([1, 2]) == {expected}\nassert {name}([]) == 0\n{tail}```\nThis function adds.")


class Stub:
    """Returns the next of `answers` for each prompt asked, and records what it was asked."""

    name = "stub"

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.asked, self.seeds = answers, [], []

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, seed: Any = None,
             stop: Any = ()) -> list[str]:
        self.seeds += list(seed)
        out = [self.answers[(len(self.asked) + i) % len(self.answers)] for i in range(len(prompts))]
        self.asked += prompts
        return out


def test_best_of_n_keeps_the_first_verified_candidate_and_stops_asking():
    (p,) = b.exercise_problems(1)
    first_good = answer(p.name).replace("return sum(xs)", "total = 0\n    for x in xs:\n        total += x\n"
                                                              "    return total")
    teacher = Stub([answer(p.name, expected=4), first_good, answer(p.name)])
    (r,) = b.best_of_n(teacher, [p], 8)
    assert [c["raw"] for c in r["candidates"]] == ["tests_failed", "passed"]  # a failing candidate is rejected
    assert len(teacher.asked) == 2  # a verified prompt is not asked again
    assert r["first_raw"] == r["first_fixed"] == 1 and r["kept"]["provenance"]["sample"] == 1
    assert "total += x" in r["kept"]["text"] and r["kept"]["tests"].count("assert") == 2


def test_a_candidate_failing_its_tests_is_rejected_with_or_without_repair():
    (p,) = b.exercise_problems(1)
    (r,) = b.best_of_n(Stub([answer(p.name, expected=7)]), [p], 3)
    assert r["kept"] is None and r["first_fixed"] is None
    assert {c["raw"] for c in r["candidates"]} == {c["fixed"] for c in r["candidates"]} == {"tests_failed"}


def test_repair_renames_a_misnamed_def_and_never_touches_the_tests():
    text = answer("count_votes", defined="tally")
    assert b.check_exercise(text, "count_votes", repair=False).reason == "wrong_name"
    fixed = b.check_exercise(text, "count_votes")
    assert fixed.reason == "ok" and fixed.repairs == ("renamed_tally",)
    assert fixed.tests == "assert count_votes([1, 2]) == 3\nassert count_votes([]) == 0"  # the asserts as written
    assert "def count_votes(xs)" in fixed.solution and "tally" not in fixed.solution
    # asserts that call the def's own name (the worked example copied back) would need the tests edited: rejected
    copied = answer("count_evens")
    assert b.check_exercise(copied, "count_votes").reason == "wrong_name"
    (p,) = b.exercise_problems(1)
    (r,) = b.best_of_n(Stub([answer(p.name, defined="helper")]), [p], 1)
    assert r["first_raw"] is None and r["first_fixed"] == 0  # passes only once repaired, and says so
    assert r["kept"]["provenance"]["repairs"] == ["renamed_helper"]


def test_repair_drops_a_cut_off_tail_and_prose_but_keeps_the_complete_asserts():
    cut = answer("sum_scores", tail="assert sum_scores([5, 5]) == 1")[:-len("0\n```\nThis function adds.")]
    assert b.check_exercise(cut, "sum_scores", repair=False).reason == "syntax_error"
    fixed = b.check_exercise(cut, "sum_scores")
    assert fixed.reason == "ok" and "trailing_lines_dropped" in fixed.repairs
    assert fixed.tests.splitlines() == ["assert sum_scores([1, 2]) == 3", "assert sum_scores([]) == 0"]
    bare = "Here is the code:\n" + answer("sum_scores").split("```python\n")[1].split("```")[0] + "Done."
    assert b.check_exercise(bare, "sum_scores").reason == "ok"


def _solution_problem() -> b.Problem:
    header = 'def add_one(x):\n    """Return x + 1.\n\n    >>> add_one(2)\n    3\n    """\n'
    tests = "assert add_one(2) == 3\nassert add_one(-1) == 0"
    return b.Problem("p-add", "solution", "add_one", b.solution_prompt(header), header=header, tests=tests)


def test_solution_only_puts_the_answer_under_the_fixed_header_and_runs_the_fixed_tests():
    p = _solution_problem()
    assert "def add_one(x):" in p.prompt and "assert" not in p.prompt
    # the answer's own docstring is replaced by the problem's; its body is kept as written
    whole = '```python\ndef add_one(x):\n    """Something else."""\n    return x + 1\n```'
    c = b.check_solution(whole, p)
    assert c.reason == "ok" and c.repairs == () and "Something else" not in c.solution
    assert c.solution.startswith(p.header.rstrip()) and c.tests == p.tests
    body_only = "```python\nreturn x + 1\n```"  # no def line
    assert b.check_solution(body_only, p, repair=False).reason == "no_function"
    assert b.check_solution(body_only, p).repairs == ("def_line_added",)
    renamed = "```python\ndef plus_one(y):\n    return y + 1\n```"
    assert b.check_solution(renamed, p).repairs == ("renamed_plus_one",)
    teacher = Stub(["```python\ndef add_one(x):\n    return x - 1\n```", body_only, whole])
    (r,) = b.best_of_n(teacher, [p], 4, stop_on="raw")
    assert [c["raw"] for c in r["candidates"]] == ["tests_failed", "no_function", "passed"]
    assert r["first_fixed"] == 1 and r["first_raw"] == 2 and r["kept"]["tests"] == p.tests


def test_sample_seeds_do_not_depend_on_n_and_the_cache_resumes(tmp_path):
    probs = b.exercise_problems(3)
    t2 = Stub([answer("x", expected=9)])
    b.best_of_n(t2, probs, 2)
    t4 = Stub([answer("x", expected=9)])
    cache = b.AnswerCache(tmp_path / "cache.jsonl")
    b.best_of_n(t4, probs, 4, cache=cache)
    assert t4.seeds[:6] == t2.seeds and len(set(t4.seeds)) == 12  # the first 2 samples of n=4 are those of n=2
    again = Stub([answer("x")])
    results = b.best_of_n(again, probs, 4, cache=b.AnswerCache(tmp_path / "cache.jsonl"))
    assert again.asked == [] and all(r["kept"] is None for r in results)  # every answer came from the cache
    rows = [b.yield_at(results, k, "first_fixed") for k in (1, 4)]
    assert rows[1] == {"n": 4, "prompts": 3, "prompts_verified": 0, "fraction_prompts_verified": 0.0,
                       "generations": 12, "verified_per_generation": 0.0}


class ExerciseServer(BaseHTTPRequestHandler):
    """A loopback OpenAI-compatible server that answers each exercise prompt with the asked function, correct
    only for odd seeds, and keeps every request body."""

    bodies: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        prompt = body["messages"][-1]["content"]
        asked = re.findall(r"the function `(\w+)`", prompt)[-1]
        text = answer(asked, expected=3 if body["seed"] % 2 else 5).split("\n```")[0]  # cut at the stop
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    handler = type("Handler", (ExerciseServer,), {"bodies": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_best_of_n_through_an_openai_compatible_server(server, tmp_path, capsys):
    handler, url = server
    probs = b.exercise_problems(4)
    results = b.best_of_n(OpenAITeacher(url, "tiny", concurrency=4), probs, 8)
    seeds = [r["candidates"][-1]["seed"] for r in results]
    assert all(s % 2 for s in seeds) and all(r["kept"] for r in results)  # kept = the first odd-seeded sample
    assert all(c["seed"] % 2 == 0 for r in results for c in r["candidates"][:-1])
    assert all(body["stop"] == list(b.STOP) and body["temperature"] == b.TEMPERATURE for body in handler.bodies)
    sent = sorted(body["seed"] for body in handler.bodies)
    assert sent == sorted(c["seed"] for r in results for c in r["candidates"])  # one seed per (prompt, sample)
    out = tmp_path / "kept.jsonl"
    assert b.main(["generate", "--prompts", "3", "--n", "8", "--out", str(out), "--teacher", f"openai:{url}",
                   "--teacher-model", "tiny"]) == 0
    kept = list(read_jsonl(out))
    assert len(kept) == 3 and all(k["provenance"]["teacher"] == f"openai:tiny@{url}" for k in kept)
    assert "3 of 3 problems verified" in capsys.readouterr().out
    assert b.main(["generate", "--strategy", "nope", "--out", str(out), "--teacher", f"openai:{url}",
                   "--teacher-model", "tiny"]) == 2
    assert b.main(["generate", "--temperature", "0", "--out", str(out)]) == 2  # before any teacher loads


def test_local_teacher_seeds_each_prompt_and_cuts_at_a_stop_string():
    import torch

    from nanophi.engine import Engine
    from nanophi.model import PRESETS, GPT, GPTConfig
    from nanophi.tokenizer import CharTokenizer

    chars = "".join(chr(c) for c in range(32, 127)) + "\n"
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=len(chars), **PRESETS["llama"]))
    teacher = LocalTeacher.from_engine(Engine(model.eval(), CharTokenizer(sorted(chars))), batch_size=4)
    both = teacher.complete(["ab", "cd"], 12, 1.0, seed=[5, 6])
    alone = teacher.complete(["cd"], 12, 1.0, seed=[6])
    assert both[1] == alone[0]  # a prompt's sample does not depend on its batch-mates
    stop = both[0][3:5]
    cut = teacher.complete(["ab"], 12, 1.0, seed=[5], stop=[stop])
    assert cut == [both[0][:both[0].find(stop)]]


def test_yield_command_writes_the_table_per_n(server, tmp_path):
    _, url = server
    out = tmp_path / "yield.json"
    assert b.main(["yield", "--out", str(out), "--strategies", "exercise-v2", "--prompts", "3", "--n", "4",
                   "--teacher", f"openai:{url}", "--teacher-model", "tiny", "--cache", str(tmp_path / "c.jsonl")]) == 0
    table = json.loads(out.read_text())["strategies"]["exercise-v2"]
    assert [row["n"] for row in table["as_written"]] == [1, 2, 4]
    assert table["repaired"][-1]["prompts_verified"] == len(table["verified"]) > 0
    fractions = [row["fraction_prompts_verified"] for row in table["repaired"]]
    assert fractions == sorted(fractions)  # best-of-k never verifies fewer prompts than best-of-(k-1)
    assert b.main(["yield", "--out", str(out), "--strategies", "nope", "--teacher", f"openai:{url}",
                   "--teacher-model", "tiny"]) == 2


def test_solution_problems_never_draw_a_held_out_exercise(tmp_path):
    # An exercise set as experiment.exercises.exercise_set writes it: a key line, then one exercise per line.
    drawn = b.mined_problems(2, seed=3)
    assert len(drawn) == 2
    held = drawn[0].fields["source_id"]
    cache = tmp_path / "exercises.jsonl"
    cache.write_text(json.dumps({"key": {"version": 0}, "counts": {}}) + "\n"
                     + json.dumps({"id": held, "split": "heldout"}) + "\n"
                     + json.dumps({"id": drawn[1].id, "split": "train"}) + "\n")
    assert b.heldout_ids(cache) == {held}
    again = b.problems_for("solution", 2, 3, cache)
    assert held not in {p.id for p in again} and drawn[1].id in {p.id for p in again}
    with pytest.raises(b.UserError, match="--exercise-set"):
        b.problems_for("solution", 2, 3, None)  # no exercise set, no solution problems
    assert b.main(["generate", "--out", str(tmp_path / "k.jsonl"), "--strategy", "solution"]) == 2
