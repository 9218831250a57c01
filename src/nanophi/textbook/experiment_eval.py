"""The case study's measurements of one model: pass@1, whether completions parse and run, bits per byte.

Every completion is greedy (temperature 0, so pass@1 is one sample per problem, as Codex and jina-ai/textbook
report it), cut at HumanEval's stop sequences, and checked by `nanophi.humaneval.check_completion`: one sandboxed
process per program. A completion whose program does not even compile cannot pass, and is marked failed without
spending a sandbox on it (tiny models write many of those).

    parses   the completion is not empty and prompt + completion is valid Python (a prompt that ends in a
             docstring is itself valid Python, so an empty completion would "parse" without writing anything)
    runs     it parses, and the program with the tests ran to the end or stopped at a failed assert: the body
             returned something (right or wrong), rather than crashing, hanging or not compiling
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanophi.humaneval import STOP_SEQUENCES, canonical_bpb, check_completion, truncate_completion

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0  # openai/human-eval's per-program limit
CHECK_WORKERS = 2
GEN_BATCH = 16


def complete(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = GEN_BATCH, quantize: str | None = None) -> list[str]:
    """Greedy completions of `prompts`, only the new text, cut at the stop sequences. `quantize="int8"` decodes
    with int8 weights (CPU, ~2x faster; the Engine copies the weights now, so call it again after training)."""
    from nanophi.generate import Engine

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


def measure(model: Any, tokenizer: Any, *, humaneval: Sequence[dict[str, str]], heldout: Sequence[dict[str, str]],
            heldout_code: Sequence[str], max_new_tokens: int, out_dir: Path) -> dict[str, Any]:
    """All metrics of one trained model, named as results.json names them."""
    he = pass_at_1(model, tokenizer, humaneval, max_new_tokens, out_dir / "humaneval_samples.jsonl")
    ho = pass_at_1(model, tokenizer, heldout, max_new_tokens, out_dir / "heldout_samples.jsonl")
    return {"humaneval_pass@1": he["pass@1"], "humaneval_passed": he["passed"], "humaneval_n": he["n"],
            "heldout_pass@1": ho["pass@1"], "heldout_passed": ho["passed"], "heldout_n": ho["n"],
            "parse_rate": he["parse_rate"], "run_rate": he["run_rate"],
            "heldout_parse_rate": ho["parse_rate"], "heldout_run_rate": ho["run_rate"],
            "code_bpb": code_bpb(model, tokenizer, heldout_code),
            "humaneval_bpb": canonical_bpb(model, tokenizer, humaneval)}
