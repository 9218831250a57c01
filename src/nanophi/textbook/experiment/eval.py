"""The case study's measurements of one model: pass@1 and pass@k, whether completions parse and run, bits per byte.

Greedy completions (temperature 0: pass@1 from one sample per problem, as Codex and jina-ai/textbook report it)
and, beside them, n sampled completions per problem at temperature 0.8 scored with the unbiased pass@k estimator
(Chen et al. 2021, `nanophi.humaneval.pass_at_k`): at 0/164 greedy, pass@10 still sees a model that solves a
problem one time in twenty. Completions are cut at HumanEval's stop sequences and checked by
`nanophi.humaneval.check_completion`: one sandboxed process per program. A completion whose program does not even compile cannot pass, and is marked failed without
spending a sandbox on it (tiny models write many of those).

    parses   the completion is not empty and prompt + completion is valid Python (a prompt that ends in a
             docstring is itself valid Python, so an empty completion would "parse" without writing anything)
    runs     it parses, and the program with the tests ran to the end or stopped at a failed assert: the body
             returned something (right or wrong), rather than crashing, hanging or not compiling
"""

from __future__ import annotations

import ast
import json
import os
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanophi.humaneval import STOP_SEQUENCES, canonical_bpb, check_completion, pass_at_k, truncate_completion

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0  # openai/human-eval's per-program limit
CHECK_WORKERS = max(2, os.cpu_count() or 1)  # one sandboxed process per program: as many as there are cores
GEN_BATCH = 16
SAMPLE_TEMPERATURE = 0.8  # Codex's temperature for pass@10 and pass@100
PASS_KS = (1, 10)


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = GEN_BATCH, quantize: str | None = None) -> list[str]:
    """Greedy completions of `prompts`, only the new text, cut at the stop sequences. `quantize="int8"` decodes
    with int8 weights (CPU, ~2x faster; the Engine copies the weights now, so call it again after training)."""
    from nanophi.engine import Engine

    engine = Engine(model, tokenizer, quantize=quantize)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = engine.generate(list(prompts[i:i + batch_size]), max_new_tokens, temperature=0.0, stop=STOP_SEQUENCES)
        out.extend(truncate_completion(t) for t in texts)
    return out


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True


def check_all(problems: Sequence[dict[str, str]], completions: Sequence[str],
              workers: int = CHECK_WORKERS) -> list[dict[str, Any]]:
    """One verdict per (problem, completion): task_id, passed, parses, runs, status, reason."""

    def one(pair: tuple[dict[str, str], str]) -> dict[str, Any]:
        problem, completion = pair
        row = {"task_id": problem["task_id"], "completion": completion}
        written = bool(completion.strip())
        if not _parses(problem["prompt"] + completion):
            return row | {"passed": False, "parses": False, "runs": False, "status": "failed",
                          "reason": "does not parse"}
        res = check_completion(problem, completion, timeout=CHECK_TIMEOUT_S)
        runs = written and (res.passed or (res.status == "failed" and "AssertionError" in res.reason))
        return row | {"passed": res.passed, "parses": written, "runs": runs, "status": res.status,
                      "reason": res.reason if written else f"empty completion; {res.reason}"}

    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads wait on the sandboxes
        return list(pool.map(one, zip(problems, completions)))


