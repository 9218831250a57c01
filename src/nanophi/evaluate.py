"""`nanophi eval`: loss and bits per byte of a model over a whole data split, or lm-evaluation-harness tasks.

    nanophi eval runs/book                                  # val loss and bits per byte on the run's own corpus
    nanophi eval runs/book --tasks arc_easy,hellaswag       # lm-eval's tasks on nanophi's model (nanophi.harness)

`score_tokens` is the log-probability of every token of a sequence under the model, the one forward pass that
both `nanophi serve` (echo + logprobs) and the lm-eval adapter score with.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nanophi import checkpoint
from nanophi.device import pick_device
from nanophi.errors import UserError


def evaluate_model(
    model_ref: str, data: str | None = None, split: str = "val", device: str = "cpu", batch_size: int = 64
) -> dict[str, Any]:
    """Evaluate on `data` (default: the corpus the run was trained on), tokenized with the model's tokenizer."""
    from nanophi.prepare import open_prepared, prepare
    from nanophi.refs import load_model
    from nanophi.train import evaluate_tokens

    dev = pick_device(device)
    model, tokenizer = load_model(model_ref, dev)
    prepared = None
    saved: dict[str, Any] = {}
    if Path(model_ref).is_dir():
        try:
            ckpt = checkpoint.load(Path(model_ref), with_trainer=False)
            saved = ckpt.config
        except UserError:
            ckpt = None
        if data is None and ckpt is not None:
            data_dir = ckpt.state.get("data_dir")
            if data_dir and Path(data_dir, "meta.json").exists():
                candidate = open_prepared(Path(data_dir))
                if candidate.meta.get("sha256") == ckpt.state.get("data_sha256"):
                    prepared = candidate  # the exact arrays it trained on, no re-tokenizing
    if prepared is None:
        dc = saved.get("data", {})
        source = data if data is not None else dc.get("data")
        prepared = prepare(source, tokenizer=dc.get("tokenizer", "char"), val_fraction=dc.get("val_fraction", 0.1),
                           glob=dc.get("glob", "**/*.txt"), tokenizer_obj=tokenizer)
    tokens = prepared.val if split == "val" else prepared.train
    n_bytes = prepared.val_bytes if split == "val" else prepared.meta.get("train_bytes")
    metrics = evaluate_tokens(model, tokens, n_bytes, model.config.block_size, batch_size, dev)
    return {"model": str(model_ref), "split": split, "loss": metrics["val_loss"], "bpb": metrics["val_bpb"],
            "tokens": metrics["val_tokens"], "data": prepared.meta.get("source")}


# Logits of one scoring batch are (rows, T, vocab) fp32: cap their elements so a 50k vocabulary over a long
# context does not need gigabytes (2**26 floats = 256 MiB).
SCORE_LOGIT_BUDGET = 2**26


@dataclass
class TokenScores:
    """How the model scores one sequence ids[0..n): entry j is about token j + 1 given ids[0..j]."""

    logprobs: list[float]  # log p(ids[j+1] | ids[:j+1])
    greedy: list[bool]  # ids[j+1] is the model's most likely next token there
    top: list[list[tuple[int, float]]]  # the top_k (id, logprob) there, most likely first ([] when top_k = 0)


def score_tokens(model: Any, rows: Sequence[Sequence[int]], top_k: int = 0, dtype: Any = None) -> list[TokenScores]:
    """Per-token log-probabilities of each row (n - 1 entries for n tokens), in batches of right-padded rows
    (the model is causal, so padding after a token never changes its logits). A row longer than the context is
    read in windows of block_size tokens that advance by half a context, each position scored once with at
    least half a context before it (Engine's refill rule)."""
    import torch

    from nanophi.device import autocast

    block = model.config.block_size
    device = next(model.parameters()).device
    dtype = dtype or torch.float32
    # (row, window start, first position scored in it, window end): every position 1..n-1 in exactly one window
    windows: list[tuple[int, int, int, int]] = []
    for r, ids in enumerate(rows):
        n, end = len(ids), min(len(ids), block)
        windows.append((r, 0, 1, end))
        while end < n:
            new_end = min(n, end + block // 2)
            windows.append((r, new_end - block, end, new_end))
            end = new_end
    per_batch = max(1, SCORE_LOGIT_BUDGET // (block * model.config.vocab_size))
    out = [TokenScores([], [], []) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(windows), per_batch):
                batch = windows[b:b + per_batch]
                T = max(e - s for _, s, _, e in batch)
                x = torch.zeros(len(batch), T, dtype=torch.long)
                for i, (r, s, _, e) in enumerate(batch):
                    x[i, :e - s] = torch.tensor(rows[r][s:e], dtype=torch.long)
                x = x.to(device)
                with autocast(device, dtype):
                    logits, _ = model(x, all_logits=True)
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
                for i, (r, s, first, e) in enumerate(batch):
                    pred = logp[i, first - 1 - s:e - 1 - s]  # the distributions that predict tokens first..e-1
                    target = x[i, first - s:e - s]
                    out[r].logprobs += pred.gather(-1, target[:, None])[:, 0].tolist()
                    out[r].greedy += (pred.argmax(-1) == target).tolist()
                    if top_k:
                        values, ids = pred.topk(min(top_k, pred.size(-1)), dim=-1)
                        out[r].top += [list(zip(i_row, v_row)) for i_row, v_row in zip(ids.tolist(), values.tolist())]
    finally:
        model.train(was_training)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--data", default=None, help="corpus to evaluate on (default: the run's own corpus)")
    parser.add_argument("--split", choices=["val", "train"], default="val", help="which split to score")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tasks", default=None,
                        help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,hellaswag): score them "
                             "instead of the loss (needs the eval extra; datasets must be on disk)")
    parser.add_argument("--limit", type=float, default=None,
                        help="--tasks: at most this many examples per task (a fraction below 1: that share)")
    parser.add_argument("--include-path", default=None, help="--tasks: a directory of your own lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per prompt")
    parser.add_argument("--output", default=None,
                        help="--tasks: where lm-eval's results JSON goes (default: MODEL/lm_eval.json for a "
                             "directory, else ./lm_eval.json)")


def run_tasks(args: argparse.Namespace) -> int:
    """`--tasks`: lm-eval in-process on nanophi's model; prints lm-eval's table, writes its JSON."""
    import time

    try:
        from nanophi import harness
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("lm_eval", "datasets", "evaluate"):
            raise UserError(f"--tasks needs lm-evaluation-harness ({e.name} is not installed): "
                            "pip install 'nanophi[eval]'") from None
        raise
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks needs at least one task name, e.g. --tasks arc_easy")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit must be > 0, got {args.limit:g}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    start = time.perf_counter()
    results = harness.evaluate_tasks(args.model, tasks, limit, args.include_path, args.device, args.batch_size,
                                     args.num_fewshot)
    out = Path(args.output) if args.output else (Path(args.model) if Path(args.model).is_dir() else Path(".")) \
        / "lm_eval.json"
    harness.write_results(results, out)
    print(harness.table(results))
    print(f"{len(tasks)} task(s) in {time.perf_counter() - start:.1f} s; results: {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from nanophi.config import MAX_BATCH, check_range

    check_range("batch_size", args.batch_size, 1, MAX_BATCH)
    if args.tasks is not None:
        return run_tasks(args)
    for flag in ("limit", "include_path", "num_fewshot", "output"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} goes with --tasks")
    result = evaluate_model(args.model, args.data, args.split, args.device, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} loss {result['loss']:.4f} | bits per byte {result['bpb']:.4f} "
              f"| {result['tokens']:,} tokens")
    return 0
