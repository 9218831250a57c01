"""`nanophi eval`: loss and bits per byte of a model over a whole data split, or lm-evaluation-harness tasks.

    nanophi eval runs/book                                  # val loss and bits per byte on the run's own corpus
    nanophi eval runs/book --tasks arc_easy,hellaswag       # lm-eval's tasks on nanophi's model (nanophi.harness)

Per-token scoring (serve's echo + logprobs, the lm-eval adapter) lives in `nanophi.scoring`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
