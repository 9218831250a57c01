"""The `nanophi` command line: one entry point, one module per command.

Each command lives in the module that implements it and exposes two functions:
`add_arguments(parser)` (declares its flags, one help line each) and `run(args) -> int` (does the work).
Only the chosen command's module is imported (`nanophi --help` imports none, so no torch), and command modules
import their heavy dependencies inside `run`.

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
    "serve": ("nanophi.serve.cli", "serve a model over an OpenAI-compatible HTTP API"),
    "export": ("nanophi.export", "export a model to Hugging Face or GGUF format"),
    "report": ("nanophi.debug.report", "write RUN/report.html with the run's plots"),
    "overfit": ("nanophi.debug.sanity", "overfit one batch and give a verdict"),
    "lr-find": ("nanophi.debug.lr_find", "learning-rate range test with a plot and a suggestion"),
    "bench": ("nanophi.bench", "benchmarks that print numbers: train, prepare, generate, serve"),
    "sandbox": ("nanophi.sandbox.cli", "run untrusted Python in a sandbox"),
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


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named on the command line: the first word that is not a flag (the top level has no flag that
    takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed, but only the one `argv` names gets its module imported and
    its flags declared (importing all fifteen would load torch, transformers and more just to print help)."""
    parser = OneLineParser(prog="nanophi", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module_name, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
