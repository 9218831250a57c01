"""`nanophi bench`: commands that print numbers. Tests never assert on them; docs/speed.md records them.

    nanophi bench train --data book.txt --tokenizer char --iters 200 --device cpu [--dtype bfloat16] [--compile]
    nanophi bench prepare --data book.txt --megabytes 100 --tokenizer bpe
    nanophi bench generate --model runs/book --batch-size 8 --new-tokens 128 [--compare-hf]
    nanophi bench generate --model smollm2 --compare llama.cpp --threads 1 --new-tokens 64 --rounds 3
    nanophi bench generate --model smollm2-135m-instruct --compare llama.cpp --batch-size 8 --new-tokens 32
    nanophi bench serve --model smollm2-135m-instruct --clients 16 --max-tokens 32

`bench train` times the real `Trainer.train_step` (the same code `nanophi train` runs: lr schedule, autocast,
backward, clipping, optimizer), after warm-up steps that absorb one-off costs (torch.compile, allocator, thread
pools). It accepts every model and training flag of `nanophi train` and `--config FILE.toml`, so a recipe is
benchmarked exactly as it trains. Every command prints `key: value` lines, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nanophi.config import DataConfig, RunConfig, TrainConfig, add_dataclass_arguments, load_toml, resolve
from nanophi.errors import UserError
from nanophi.model import GPTConfig

log = logging.getLogger(__name__)

DEFAULT_ITERS = 200
DEFAULT_WARMUP = 20
# Training flags that mean nothing to a benchmark (it never evaluates, checkpoints or logs).
TRAIN_FLAGS_SKIPPED = ("out", "max_iters", "max_time", "eval_interval", "eval_iters", "eval_batch_size",
                       "log_interval", "sample_interval", "early_stop", "resume", "init_from", "debug_interval",
                       "dashboard", "tensorboard", "wandb")


def bench_train(cfg: RunConfig, iters: int = DEFAULT_ITERS, warmup: int = DEFAULT_WARMUP) -> dict[str, Any]:
    """Tokens/s, ms/iter and MFU of `iters` optimizer steps of `cfg`, after `warmup` untimed steps."""
    from nanophi.mfu import peak_flops
    from nanophi.train import Trainer, prepare_data

    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}")
    tc = cfg.train
    tc.max_iters = warmup + iters  # the lr schedule spans the benchmark, as it would a run of that length
    data = prepare_data(cfg)
    with tempfile.TemporaryDirectory(prefix="nanophi-bench-") as tmp:
        tc.out = tmp
        trainer = Trainer(cfg, data, callbacks=[])
        peak, peak_source = peak_flops(trainer.device, trainer.dtype)  # probe before timing, not during
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step()
        sync()
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            record = trainer.train_step()
            sync()
            times.append(time.perf_counter() - t)
    total = sum(times)
    tokens_per_iter = tc.batch_size * tc.grad_accum * cfg.model.block_size
    tokens_per_s = tokens_per_iter * iters / total
    flops_per_token = trainer.raw_model.flops_per_token()
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "ms_per_iter": round(1000 * total / iters, 3),
        "ms_per_iter_p50": round(1000 * statistics.median(times), 3),
        "mfu": float(f"{flops_per_token * tokens_per_s / peak:.4g}"),  # 4 significant digits: tiny models too
        "peak_flops": peak,
        "peak_source": peak_source,
        "flops_per_token": flops_per_token,
        "achieved_flops": round(flops_per_token * tokens_per_s),
        "params": trainer.raw_model.num_params(),
        "tokens_per_iter": tokens_per_iter,
        "iters": iters,
        "warmup": warmup,
        "warmup_s": round(warmup_s, 3),
        "final_loss": round(record["loss"], 4),
        "device": str(trainer.device),
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile": tc.compile,
        "optimizer": tc.optimizer,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # a busy machine explains a slow number
    }


def bench_prepare(
    source: str | None, tokenizer: str = "bpe", vocab_size: int = 8192, megabytes: float | None = None
) -> dict[str, Any]:
    """Throughput and peak memory of `prepare`; with `megabytes`, on a corpus grown from `source` to that size.

    mb_per_s is the tokenize-and-write phase alone (encode + split); training the tokenizer is timed apart.
    MB are 10^6 bytes of UTF-8 text.
    peak_rss_mb is the process's high-water mark (ru_maxrss), so it includes anything run before.
    """
    from nanophi.prepare import MB, prepare

    with tempfile.TemporaryDirectory(prefix="nanophi-bench-") as tmp:
        corpus = source
        if megabytes is not None:
            corpus = str(_grow_corpus(source, megabytes, Path(tmp) / "corpus"))
        t0 = time.perf_counter()
        data = prepare(corpus, tokenizer=tokenizer, vocab_size=vocab_size, out_dir=Path(tmp) / "prepared")
        total = time.perf_counter() - t0
        meta = data.meta
    t, cpu = meta["timings_s"], meta["cpu_s"]
    mb = meta["corpus_bytes"] / MB
    tokenize_s = max(t["encode"] + t["split"], 1e-6)
    tokenize_cpu_s = cpu["encode"] + cpu["split"]
    return {
        "megabytes": round(mb, 2),
        "tokens": meta["n_tokens"],
        "tokenizer": meta["tokenizer"],
        "vocab_size": meta["vocab_size"],
        "mb_per_s": round(mb / tokenize_s, 2),
        "tokenize_s": round(tokenize_s, 2),
        "tokenize_cpu_s": round(tokenize_cpu_s, 2),
        "cores_busy": round(tokenize_cpu_s / tokenize_s, 2),  # well under the core count: contention or a bottleneck
        "train_tokenizer_s": t["train_tokenizer"],
        "hash_s": t["hash"],
        "total_s": round(total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
    }


def _grow_corpus(source: str | None, megabytes: float, root: Path) -> Path:
    """A directory of copies of `source`, each with its paragraphs shuffled, adding up to `megabytes`."""
    from nanophi.prepare import MB
    from nanophi.sources import DOCUMENT_SEPARATOR, read_text

    paragraphs = read_text(source).split(DOCUMENT_SEPARATOR)
    rng = random.Random(0)
    root.mkdir(parents=True)
    target = int(megabytes * MB)
    written, i = 0, 0
    while written < target:
        rng.shuffle(paragraphs)
        data = DOCUMENT_SEPARATOR.join(paragraphs).encode("utf-8")[: target - written]
        data = data.decode("utf-8", "ignore").encode("utf-8")  # the cut may have split the last character
        (root / f"part{i:05d}.txt").write_bytes(data)
        written += len(data) or target  # (an empty source would otherwise loop forever)
        i += 1
    return root


def bench_generate_cmd(args: argparse.Namespace) -> dict[str, Any]:
    """`nanophi.bench_decode.bench_generate` (the KV-cache engine's benchmark) with the command's flags, or with
    --compare llama.cpp, `nanophi.bench_llama.bench_compare_llama_cpp` (at --batch-size B: B sequences each)."""
    from nanophi.bench_decode import bench_generate

    if args.compare == "llama.cpp":
        from nanophi.bench_llama import bench_compare_llama_cpp

        return bench_compare_llama_cpp(args.model, threads=args.threads or 1, rounds=args.rounds,
                                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                       pairs=[p for p in args.pairs.split(",") if p], batch_size=args.batch_size)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    return bench_generate(args.model, batch_size=args.batch_size, new_tokens=args.new_tokens,
                          prompt_tokens=args.prompt_tokens, dtype=args.dtype, compare_hf=args.compare_hf,
                          device=args.device, repeats=args.repeats, quantize=args.quantize, quality=args.quality)


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanophi import bench_serve
    from nanophi.bench_llama import LLAMA_PAIRS

    sub = parser.add_subparsers(dest="bench", metavar="WHAT")
    p = sub.add_parser("train", help="tokens/s, ms/iter and MFU of training steps",
                       description="Time Trainer.train_step; accepts every model/training flag of `nanophi train`.")
    p.add_argument("--config", metavar="FILE.toml", help="TOML recipe of overrides (e.g. recipes/cpu-fast.toml)")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help=f"timed steps (default: {DEFAULT_ITERS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed steps first; they absorb compilation (default: {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")
    add_dataclass_arguments(p, DataConfig)
    add_dataclass_arguments(p, GPTConfig)
    add_dataclass_arguments(p, TrainConfig, skip=TRAIN_FLAGS_SKIPPED)

    p = sub.add_parser("prepare", help="MB/s and peak RSS of tokenizing a corpus",
                       description="Tokenize a corpus grown to --megabytes with `nanophi prepare`'s code path.")
    p.add_argument("--data", default=None, help="source text to grow the corpus from (default: pydoc)")
    p.add_argument("--megabytes", type=float, default=100.0, help="corpus size in MB (default: 100)")
    p.add_argument("--tokenizer", default="bpe", choices=["char", "bpe", "gpt2"], help="tokenizer (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")

    p = sub.add_parser("generate", help="tokens/s of KV-cached generation",
                       description="Generation throughput of the KV-cache engine, optionally against HF.")
    p.add_argument("--model", required=True, help="run directory, checkpoint, GGUF file, HF directory or alias")
    p.add_argument("--batch-size", type=int, default=1, help="prompts generated together (default: 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="random prompt length in tokens (default: 64)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="CPU: int8 (fbgemm dynamic) or int4 (4-bit weights) linear layers, as sample/chat/serve "
                        "take them")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best counts (default: 3)")
    p.add_argument("--quality", action="store_true",
                   help="also the decoding loss on CPython's docs, this mode beside fp32 (what speed costs)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time Hugging Face generate on the same weights (needs transformers)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    p.add_argument("--compare", choices=["llama.cpp"], default=None,
                   help="time llama.cpp (llama-cpp-python) beside nanophi in one process: --batch-size "
                        "sequences in parallel on both, greedy, interleaved rounds, the same weights per pair "
                        "(fp32/F32, int8/Q8_0, int4/Q4_1)")
    p.add_argument("--pairs", default=",".join(LLAMA_PAIRS),
                   help=f"--compare: precision pairs to time (default: {','.join(LLAMA_PAIRS)})")
    p.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds (default: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads, and llama.cpp's n_threads with --compare (default: torch's "
                        "choice; 1 with --compare)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")

    p = sub.add_parser("serve", help="tokens/s of `nanophi serve` under concurrent clients vs the engine's batch",
                       description=bench_serve.__doc__.split("\n\n")[0])
    bench_serve.add_arguments(p)


def train_config_from_args(args: argparse.Namespace) -> RunConfig:
    skip = {"command", "verbose", "config", "bench", "iters", "warmup", "threads", "json"}
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in skip}
    return resolve(flags, load_toml(args.config) if args.config else None)


def run(args: argparse.Namespace) -> int:
    if args.bench is None:
        raise UserError("say what to benchmark: nanophi bench train|prepare|generate|serve (see nanophi bench -h)")
    if args.bench == "train":
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = bench_train(train_config_from_args(args), args.iters, args.warmup)
    elif args.bench == "serve":
        from nanophi.bench_serve import bench_serve_cmd

        result = bench_serve_cmd(args)
    elif args.bench == "prepare":
        if args.megabytes <= 0:
            raise UserError(f"--megabytes must be > 0, got {args.megabytes}")
        result = bench_prepare(args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                               megabytes=args.megabytes)
    else:
        result = bench_generate_cmd(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
