"""lm-evaluation-harness scores nanophi models (issue 16): `nanophi serve` answers lm-eval's `local-completions`
(echo + logprobs, max_tokens 0, token-id prompts, /tokenize) and `nanophi eval --tasks` runs lm-eval in-process,
and both give the same accuracies and per-choice loglikelihoods as lm-eval's own `hf` model on the HF export of
the same weights (a perplexity task against transformers' own forward pass). Real lm-eval, a real (tiny, briefly
trained) model, three local JSON tasks; loopback only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import serve_in_thread

lm_eval = pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

from nanophi.cli import main  # noqa: E402

BLOCK = 64
TASKS = ("nanophi_mc", "nanophi_gen", "nanophi_ppl")
TOL = 1e-4


def write_tasks(root: Path, text: str, n_docs: int = 20) -> Path:
    """A 4-way multiple-choice task (which three words follow six words of the corpus) and a generation task
    (continue those six words up to the next comma or full stop), as lm-eval YAML over local JSON files."""
    words = text.split()
    mc, gen = [], []
    for i in range(n_docs):
        at = (5 * i) % (len(words) - 12)
        spans = [" " + " ".join(words[j:j + 3]) for j in (at + 6, at + 1, at + 11, at + 3)]
        answer = i % 4
        spans[0], spans[answer] = spans[answer], spans[0]
        mc.append({"question": " ".join(words[at:at + 6]), "choices": spans, "answer": answer})
        rest = " " + " ".join(words[at + 6:])
        gen.append({"prompt": " ".join(words[at:at + 6]), "target": re.split(r"[,.;]", rest)[0]})
    # perplexity: whole passages several context windows long, so loglikelihood_rolling scores them in windows
    ppl = [{"text": " ".join(words[(40 * i) % (len(words) - 160):][:160])} for i in range(4)]
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (tasks / f"{name}.json").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{path}}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: nanophi_mc\n" + common.format(path=tasks / "mc.json") +
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        "task: nanophi_gen\n" + common.format(path=tasks / "gen.json") +
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\",\", \".\", \";\", \"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n  - metric: bleu\n")
    (tasks / "ppl.yaml").write_text(
        "task: nanophi_ppl\n" + common.format(path=tasks / "ppl.json") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"{{text}}\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return tasks


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A llama-preset GPT with a byte-level BPE tokenizer, trained 40 steps; its HF export; the two tasks."""
    from conftest import CORPUS

    root = tmp_path_factory.mktemp("harness")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 40, encoding="utf-8")
    run, hf = root / "run", root / "hf"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--tokenizer", "bpe", "--vocab-size", "320",
                 "--preset", "llama", "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size",
                 str(BLOCK), "--batch-size", "8", "--max-iters", "40", "--eval-interval", "40", "--log-interval",
                 "40", "--warmup-iters", "5", "--lr", "3e-3", "--dashboard", "off"]) == 0
    assert main(["export", str(run), "--format", "hf", "--out", str(hf)]) == 0
    return {"run": run, "hf": hf, "tasks": write_tasks(root, CORPUS), "root": root}


def evaluate(model: Any, model_args: Any, tasks_dir: Path) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), log_samples=True)


def per_choice(results: dict[str, Any]) -> list[float]:
    """Every loglikelihood the multiple-choice task scored, in document order."""
    docs = sorted(results["samples"]["nanophi_mc"], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in docs for r in s["resps"]]


def rolling(results: dict[str, Any]) -> list[float]:
    """The perplexity task's whole-passage loglikelihoods, in document order."""
    docs = sorted(results["samples"]["nanophi_ppl"], key=lambda s: s["doc_id"])
    return [float(s["resps"][0][0]) for s in docs]


