"""`nanophi bench generate --compare llama.cpp`: nanophi's Engine and llama.cpp (llama-cpp-python) decoding the
same weights at the same bits in one process, in interleaved rounds, with the ratio nanophi / llama.cpp per round.

    nanophi bench generate --model smollm2-135m-instruct --compare llama.cpp --threads 1 --rounds 3
    nanophi bench generate --model smollm2-135m-instruct --compare llama.cpp --batch-size 8 --pairs fp32,int8

At batch 1 llama.cpp runs through `Llama.eval`, one token per call. At batch B > 1 it decodes B sequences in
parallel the way its own `llama-parallel` example does: one context with `n_seq_max = B` (a KV cache per
sequence, `kv_unified` off, as llama.cpp advises for sequences that share no prefix), every prompt in one
`llama_batch` with distinct seq_ids, then one `llama_decode` of a B-token batch per step. Greedy on both sides.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from nanophi.bench_decode import cpu_flags, spread
from nanophi.errors import UserError

# Each nanophi mode beside the llama.cpp file type with the same bits per weight: (nanophi --quantize, GGUF type
# name, llama_ftype). llama.cpp's own quantizer makes the Q8_0/Q4_1 files from an F32 export of the same weights,
# unless --model is a GGUF already of that type (SmolLM2's shipped file is Q4_1): then that file is used as is.
LLAMA_PAIRS: dict[str, tuple[str | None, str, int]] = {"fp32": (None, "F32", 0), "int8": ("int8", "Q8_0", 7),
                                                        "int4": ("int4", "Q4_1", 3)}
LLAMA_CPP_PIP = "pip install llama-cpp-python==0.3.36"
# llama.cpp rounds each sequence's context up to this many cells; asking for a multiple wastes nothing
LLAMA_CTX_PAD = 256
# its physical batch (n_ubatch) default: how many prompt tokens one forward pass of the prefill takes
LLAMA_UBATCH = 512


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--compare llama.cpp needs llama-cpp-python, which is not installed: {LLAMA_CPP_PIP} "
                        "(or drop --compare)") from None
    return llama_cpp


def _gguf_source(model_ref: str) -> Path | None:
    """The GGUF file --model names (a path or the SmolLM2 alias), else None."""
    from nanophi.refs import SMOLLM2_ALIAS, smollm2_path

    if str(model_ref).lower() == SMOLLM2_ALIAS:
        return smollm2_path()
    path = Path(model_ref)
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def _llama_files(model: Any, tokenizer: Any, source: Path | None, pairs: list[str], tmp: Path,
                 llama_cpp: Any) -> dict[str, Path]:
    """One GGUF per pair: the source file where its type matches, else llama.cpp's quantization of an F32
    export (nanophi's exporter) of exactly the weights nanophi runs."""
    from nanophi.convert.gguf import read_gguf, write_gguf

    source_type = int(read_gguf(source).metadata.get("general.file_type", -1)) if source else None
    files: dict[str, Path] = {}
    f32 = tmp / "F32.gguf"
    for pair in pairs:
        _, name, ftype = LLAMA_PAIRS[pair]
        if source is not None and source_type == ftype:
            files[pair] = source
            continue
        if not f32.exists():
            write_gguf(model, tokenizer, f32, "f32")
        if ftype == 0:
            files[pair] = f32
            continue
        out = tmp / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = torch.get_num_threads()
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # its C code logs every tensor to stdout
            code = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params))
        if code != 0:
            raise UserError(f"llama.cpp could not quantize the exported model to {name}; compare --pairs without "
                            f"{pair}")
        files[pair] = out
    return files


