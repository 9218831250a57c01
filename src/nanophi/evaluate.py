"""`nanophi eval`: loss and bits per byte of a model over a whole data split."""

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


def run(args: argparse.Namespace) -> int:
    from nanophi.config import MAX_BATCH, check_range

    check_range("batch_size", args.batch_size, 1, MAX_BATCH)
    result = evaluate_model(args.model, args.data, args.split, args.device, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['split']} loss {result['loss']:.4f} | bits per byte {result['bpb']:.4f} "
              f"| {result['tokens']:,} tokens")
    return 0
