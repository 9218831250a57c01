"""The `nanophi sample` command, and the engine flags (--dtype, --quantize) that sample, chat and serve share.

    nanophi sample runs/book --prompt "It is a truth" --temperature 0.8 --num-samples 4

The generation itself is nanophi.engine (`Engine`); sampling settings are nanophi.sampling; the weights the
engine decodes with (StreamingLinear, int8, int4) are nanophi.quantize.
"""

from __future__ import annotations

import argparse
import sys

from nanophi.engine import Engine, load_model_for_inference, parse_dtype
from nanophi.errors import UserError
from nanophi.quantize import QUANTIZE
from nanophi.sampling import check_sampling

MAX_NUM_SAMPLES = 1024  # `nanophi sample --num-samples`: one batch, so its KV cache must fit in memory


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run directory, checkpoint, GGUF file, HF directory or alias")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the context (Hugging Face's; 1.1-1.3 typical)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (in one batch)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    add_engine_arguments(parser)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype and --quantize, shared by sample, chat and serve."""
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16 for bf16 matmuls (faster on "
                        "GPUs and CPUs with native bf16; much slower on AVX2-only CPUs)")
    parser.add_argument("--quantize", choices=[q for q in QUANTIZE if q], default=None,
                        help="CPU: int8 (fbgemm dynamic quantization; fastest for batches) or int4 (4-bit "
                             "weights in groups of 32, GGUF Q4_1's layout; fastest for one stream): 2-3x faster "
                             "decoding, output close to fp32")


def engine_from_args(args: argparse.Namespace) -> Engine:
    """Load args.model on args.device and wrap it in an Engine with the --dtype/--quantize choices."""
    from nanophi.device import pick_device

    device = pick_device(args.device)
    model, tokenizer = load_model_for_inference(args.model, device)
    return Engine(model, tokenizer, device, parse_dtype(args.dtype), args.quantize)


def check_sampling_args(args: argparse.Namespace) -> None:
    """sample's and chat's sampling flags, checked before the model loads: NaN, inf and out-of-range values are
    one line, not a traceback from inside torch."""
    check_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, prefix="--")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    if not 1 <= args.num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"--num-samples must be from 1 to {MAX_NUM_SAMPLES} (one batch), got {args.num_samples}")
    engine = engine_from_args(args)
    stream = args.num_samples == 1

    def on_text(i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    outs = engine.generate([args.prompt] * args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                           args.top_p, args.stop, args.seed, on_text=on_text if stream else None,
                           repetition_penalty=args.repetition_penalty)
    if not stream:
        sys.stdout.write("\n---\n".join(outs))
    sys.stdout.write("\n")
    return 0
