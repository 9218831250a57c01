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

Each stage lives in its own module as `add_arguments(parser)` and `run(args) -> int`; the modules are
imported only for the subcommand that runs, so `nanophi --help` does not load scikit-learn or torch.

Before a stage runs, `check_args` refuses, in one line, what no stage could make sense of: a float flag that is
NaN or infinite or outside its range, a count below its minimum, an `--out` that is a folder where a file goes
(or a file where a folder goes, or lies below a file, or on a read-only filesystem), and an `--out` that is one
of the stage's inputs (the stage would replace what it reads).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path
from typing import Sequence

from nanophi.errors import UserError

# stage -> (module, one-line help); each module has `add_arguments(parser)` and `run(args) -> int`.
STAGES: dict[str, tuple[str, str]] = {
    "pool": ("nanophi.textbook.pool", "raw code documents from a folder of .py files (default: the stdlib)"),
    "annotate": ("nanophi.textbook.annotate", "educational-value labels on a sample (rubric or teacher judge)"),
    "filter": ("nanophi.textbook.filter", "random forest on embeddings: keep the educational documents"),
    "generate": ("nanophi.textbook.synthesize", "synthetic textbooks or exercises from a teacher model"),
    "verify": ("nanophi.textbook.verify", "run exercises against their tests in the sandbox; parse-check textbooks"),
    "dedup": ("nanophi.textbook.dedup", "exact and MinHash-LSH near-duplicate removal"),
    "decontaminate": ("nanophi.textbook.decontaminate", "remove HumanEval look-alikes (13-grams, AST similarity)"),
    "card": ("nanophi.textbook.card", "write a dataset card (counts, tokens, yields, provenance, licences)"),
    "pack": ("nanophi.textbook.pack", "tokenize records into train/val memmaps for `nanophi train`"),
    "run": ("nanophi.textbook.pipeline", "run every stage: --preset tiny|small|full --out DIR"),
    "experiment": ("nanophi.textbook.experiment", "train students on the pipeline's arms and compare with phi-1"),
}


# (stage, flag dest) -> (low, high, low allowed, high allowed): the ranges the stages' own code relies on.
FLOAT_RANGES: dict[tuple[str, str], tuple[float, float, bool, bool]] = {
    ("annotate", "threshold"): (0.0, 10.0, True, True),  # rubric points and judge ratings are 0-10
    ("filter", "threshold"): (0.0, 1.0, True, True),  # a probability
    ("dedup", "threshold"): (0.0, 1.0, False, True),  # a Jaccard similarity
    ("decontaminate", "tau"): (0.0, 1.0, False, True),  # an AST similarity
    ("pack", "val_fraction"): (0.0, 1.0, False, False),  # both splits must be non-empty
    ("generate", "temperature"): (0.0, 100.0, True, True),
    ("verify", "timeout"): (0.0, 86_400.0, False, True),  # nanophi.sandbox.MAX_TIMEOUT_S
}
# flag dest -> the least value that means anything (the same dest means the same thing in every stage).
INT_MINIMA: dict[str, int] = {
    "n": 0, "max_tokens": 1, "batch": 1, "workers": 1, "tasks": 1, "memory_mb": 1, "num_perm": 1, "ngram": 1,
    "min_ast_tokens": 0, "max_docs": 1, "min_chars": 0, "max_chars": 1, "vocab_size": 1, "seeds": 1,
    "textbooks": 0, "exercises": 0, "teacher_batch": 1, "teacher_concurrency": 1, "teacher_retries": 0,
}
MAX_MEMORY_MB = 1 << 20  # nanophi.sandbox.MAX_MEMORY_MB (not imported: --help must stay light)
# What each stage's --out is, and which of its arguments it reads.
OUT_IS_DIR = {"generate", "pack", "run", "experiment"}
INPUTS: dict[str, tuple[str, ...]] = {
    "annotate": ("pool",), "filter": ("labels", "pool"), "verify": ("input",), "dedup": ("input",),
    "decontaminate": ("input",), "card": ("data",), "pack": ("data",),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values no stage can use, before any stage starts (see the module docstring)."""
    stage = args.stage
    for dest, value in vars(args).items():
        if isinstance(value, float):
            if not math.isfinite(value):
                raise UserError(f"{_flag(dest)} must be a finite number, got {value}")
            bounds = FLOAT_RANGES.get((stage, dest))
            if bounds is not None:
                low, high, low_ok, high_ok = bounds
                if not ((low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)):
                    interval = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
                    raise UserError(f"{_flag(dest)} must be in {interval}, got {value:g}")
        elif isinstance(value, int) and not isinstance(value, bool) and dest in INT_MINIMA:
            if value < INT_MINIMA[dest]:
                raise UserError(f"{_flag(dest)} must be at least {INT_MINIMA[dest]}, got {value}")
    if getattr(args, "memory_mb", None) is not None and args.memory_mb > MAX_MEMORY_MB:
        raise UserError(f"--memory-mb must be at most {MAX_MEMORY_MB}, got {args.memory_mb}")
    if stage == "decontaminate" and args.sweep:
        try:
            sweep = [float(t) for t in args.sweep.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--sweep must be comma-separated numbers in (0, 1], got {args.sweep!r}") from None
        if any(not 0.0 < t <= 1.0 for t in sweep):  # also catches NaN
            raise UserError(f"--sweep values must be in (0, 1], got {args.sweep!r}")
    out = getattr(args, "out", None)
    if out is not None:
        check_out(Path(out), is_dir=stage in OUT_IS_DIR or getattr(args, "tasks", 1) > 1,  # --tasks N: shards
                  inputs=[Path(getattr(args, a)) for a in INPUTS.get(stage, ()) if getattr(args, a, None)])


def check_out(out: Path, *, is_dir: bool, inputs: Sequence[Path] = ()) -> None:
    """`out` can be written: a folder (`is_dir`) or a file of records, not one of `inputs`, on a writable disk."""
    if is_dir and out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, but this stage writes a folder there; give a folder path "
                        "(it is created) or move the file away")
    if not is_dir and out.is_dir():
        raise UserError(f"--out {out} is a folder, but this stage writes one file; give a file path, e.g. "
                        f"{out / 'out.jsonl'}")
    for source in inputs:
        if source.exists() and out.exists() and os.path.samefile(source, out):
            raise UserError(f"--out {out} is this stage's input {source}; writing it would replace what it reads: "
                            "give another --out")
    existing = out if is_dir else out.parent
    while not existing.exists() and existing != existing.parent:  # folders that do not exist yet get made
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out} lies below {existing}, which is a file; choose a path in a folder")
    if not os.access(existing, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--out {out} cannot be written (permission denied or a read-only filesystem); choose "
                        "another --out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for stage, (module_name, help_line) in STAGES.items():
        p = sub.add_parser(stage, help=help_line, description=help_line)
        # The stage modules are light at import time (their heavy imports sit inside functions).
        importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_stage_module=module_name)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_stage_module", None) is None:
        raise UserError(f"name a stage: nanophi textbook {{{','.join(STAGES)}}} (see nanophi textbook --help)")
    check_args(args)
    return int(importlib.import_module(args._stage_module).run(args) or 0)
