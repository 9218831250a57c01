"""`nanophi textbook <stage>`: one subcommand per pipeline stage, and `run` for all of them.

    nanophi textbook pool --out data/pool.jsonl --split function
    nanophi textbook annotate data/pool.jsonl --out data/labels.jsonl -n 2000
    nanophi textbook filter data/labels.jsonl data/pool.jsonl --out data/filtered.jsonl
    nanophi textbook generate --kind exercises --n 100 --out data/gen --seed 0 [--teacher REF]
    nanophi textbook verify data/gen/exercises.jsonl --out data/gen/exercises.verified.jsonl
    nanophi textbook dedup IN.jsonl --out OUT.jsonl [--threshold 0.7]
    nanophi textbook decontaminate IN.jsonl --out OUT.jsonl [--tau 0.9]
    nanophi textbook card data/final.jsonl --out data/CARD.md
    nanophi textbook pack data/final.jsonl --out data/packed
    nanophi textbook run --preset tiny --out data/tiny

Each stage lives in its own module as `add_<stage>_arguments(parser)` and `run_<stage>(args)`; the modules are
imported only for the subcommand that runs, so `nanophi --help` does not load scikit-learn or torch.
"""

from __future__ import annotations

import argparse
import importlib

# stage -> (module, one-line help, function-name stem)
STAGES: dict[str, tuple[str, str, str]] = {
    "pool": ("nanophi.textbook.pool", "raw code documents from a folder of .py files (default: the stdlib)", "pool"),
    "annotate": ("nanophi.textbook.annotate", "educational-value labels on a sample (rubric or teacher judge)",
                 "annotate"),
    "filter": ("nanophi.textbook.filter", "random forest on embeddings: keep the educational documents", "filter"),
    "generate": ("nanophi.textbook.generate", "synthetic textbooks or exercises from a teacher model", "generate"),
    "verify": ("nanophi.textbook.verify", "run exercises against their tests in the sandbox; parse-check textbooks",
               "verify"),
    "dedup": ("nanophi.textbook.dedup", "exact and MinHash-LSH near-duplicate removal", "dedup"),
    "decontaminate": ("nanophi.textbook.decontaminate", "remove HumanEval look-alikes (13-grams, AST similarity)",
                      "decontaminate"),
    "card": ("nanophi.textbook.card", "write a dataset card (counts, tokens, yields, provenance, licences)", "card"),
    "pack": ("nanophi.textbook.card", "tokenize records into train/val memmaps for `nanophi train`", "pack"),
    "run": ("nanophi.textbook.pipeline", "run every stage: --preset tiny|small|full --out DIR", "run"),
    # the case study: a module with a plain add_arguments/run pair (stem "")
    "experiment": ("nanophi.textbook.experiment", "train students on the pipeline's arms and compare with phi-1", ""),
}


def _names(stem: str) -> tuple[str, str]:
    """(argument adder, runner) of a stage module."""
    return ("add_arguments", "run") if not stem else (f"add_{stem}_arguments", f"run_{stem}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for stage, (module_name, help_line, stem) in STAGES.items():
        p = sub.add_parser(stage, help=help_line, description=help_line)
        # The stage modules are light at import time (their heavy imports sit inside functions).
        module = importlib.import_module(module_name)
        adder, runner = _names(stem)
        getattr(module, adder)(p)
        if stage == "annotate":  # the judge needs a teacher; the module itself takes one as an argument
            from nanophi.textbook.teacher import add_teacher_arguments

            add_teacher_arguments(p)
        p.set_defaults(_stage_run=(module_name, runner))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_stage_run", None) is None:
        from nanophi.errors import UserError

        raise UserError(f"name a stage: nanophi textbook {{{','.join(STAGES)}}} (see nanophi textbook --help)")
    module_name, fn_name = args._stage_run
    fn = getattr(importlib.import_module(module_name), fn_name)
    if args.stage == "annotate" and args.labeler == "llm":
        from nanophi.textbook.teacher import teacher_from_args

        return int(fn(args, teacher_from_args(args)) or 0)
    return int(fn(args) or 0)
