"""`nanophi export MODEL --format hf|gguf --out PATH`: a model in a format other tools load.

    nanophi export runs/book --format hf --out book-hf        # AutoModelForCausalLM/AutoTokenizer.from_pretrained
    nanophi export runs/book --format gguf --out book.gguf    # llama.cpp, gguf.GGUFReader, transformers gguf_file=

Models built from the gpt2 preset export as GPT2LMHeadModel / GGUF arch gpt2, the llama preset as
LlamaForCausalLM / arch llama. Switches neither architecture has (qk_norm, relu2, logit soft-capping, learned
positions with RMSNorm, ...) are refused with the switch named. Char and BPE tokenizers travel along (a char
vocabulary becomes a WordLevel tokenizer.json that gives HF the same ids).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from nanophi.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf (a directory) or gguf (one file)")
    parser.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="stored precision (gguf: float32 or float16; vectors stay float32)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output")


def export(model_ref: str, fmt: str, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """Export the model behind `model_ref` to `out`; returns the path written."""
    import torch

    from nanophi.refs import load_model

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        out = out / "model.gguf" if out.is_dir() else out.with_suffix(".gguf")
    if not force and out.exists() and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists; pass --force to overwrite it or choose another --out")
    model, tokenizer = load_model(model_ref, "cpu", max_context=None)
    if fmt == "hf":
        from nanophi.convert.hf import export_hf

        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        path = export_hf(model, tokenizer, out, dtypes[dtype])
    else:
        from nanophi.convert.gguf import write_gguf

        if dtype == "bfloat16":
            raise UserError("GGUF export supports --dtype float32 or float16")
        path = write_gguf(model, tokenizer, out, "f16" if dtype == "float16" else "f32")
    log.info(f"wrote {path}")
    return path


def run(args: argparse.Namespace) -> int:
    path = export(args.model, args.format, args.out, args.dtype, args.force)
    print(path)
    return 0
