"""The `nanophi` command line: one entry point, one module per command.

Each command lives in the module that implements it and exposes two functions:
`add_arguments(parser)` (declares its flags, one help line each) and `run(args) -> int` (does the work).
Command modules import their heavy dependencies inside `run`, so `nanophi --help` stays fast.

Errors a user can cause are raised as `UserError` and printed here as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn, Sequence

from nanophi.errors import UserError

# name -> (module, one-line help). Order is the order `nanophi --help` lists them in.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("nanophi.prepare", "tokenize a corpus into train/val memmaps (cached by content hash)"),
    "train": ("nanophi.train", "train a GPT on a corpus (the CPython docs by default)"),
    "eval": ("nanophi.evaluate", "loss and bits per byte of a model on a full data split"),
    "sample": ("nanophi.generate", "generate text from a model"),
    "chat": ("nanophi.chat", "chat with a model in the terminal"),
    "serve": ("nanophi.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "export": ("nanophi.export", "export a model to Hugging Face or GGUF format"),
    "report": ("nanophi.debug.report", "write RUN/report.html with the run's plots"),
    "overfit": ("nanophi.debug.sanity", "overfit one batch and give a verdict"),
    "lr-find": ("nanophi.debug.lr_find", "learning-rate range test with a plot and a suggestion"),
    "bench": ("nanophi.bench", "benchmarks that print numbers: train, prepare, generate"),
    "sandbox": ("nanophi.sandbox", "run untrusted Python in a sandbox"),
    "humaneval": ("nanophi.humaneval", "generate and score HumanEval completions"),
    "textbook": ("nanophi.textbook.cli", "the textbook-quality data pipeline (phi-1)"),
    "parity": ("nanophi.ports.parity", "check the JAX/Keras ports against PyTorch on a run's weights"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other user error (argparse prints its whole usage first).

    Subparsers inherit the class (`add_subparsers` defaults `parser_class` to the parent's type), so every command
    and `nanophi textbook` stage gets it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nanophi", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_line) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # A command whose module is not written yet is left out; any other import failure is a bug.
            if e.name is not None and module_name.startswith(e.name):
                continue
            raise
        p = sub.add_parser(name, help=help_line, description=help_line)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"nanophi {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanophi {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
