"""`nanophi export MODEL --format hf|gguf --out PATH`: a model in a format other tools load.

    nanophi export runs/book --format hf --out book-hf        # AutoModelForCausalLM/AutoTokenizer.from_pretrained
    nanophi export runs/book --format gguf --out book.gguf    # llama.cpp, gguf.GGUFReader, transformers gguf_file=

Models built from the gpt2 preset export as GPT2LMHeadModel / GGUF arch gpt2, the llama preset as
LlamaForCausalLM / arch llama. Switches neither architecture has (qk_norm, relu2, logit soft-capping, learned
positions with RMSNorm, ...) are refused with the switch named. Char and BPE tokenizers travel along (a char
vocabulary becomes a WordLevel tokenizer.json that gives HF the same ids). GGUF holds only tokenizers llama.cpp
reproduces id for id (see convert.gguf); a BPE trained before nanophi split words as GPT-2 does is refused there
(export it --format hf, or retrain the tokenizer).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from nanophi.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
# What an HF export writes (convert.hf.export_hf); --force replaces a directory holding only these.
HF_EXPORT_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                             "tokenizer_config.json"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf (a directory) or gguf (one file)")
    parser.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="stored precision (gguf: float32 or float16; vectors stay float32)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output")


def export(model_ref: str, fmt: str, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Export the model behind `model_ref` to `out`; returns the path written. `force` replaces an earlier
    export only (a .gguf file, or a directory holding nothing but the files an HF export writes): never
    anything else a user keeps there."""
    from nanophi.refs import load_model

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        out = out / "model.gguf" if out.is_dir() else out.with_suffix(".gguf")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} already exists; pass --force to overwrite it or choose another --out")
        earlier = (out.is_file() and out.suffix.lower() == ".gguf" if fmt == "gguf"
                   else out.is_dir() and {p.name for p in out.iterdir()} <= HF_EXPORT_FILES)
        if not earlier:
            raise UserError(f"{out} holds files an export did not write, so --force will not overwrite it; "
                            "choose a new or empty --out")
    model, tokenizer = load_model(model_ref, "cpu", max_context=None)
    try:
        path = _write(model, tokenizer, fmt, out, dtype)
    except OSError as e:
        from nanophi.checkpoint import DISK_ERRNOS

        if e.errno not in DISK_ERRNOS:
            raise
        raise UserError(f"cannot write {e.filename or out}: {e.strerror}; choose a writable --out with free space"
                        ) from None
    log.info(f"wrote {path}")
    return path


def _write(model: Any, tokenizer: Any, fmt: str, out: Path, dtype: str) -> Path:
    import torch

    if fmt == "hf":
        from nanophi.convert.hf import export_hf
        from nanophi.device import pick_dtype

        path = export_hf(model, tokenizer, out, pick_dtype(dtype, torch.device("cpu")))  # device.py names dtypes
    else:
        from nanophi.convert.gguf import write_gguf

        if dtype == "bfloat16":
            raise UserError("GGUF export supports --dtype float32 or float16")
        path = write_gguf(model, tokenizer, out, "f16" if dtype == "float16" else "f32")
    return path


def run(args: argparse.Namespace) -> int:
    path = export(args.model, args.format, args.out, args.dtype, args.force)
    print(path)
    return 0