def transformers_rolling(world: dict[str, Any], max_seq_len: int) -> list[float]:
    """Each perplexity passage's loglikelihood from transformers itself on the HF export, in lm-eval's disjoint
    rolling windows of `max_seq_len` tokens. The window differs by client: lm-eval's API models keep one position
    for the token they ask to be generated (`max_length - 1`) and then window at one less again (`max_length - 2`);
    its hf model and nanophi's in-process model window at the whole context."""
    import torch
    from lm_eval import utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["hf"])
    model = AutoModelForCausalLM.from_pretrained(world["hf"], dtype=torch.float32)
    totals = []
    for line in (world["tasks"] / "ppl.json").read_text().splitlines():
        ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        total = 0.0
        for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=max_seq_len, context_len=1)):
            with torch.no_grad():
                logits = model(torch.tensor([(ctx + cont)[-(max_seq_len + 1):][:-1]])).logits[0, -len(cont):]
            total += torch.log_softmax(logits, -1)[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
        totals.append(total)
    return totals


def assert_same_rolling(got: dict[str, Any], world: dict[str, Any], max_seq_len: int, label: str,
                        tol: float = TOL) -> None:
    a, b = rolling(got), transformers_rolling(world, max_seq_len)
    assert len(a) == len(b) == 4
    rdiff = max(abs(x - y) / abs(y) for x, y in zip(a, b))  # sums over ~200 tokens: compare relative
    print(f"{label}: perplexity, {len(a)} passages of ~200 tokens in {max_seq_len}-token windows: "
          f"{a[0]:.3f} vs transformers {b[0]:.3f}, max relative difference {rdiff:.1e}")
    assert rdiff < tol


def generations(results: dict[str, Any]) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(results["samples"]["nanophi_gen"], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_results(world: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    # logits_cache off: lm-eval 0.4.13's one-token-continuation cache (requests grouped by context +
    # continuation[:-1]) gives the short last windows of batched perplexity passages wrong scores (passage 0:
    # -542.56 with it, -534.70 without, which batch size 1 and a direct forward pass both give)
    results = evaluate("hf", {"pretrained": str(world["hf"]), "device": "cpu", "dtype": "float32",
                              "batch_size": 8, "max_length": BLOCK, "logits_cache": False}, world["tasks"])
    print(f"\nlm-eval hf on the export: {time.perf_counter() - start:.1f} s for {len(TASKS)} tasks")
    return results


@pytest.fixture(scope="module")
def server(world: dict[str, Any]):
    from nanophi.engine import Engine
    from nanophi.refs import load_model
    from nanophi.serve import create_app

    model, tokenizer = load_model(world["run"])
    engine = Engine(model, tokenizer)
    app = create_app(engine, "tiny", max_batch=16, batch_window_ms=5)
    with serve_in_thread(app) as base:
        yield base, engine


def summary(results: dict[str, Any]) -> tuple[float, float]:
    return results["results"]["nanophi_mc"]["acc,none"], results["results"]["nanophi_gen"]["exact_match,none"]


def assert_same_scores(got: dict[str, Any], hf: dict[str, Any], label: str) -> None:
    a, b = per_choice(got), per_choice(hf)
    assert len(a) == len(b) and len(a) > 0
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"{label}: acc {summary(got)[0]:.4f} vs hf {summary(hf)[0]:.4f}, exact_match {summary(got)[1]:.4f} vs "
          f"{summary(hf)[1]:.4f}; {len(a)} choices, max |d loglikelihood| {diff:.2e}")
    assert diff < TOL
    assert summary(got) == summary(hf)
    assert generations(got) == generations(hf)


@pytest.mark.slow  # lm-eval's hf model on the export: ~20 s on 2 loaded cores (transformers, HFLM)
def test_local_completions_against_serve_matches_hf(world, server, hf_results) -> None:
    base, _ = server
    start = time.perf_counter()
    got = evaluate("local-completions", {"base_url": f"{base}/v1/completions", "model": "tiny",
                                         "tokenizer_backend": "remote", "max_length": BLOCK, "batch_size": 8,
                                         "max_retries": 1}, world["tasks"])
    print(f"\nlm-eval local-completions against nanophi serve: {time.perf_counter() - start:.1f} s")
    assert_same_scores(got, hf_results, "local-completions")
    assert_same_rolling(got, world, BLOCK - 2, "local-completions")


@pytest.mark.slow  # lm-eval's hf model on the export: ~20 s on 2 loaded cores (transformers, HFLM)
def test_nanophi_eval_tasks_matches_hf(world, hf_results, capsys) -> None:
    out = world["root"] / "results.json"
    start = time.perf_counter()
    assert main(["eval", str(world["run"]), "--tasks", ",".join(TASKS), "--include-path", str(world["tasks"]),
                 "--output", str(out), "--batch-size", "8"]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "nanophi_mc" in printed and "|acc" in printed.replace(" ", "")  # lm-eval's table
    with capsys.disabled():
        print(f"\nnanophi eval --tasks: {seconds:.1f} s")
        assert_same_scores(json.loads(out.read_text()), hf_results, "nanophi eval --tasks")
        assert_same_rolling(json.loads(out.read_text()), world, BLOCK, "nanophi eval --tasks")
        # and lm-eval's own hf model on the export, which windows the same way
        a, b = rolling(json.loads(out.read_text())), rolling(hf_results)
        assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < TOL


def test_echo_logprobs_are_the_models_own(server) -> None:
    """The legacy completions shape, checked against one forward pass of the model."""
    import torch

    base, engine = server
    prompt = "It was the best of small models"
    ids = engine.tokenizer.encode(prompt)
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                               "temperature": 0, "logprobs": 2, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    all_ids = ids + engine.tokenizer.encode(choice["text"][len(prompt):])
    with torch.no_grad():
        logits, _ = engine.prefill_model(torch.tensor([all_ids]), all_logits=True)
    expected = torch.log_softmax(logits[0].float(), -1)[torch.arange(len(all_ids) - 1), all_ids[1:]].tolist()
    assert choice["text"].startswith(prompt) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(all_ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < 1e-5
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    for tok, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert 1 <= len(top) <= 3 and top[tok] == value  # the 2 likeliest, and always the chosen one
    greedy = lp["token_logprobs"][-3:]  # temperature 0: each generated token was the likeliest
    assert all(v == max(t.values()) for v, t in zip(greedy, lp["top_logprobs"][-3:]))

    # max_tokens 0 scores the prompt alone; a list of id lists is one choice each; without echo only the new tokens
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "tiny", "prompt": [ids, ids[:5]],
                                                               "max_tokens": 0, "logprobs": 0, "echo": True})
    first, second = r.json()["choices"]
    assert first["text"] == prompt and first["logprobs"]["token_logprobs"][1:] == \
        pytest.approx(expected[:len(ids) - 1], abs=1e-5)
    assert len(second["logprobs"]["tokens"]) == 5 and r.json()["usage"]["completion_tokens"] == 0
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                               "temperature": 0, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["text_offset"][0] == len(prompt)
    assert lp["token_logprobs"] == pytest.approx(expected[-3:], abs=1e-5)


def test_long_prompt_is_scored_in_windows(server) -> None:
    from nanophi.scoring import score_tokens

    base, engine = server
    ids = engine.tokenizer.encode("It was the best of small models, it was the worst of small models. " * 12)
    assert len(ids) > 2 * BLOCK
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "tiny", "prompt": ids, "max_tokens": 0,
                                                               "logprobs": 0, "echo": True})
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(got) == len(ids) and got[1:] == pytest.approx(score_tokens(engine.prefill_model, [ids])[0].logprobs)
    r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_chat_logprobs_and_tokenizer_endpoints(server) -> None:
    base, engine = server
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 3})
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert len(c["top_logprobs"]) == 3 and c["logprob"] == c["top_logprobs"][0]["logprob"]  # greedy
        assert bytes(c["bytes"]).decode() == c["token"]

    text = "the café, twice"
    ids = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert ids == engine.tokenizer.encode(text)
    assert httpx.post(f"{base}/detokenize", json={"tokens": ids}).json()["prompt"] == text
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["model_max_length"] == BLOCK
    assert engine.tokenizer.encode(info["eos_token"]) == [engine.tokenizer.eos_id]

    for path, body, param in (("/tokenize", {"prompt": 3}, "prompt"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 2, "stream": True},
                               "stream"),
                              ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                        "top_logprobs": 2}, "top_logprobs")):
        r = httpx.post(base + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_eval_task_errors_are_one_line(world, capsys) -> None:
    run = str(world["run"])
    for argv, needle in (
        (["eval", run, "--tasks", "nanophi_mc", "--include-path", str(world["root"] / "nope")], "not a directory"),
        (["eval", run, "--limit", "3"], "goes with --tasks"),
        (["eval", run, "--tasks", " , "], "at least one task"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # each indexes lm-eval's own ~10k task files (~16 s on 2 cores)
def test_unknown_task_and_missing_dataset_are_one_line(world, tmp_path: Path) -> None:
    """A fresh `nanophi eval` process, as a user runs it: offline, a standard task whose dataset is not in the
    (empty) Hugging Face cache is one line that says how to provide it, and nothing waits on the network."""
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_DATASETS_OFFLINE", None)
    for tasks, needle in (("no_such_task_xyz", "unknown lm-eval task"), ("arc_easy", "not on disk")):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "nanophi.cli", "eval", str(world["run"]), "--tasks", tasks,
                            "--limit", "2"], capture_output=True, text=True, env=env, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if "nanophi eval: error" in ln]
        print(f"\n{tasks}: exit {r.returncode} in {time.perf_counter() - start:.1f} s: {lines}")
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "Retrying" not in r.stderr
