"""Decode benchmarks of the engine: tokens/s and prefill time (`bench_generate`, behind `nanophi bench
generate`), the loss of a --dtype/--quantize mode's decoding beside fp32's (`decode_loss`), and transformers'
`generate` on the same weights as a baseline, and what every decode benchmark reports beside its numbers (the
CPU's flags, spreads over rounds). The llama.cpp comparison is in nanophi.bench_llama, serving in
nanophi.bench_serve."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nanophi.engine import Engine, load_model_for_inference, parse_dtype
from nanophi.errors import UserError
from nanophi.model import GPT


def bench_generate(
    model_ref: str | Path | tuple[GPT, Any],
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_tokens: int = 64,
    dtype: str | torch.dtype = "float32",
    compare_hf: bool = False,
    device: str = "cpu",
    repeats: int = 3,
    seed: int = 0,
    quantize: str | None = None,
    quality: bool = False,
) -> dict[str, Any]:
    """Decode tokens/s (all rows together) and prefill time of greedy generation, best of `repeats`.

    With `compare_hf`, the same weights (exported to a temporary HF directory) run through transformers'
    `generate` in fp32 at this batch size and at batch 1, the baseline the engine is measured against.
    With `quality`, the loss of this mode's decoding beside fp32's (`decode_loss`), so speed comes with its cost."""
    from nanophi.device import pick_device

    if batch_size < 1 or new_tokens < 2 or prompt_tokens < 1 or repeats < 1:
        raise UserError("bench generate needs batch_size >= 1, new_tokens >= 2, prompt_tokens >= 1, repeats >= 1")
    torch_dtype = parse_dtype(dtype)
    dev = pick_device(device)
    model, tokenizer = model_ref if isinstance(model_ref, tuple) else load_model_for_inference(model_ref, dev)
    model = model.to(dev).eval()
    if prompt_tokens + new_tokens > model.config.block_size:
        raise UserError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} > the model's context "
                        f"{model.config.block_size}; ask for fewer")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), generator=g).tolist()
    engine = Engine(model, tokenizer, dev, torch_dtype, quantize)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        engine.generate_ids(prompts, n, temperature=0)
        return time.perf_counter() - t0

    run(2)  # warm-up: allocator, kernels' first-call setup
    prefill = min(run(1) for _ in range(repeats))
    total = min(run(new_tokens) for _ in range(repeats))
    result: dict[str, Any] = {
        "model": str(model_ref) if not isinstance(model_ref, tuple) else "(in memory)",
        "params_m": round(model.num_params(non_embedding=False) / 1e6, 1), "batch_size": batch_size,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "dtype": str(torch_dtype).removeprefix("torch."),
        "quantize": quantize, "device": str(dev), "threads": torch.get_num_threads(), "prefill_s": round(prefill, 4),
        "decode_tok_s": round(batch_size * (new_tokens - 1) / max(total - prefill, 1e-9), 1),
        "total_tok_s": round(batch_size * new_tokens / total, 1),
    }
    if quality:
        result["loss"] = decode_loss(engine, tokenizer, batch_size, prompt_tokens, new_tokens)
        fp32 = Engine(model, tokenizer, dev) if (torch_dtype, quantize) != (torch.float32, None) else engine
        result["fp32_loss"] = decode_loss(fp32, tokenizer, batch_size, prompt_tokens, new_tokens)
        result["loss_vs_fp32"] = round(result["loss"] / result["fp32_loss"] - 1, 4)
    if compare_hf:
        result |= _bench_hf(model, tokenizer, prompts, new_tokens, repeats, dev)
        result["speedup_vs_hf"] = round(result["decode_tok_s"] / result["hf_decode_tok_s"], 2)
        result["speedup_vs_hf_batch1"] = round(result["decode_tok_s"] / result["hf_batch1_decode_tok_s"], 2)
    return result


@torch.inference_mode()
def decode_loss(engine: Engine, tokenizer: Any, batch_size: int, prompt_tokens: int, new_tokens: int) -> float:
    """Mean cross-entropy of the engine's decoding steps on real text, teacher-forced: `batch_size` rows of
    CPython's documentation (the offline default corpus), each prefilled with `prompt_tokens` and then fed its
    next `new_tokens` one at a time through the KV cache, exactly as generation runs -- so it prices what a
    --dtype or --quantize choice does to the prompt's keys and values and to every decoding step."""
    from nanophi.sources import pydoc_documents

    need = batch_size * (prompt_tokens + new_tokens)
    ids: list[int] = []
    for doc in pydoc_documents():
        try:
            ids += tokenizer.encode(doc.text + "\n\n")
        except UserError:  # a char model trained elsewhere cannot spell every topic; the others still count
            continue
        if len(ids) > need:
            break
    if len(ids) <= need:
        raise UserError(f"the model's tokenizer encodes {len(ids)} tokens of CPython's documentation and --quality "
                        f"needs {need + 1}; ask for fewer --batch-size/--prompt-tokens/--new-tokens")
    rows = torch.tensor(ids[:need]).view(batch_size, -1)
    targets = torch.tensor(ids[1 : need + 1]).view(batch_size, -1)
    engine.model.eval()
    engine.prefill_model.eval()
    cache, logits = engine._prefill(rows[:, :prompt_tokens].tolist(), prompt_tokens + new_tokens)
    total = 0.0
    for t in range(prompt_tokens, prompt_tokens + new_tokens):
        total += torch.nn.functional.cross_entropy(logits.float(), targets[:, t - 1].to(logits.device),
                                                   reduction="sum").item()
        if t + 1 < prompt_tokens + new_tokens:
            logits = engine.decode_step(rows[:, t].to(engine.device), cache)
    return round(total / (batch_size * new_tokens), 4)


def _bench_hf(model: GPT, tokenizer: Any, prompts: list[list[int]], new_tokens: int, repeats: int,
              device: torch.device) -> dict[str, Any]:
    import tempfile

    from transformers import AutoModelForCausalLM

    from nanophi.convert.hf import export_hf

    with tempfile.TemporaryDirectory(prefix="nanophi-bench-hf-") as d:
        export_hf(model, tokenizer, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
    out: dict[str, Any] = {}
    for name, batch in (("hf", prompts), ("hf_batch1", prompts[:1])):
        x = torch.tensor(batch, device=device)

        def run(n: int) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        run(2)
        prefill = min(run(1) for _ in range(repeats))
        total = min(run(new_tokens) for _ in range(repeats))
        out[f"{name}_prefill_s"] = round(prefill, 4)
        out[f"{name}_decode_tok_s"] = round(len(batch) * (new_tokens - 1) / max(total - prefill, 1e-9), 1)
    return out



def spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max of per-round numbers: on a shared machine the range says more than one value."""
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


def cpu_flags() -> str:
    """The CPU features that decide these numbers (Linux /proc/cpuinfo; "" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags)