def summarise_checks(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    passed = sum(r["passed"] for r in rows)
    return {"n": n, "passed": passed, "pass@1": passed / n if n else float("nan"),
            "parse_rate": sum(r["parses"] for r in rows) / n if n else float("nan"),
            "run_rate": sum(r["runs"] for r in rows) / n if n else float("nan")}


def pass_at_1(model: Any, tokenizer: Any, problems: Sequence[dict[str, str]], max_new_tokens: int,
              samples_path: Path | None = None, batch_size: int = GEN_BATCH,
              quantize: str | None = None) -> dict[str, Any]:
    """Generate, check, summarise; the per-problem verdicts go to `samples_path` (JSONL) when given."""
    completions = complete(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size, quantize)
    rows = check_all(problems, completions)
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return summarise_checks(rows)


def code_bpb(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> float:
    """Bits per UTF-8 byte over held-out documents, each followed by a blank line as in the training corpora."""
    from nanophi.train import evaluate_tokens

    pieces = [t + "\n\n" for t in texts]
    ids = [i for p in pieces for i in tokenizer.encode(p)]
    n_bytes = sum(len(p.encode("utf-8")) for p in pieces)
    device = next(model.parameters()).device
    metrics = evaluate_tokens(model, np.asarray(ids, dtype=np.int64), n_bytes, model.config.block_size,
                              batch_size, device, torch.float32)
    return float(metrics["val_bpb"])


def sampled_pass_at_k(model: Any, tokenizer: Any, problems: Sequence[dict[str, str]], max_new_tokens: int, *,
                      n: int, seed: int, temperature: float = SAMPLE_TEMPERATURE, ks: Sequence[int] = PASS_KS,
                      samples_path: Path | None = None, problems_per_batch: int = 1, top_p: float | None = None,
                      quantize: str | None = None) -> dict[str, Any]:
    """n completions per problem at `temperature`, generated as one batch per problem (the n rows share the
    prompt; `problems_per_batch` > 1 packs several problems into one batch, which a GPU runs in about the time of
    one, a CPU barely faster), checked in the sandbox, scored with the unbiased estimator. Returns pass@k for each
    k <= n, and `solved`: how many of the n samples passed, per problem in order (what the per-problem paired
    tests compare)."""
    from nanophi.engine import Engine
    from nanophi.sampling import Sampling

    engine = Engine(model, tokenizer, quantize=quantize)
    completions: list[str] = []
    for start in range(0, len(problems), problems_per_batch):
        group = problems[start:start + problems_per_batch]
        # Sample j of problem i is seeded by (seed, i, j) alone: every arm draws a problem's samples from the same
        # streams, whatever the batching.
        rows = [Sampling(temperature, None, top_p, seed + (start + g) * n + j, 1.0)
                for g in range(len(group)) for j in range(n)]
        texts = engine.generate([p["prompt"] for p in group for _ in range(n)], max_new_tokens, stop=STOP_SEQUENCES,
                                sampling=rows)
        completions.extend(truncate_completion(t) for t in texts)
    rows = check_all([p for p in problems for _ in range(n)], completions)
    solved = [sum(r["passed"] for r in rows[i * n:(i + 1) * n]) for i in range(len(problems))]
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w", encoding="utf-8") as f:
            for j, r in enumerate(rows):
                f.write(json.dumps({**r, "sample_idx": j % n}) + "\n")
    out: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p, "solved": solved,
                           "parse_rate": sum(r["parses"] for r in rows) / len(rows) if rows else float("nan")}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = (sum(pass_at_k(n, c, k) for c in solved) / len(solved)) if solved else float("nan")
    return out


def measure(model: Any, tokenizer: Any, *, humaneval: Sequence[dict[str, str]], heldout: Sequence[dict[str, str]],
            heldout_code: Sequence[str], max_new_tokens: int, out_dir: Path, samples: int = 0,
            seed: int = 0, problems_per_batch: int = 1) -> dict[str, Any]:
    """All metrics of one trained model, named as results.json names them. `samples` > 0 adds pass@k from that
    many samples per problem; `*_greedy_solved` (0/1 per problem) feed the paired tests either way."""
    he_rows = check_all(humaneval, complete(model, tokenizer, [p["prompt"] for p in humaneval], max_new_tokens))
    ho_rows = check_all(heldout, complete(model, tokenizer, [p["prompt"] for p in heldout], max_new_tokens))
    for name, rows in (("humaneval", he_rows), ("heldout", ho_rows)):
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / f"{name}_samples.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    he, ho = summarise_checks(he_rows), summarise_checks(ho_rows)
    out = {"humaneval_pass@1": he["pass@1"], "humaneval_passed": he["passed"], "humaneval_n": he["n"],
           "heldout_pass@1": ho["pass@1"], "heldout_passed": ho["passed"], "heldout_n": ho["n"],
           "parse_rate": he["parse_rate"], "run_rate": he["run_rate"],
           "heldout_parse_rate": ho["parse_rate"], "heldout_run_rate": ho["run_rate"],
           "humaneval_greedy_solved": [int(r["passed"]) for r in he_rows],
           "heldout_greedy_solved": [int(r["passed"]) for r in ho_rows],
           "code_bpb": code_bpb(model, tokenizer, heldout_code),
           "humaneval_bpb": canonical_bpb(model, tokenizer, humaneval)}
    if samples > 0:
        out["samples_per_problem"] = samples
        out["sample_temperature"] = SAMPLE_TEMPERATURE
        for name, probs in (("humaneval", humaneval), ("heldout", heldout)):
            res = sampled_pass_at_k(model, tokenizer, probs, max_new_tokens, n=samples, seed=seed,
                                    samples_path=out_dir / f"{name}_sampled.jsonl",
                                    problems_per_batch=problems_per_batch)
            for k in PASS_KS:
                if f"pass@{k}" in res:
                    out[f"{name}_sampled_pass@{k}" if k == 1 else f"{name}_pass@{k}"] = res[f"pass@{k}"]
            out[f"{name}_sampled_solved"] = res["solved"]
            out[f"{name}_sampled_parse_rate"] = res["parse_rate"]
    return out
