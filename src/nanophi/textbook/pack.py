"""`nanophi textbook pack`: the final records tokenized into train/val memmaps for `nanophi train`.

The stage's CLI pair; the packing itself is `nanophi.textbook.card.pack`, beside the card that describes the data.
"""

from __future__ import annotations

import argparse

from nanophi.textbook.card import pack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="the final records JSONL")
    parser.add_argument("--out", required=True, help="directory for train.bin, val.bin, tokenizer/ and meta.json")
    parser.add_argument("--tokenizer", default="bpe", choices=("char", "bpe", "gpt2"), help="tokenizer to train/use")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a trained tokenizer")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens held out for validation")


def run(args: argparse.Namespace) -> int:
    stats = pack(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                 val_fraction=args.val_fraction)
    print(f"pack: {stats['train_tokens']} train + {stats['val_tokens']} val tokens -> {stats['dir']}")
    return 0