class _LlamaRunner:
    """Greedy decoding of one sequence with llama-cpp-python's low-level calls: the prompt in one batch, then
    one token per call, the next token the argmax of the last logits (what nanophi's greedy engine does), so
    both sides do the same work and Python's share is one call per token on each."""

    def __init__(self, llama_cpp: Any, path: Path, n_ctx: int, n_batch: int, threads: int) -> None:
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """(prefill seconds, decode seconds for new_tokens - 1 tokens, the new token ids) of prompts[0]."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompts[0])
        out = [self._next()]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([out[-1]])
            out.append(self._next())
        return t1 - t0, time.perf_counter() - t1, [out]

    def close(self) -> None:
        self.llm.close()


class _LlamaBatchRunner:
    """Greedy decoding of B sequences in parallel through llama.cpp's C API: one context holding B sequences
    (n_seq_max = B), all prompts in one llama_batch (sequence s's tokens tagged seq_id s, its last one asking
    for logits), then per step one llama_decode of a B-token batch, each sequence's next token the argmax of
    its own logits row."""

    def __init__(self, llama_cpp: Any, path: Path, batch_size: int, prompt_tokens: int, new_tokens: int,
                 threads: int) -> None:
        import numpy as np
        from llama_cpp._utils import suppress_stdout_stderr

        self.np, self.lib, self.B = np, llama_cpp, batch_size
        per_seq = -(-(prompt_tokens + new_tokens + 8) // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
        n_batch = batch_size * prompt_tokens  # every prompt in one llama_decode, as nanophi prefills them
        with suppress_stdout_stderr(disable=False):  # loading logs every tensor
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                               llama_cpp.llama_model_default_params())
            params = llama_cpp.llama_context_default_params()
            params.n_ctx, params.n_seq_max, params.kv_unified = batch_size * per_seq, batch_size, False
            params.n_batch, params.n_ubatch = n_batch, min(n_batch, LLAMA_UBATCH)
            params.n_threads = params.n_threads_batch = threads
            self.ctx = llama_cpp.llama_init_from_model(self.model, params) if self.model else None
        if not self.ctx:
            raise UserError(f"llama.cpp could not load {path.name} with {batch_size} parallel sequences; ask for a "
                            "smaller --batch-size")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max(n_batch, batch_size), 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, seq_id, position, wants_logits) entries."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, seq, pos, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _argmax(self) -> list[int]:
        # the rows of the tokens that asked for logits, in batch order: one per sequence, sequence 0 first
        logits = self.np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(self.B, self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """(prefill seconds incl. the first tokens, decode seconds for the other new_tokens - 1 steps, the new
        token ids of each sequence). The prompts share one length."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        P = len(prompts[0])
        t0 = time.perf_counter()
        self._decode([(tok, s, pos, pos == P - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)])
        out = [[t] for t in self._argmax()]
        t1 = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode([(row[-1], s, P + step, True) for s, row in enumerate(out)])
            for row, tok in zip(out, self._argmax()):
                row.append(tok)
        return t1 - t0, time.perf_counter() - t1, out

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _nanophi_run(engine: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill seconds incl. the first tokens, decode seconds for the rest, the new token ids of each prompt):
    one greedy generation of the batch, the first token's arrival timed by the streaming callback."""
    first: list[float] = []

    def on_token(i: int, new: list[int]) -> None:
        if i == 0 and len(new) == 1:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    ids = engine.generate_ids(prompts, new_tokens, temperature=0, on_token=on_token)
    return first[0] - t0, time.perf_counter() - first[0], ids


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_compare_llama_cpp(
    model_ref: str | tuple[Any, Any],
    threads: int = 1,
    rounds: int = 3,
    prompt_tokens: int = 64,
    new_tokens: int = 64,
    pairs: Sequence[str] = tuple(LLAMA_PAIRS),
    seed: int = 0,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Greedy decode tokens/s (all `batch_size` sequences together) of nanophi and llama.cpp in one process: the
    same weights at the same bits per pair (fp32/F32, int8/Q8_0, int4/Q4_1), the same random prompts,
    `threads` threads each, in `rounds` interleaved rounds (their order alternating) so a shared machine's load
    hits both alike. Per pair: tok/s and prefill ms of each (median, min, max over rounds), the ratio
    nanophi/llama.cpp per round, how many of the first sequence's greedy tokens agree and, at batch > 1, how
    many sequences agree in every token."""
    from nanophi.engine import Engine, load_model_for_inference

    llama_cpp = _import_llama_cpp()
    unknown = [p for p in pairs if p not in LLAMA_PAIRS]
    if unknown or not pairs:
        raise UserError(f"--pairs takes a comma list of {', '.join(LLAMA_PAIRS)}, got {','.join(pairs)!r}")
    if threads < 1 or rounds < 1 or prompt_tokens < 1 or new_tokens < 2 or batch_size < 1:
        raise UserError("--compare llama.cpp needs --threads >= 1, --rounds >= 1, --prompt-tokens >= 1, "
                        "--new-tokens >= 2 and --batch-size >= 1")
    torch.set_num_threads(threads)
    model, tokenizer = model_ref if isinstance(model_ref, tuple) else load_model_for_inference(model_ref, "cpu")
    model.eval()
    if prompt_tokens + new_tokens > model.config.block_size:
        raise UserError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} > the model's context "
                        f"{model.config.block_size}; ask for fewer")
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens),
                            generator=torch.Generator().manual_seed(seed)).tolist()
    load_start = os.getloadavg()[0]

    def runner(path: Path) -> _LlamaRunner | _LlamaBatchRunner:
        if batch_size == 1:
            return _LlamaRunner(llama_cpp, path, prompt_tokens + new_tokens + 8, max(prompt_tokens, 8), threads)
        return _LlamaBatchRunner(llama_cpp, path, batch_size, prompt_tokens, new_tokens, threads)

    with tempfile.TemporaryDirectory(prefix="nanophi-bench-llama-") as d:
        source = None if isinstance(model_ref, tuple) else _gguf_source(model_ref)
        files = _llama_files(model, tokenizer, source, list(pairs), Path(d), llama_cpp)
        sides = {p: (Engine(model, tokenizer, "cpu", torch.float32, LLAMA_PAIRS[p][0]), runner(files[p]))
                 for p in pairs}  # llama.cpp maps its file, so the directory may go once it is loaded
    times: dict[str, dict[str, list[float]]] = {p: {k: [] for k in ("ours", "theirs", "ours_pre", "theirs_pre")}
                                                for p in pairs}
    first_agree: dict[str, int] = {}
    rows_agree: dict[str, int] = {}
    try:
        for engine, llama in sides.values():  # warm-up: thread pools, first-call kernel setup
            _nanophi_run(engine, prompts, 4)
            llama.run(prompts, 4)
        for r in range(rounds):
            for p in pairs:
                engine, llama = sides[p]
                order = [("ours", lambda: _nanophi_run(engine, prompts, new_tokens)),
                         ("theirs", lambda: llama.run(prompts, new_tokens))]
                results = {}
                for side, fn in order if r % 2 == 0 else order[::-1]:
                    pre, dec, ids = fn()
                    times[p][side].append(batch_size * (new_tokens - 1) / dec)
                    times[p][side + "_pre"].append(1000 * pre)
                    results[side] = ids
                first_agree[p] = _agree(results["ours"][0], results["theirs"][0])
                rows_agree[p] = sum(a == b for a, b in zip(results["ours"], results["theirs"]))
    finally:
        for _, llama in sides.values():
            llama.close()
    result: dict[str, Any] = {
        "model": "(in memory)" if isinstance(model_ref, tuple) else str(model_ref), "threads": threads,
        "batch_size": batch_size, "rounds": rounds, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__, "cpu_flags": cpu_flags(),
    }
    for p in pairs:
        t = times[p]
        ratios = [a / b for a, b in zip(t["ours"], t["theirs"])]
        result[p] = {"llama_cpp_type": LLAMA_PAIRS[p][1], "file": files[p].name,
                     "nanophi_tok_s": spread(t["ours"]), "llama_cpp_tok_s": spread(t["theirs"]),
                     "ratio": spread(ratios),  # nanophi / llama.cpp, per round: > 1 means nanophi is faster
                     "nanophi_prefill_ms": spread(t["ours_pre"]), "llama_cpp_prefill_ms": spread(t["theirs_pre"]),
                     "greedy_tokens_agree": first_agree[p]}  # the first sequence's leading tokens picked alike
        if batch_size > 1:
            result[p]["greedy_rows_agree"] = rows_agree[p]  # sequences whose every new token is the same
    result["load_avg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]  # at the start and the end
    return result
