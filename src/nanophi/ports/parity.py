"""`nanophi parity`: load a run's weights into the JAX or Keras port and check it against PyTorch.

    nanophi parity runs/tiny --backend jax            # logits on a val batch + greedy tokens, PyTorch vs JAX
    nanophi parity runs/tiny --backend tf --json      # the same for Keras/TensorFlow, one JSON object
    nanophi parity runs/tiny --backend jax --train-steps 500   # also train the port on the run's data and recipe

Exit code 0 when the largest logit difference is within --tolerance and every greedy token matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nanophi.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = {"jax": "nanophi.ports.jax", "tf": "nanophi.ports.keras"}
EXTRAS = {"jax": "jax", "tf": "tf"}
TOLERANCE = 1e-4  # fp32 logits of the same weights agree to ~1e-5 here; a wrong port is off by ~1e-1 and more


def load_backend(name: str) -> Any:
    """The port module for `name`; UserError naming the extra to install when its framework is missing."""
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise UserError(f"--backend {name} needs {e.name}: pip install -e '.[{EXTRAS[name]}]'") from None
    if name == "tf":
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # TensorFlow runs fp32 matmuls as TF32 on Ampere+ GPUs by default: ~1e-3 relative error
            tf.config.experimental.enable_tensor_float_32_execution(False)
    return module


def parity_batch(run: Any, batch_size: int, seq_len: int, seed: int) -> tuple[np.ndarray, str]:
    """(B, T) int32 ids: evenly spaced windows of the run's val split when its prepared data is still there,
    else uniform random ids. Returns the batch and where it came from."""
    from nanophi.prepare import META_FILE, open_prepared

    data_dir = run.state.get("data_dir")
    if data_dir and (Path(data_dir) / META_FILE).is_file():
        try:
            data = open_prepared(Path(data_dir))
        except UserError:
            data = None
        if data is not None and data.meta.get("sha256") == run.state.get("data_sha256") and len(data.val) > seq_len:
            starts = np.linspace(0, len(data.val) - seq_len - 1, batch_size).astype(np.int64)
            return np.stack([data.val[s : s + seq_len] for s in starts]).astype(np.int32), "val"
    rng = np.random.default_rng(seed)
    return rng.integers(0, run.config.vocab_size, (batch_size, seq_len), dtype=np.int32), "random"


def check(
    ref: str | Path,
    backend: str,
    batch_size: int = 4,
    seq_len: int | None = None,
    prompt_tokens: int = 8,
    new_tokens: int = 32,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Run one batch through PyTorch and the port, and greedy-decode from the batch's first tokens in both."""
    import torch

    from nanophi import checkpoint
    from nanophi.engine import Engine
    from nanophi.ports import greedy_rows, read_run
    from nanophi.refs import load_model

    if min(batch_size, seq_len or 1, prompt_tokens) < 1 or new_tokens < 0:
        raise UserError("--batch-size, --seq-len and --prompt-tokens must be >= 1 and --new-tokens >= 0")
    checkpoint.find(Path(ref))  # a wrong path fails now, not after the seconds of importing a framework
    port = load_backend(backend)
    run = read_run(ref, port.PORT)
    torch_model, _ = load_model(run.path)
    model = port.build(run.config, run.weights)
    T = min(seq_len or run.config.block_size, run.config.block_size)
    x, source = parity_batch(run, batch_size, T, seed)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x.astype(np.int64)), all_logits=True)[0].numpy()
    forward = port.forward_fn(model)
    got = forward(x)
    diff = float(np.abs(want - got).max())

    prompts = [row[: min(prompt_tokens, T)].tolist() for row in x]
    engine = Engine(torch_model, None)
    # use_cache=False: crop-the-context recompute, the loop the ports run (the KV cache refills differently
    # once a row passes block_size)
    torch_new = engine.generate_ids(prompts, new_tokens, temperature=0, use_cache=False)
    # the same (B, block_size) shape as the batch above when T == block_size: no second compilation
    port_new = greedy_rows(forward, prompts, new_tokens, run.config.block_size)
    result = {
        "backend": backend, "framework": _framework(backend), "checkpoint": str(run.path), "batch": list(x.shape),
        "batch_source": source, "max_abs_diff": diff, "max_abs_logit": float(np.abs(want).max()),
        "tolerance": tolerance, "greedy_match": torch_new == port_new,
        "greedy_tokens": sum(len(r) for r in torch_new),
    }
    if torch_new != port_new:
        result["first_mismatch"] = _first_mismatch(torch_model, prompts, torch_new, port_new)
    result["ok"] = diff <= tolerance and result["greedy_match"]
    return result


def _first_mismatch(torch_model: Any, prompts: list[list[int]], want: list[list[int]],
                    got: list[list[int]]) -> dict[str, Any]:
    """Where greedy decoding first diverged, and PyTorch's margin between its top two tokens there: a margin of
    ~1e-5 is a near-tie that fp32 rounding may break either way, a large one is a real difference."""
    import torch

    for row, (w, g) in enumerate(zip(want, got, strict=True)):
        if w == g:
            continue
        pos = next((i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b), min(len(w), len(g)))
        ctx = (prompts[row] + w[:pos])[-torch_model.config.block_size:]
        with torch.no_grad():
            top2 = torch_model(torch.tensor([ctx]))[0][0, -1].topk(2).values
        return {"row": row, "position": pos, "torch_token": w[pos] if pos < len(w) else None,
                "port_token": g[pos] if pos < len(g) else None, "torch_top2_margin": float(top2[0] - top2[1])}
    return {}


def _framework(backend: str) -> str:
    if backend == "jax":
        import flax
        import jax

        return f"jax {jax.__version__}, flax {flax.__version__} ({jax.default_backend()})"
    import keras

    return f"keras {keras.__version__} ({keras.backend.backend()} {_tf_version()})"


def _tf_version() -> str:
    try:
        import tensorflow as tf
    except ImportError:
        return ""
    return tf.__version__


def train_port(ref: str | Path, backend: str, steps: int) -> dict[str, Any]:
    """Train the port from scratch with the run's model shape, recipe and data for `steps` steps; report its val
    loss next to the PyTorch run's. Both start from the same init and draw the same batches (same seed)."""
    from nanophi.config import RunConfig
    from nanophi.ports import read_run

    port = load_backend(backend)
    run = read_run(ref, port.PORT)
    cfg = RunConfig.from_dict(run.run_config)
    data = _run_data(run, cfg)
    train_fn = port.train_jax if backend == "jax" else port.train_keras
    history = train_fn(data, cfg.model, train=cfg.train, steps=steps)
    out = history.summary()
    out["torch_run"] = {"step": run.state.get("step"), "val_loss": run.state.get("best_val"),
                        "max_iters": cfg.train.max_iters}
    return out


def _run_data(run: Any, cfg: Any) -> Any:
    """The prepared data the run trained on: its own directory when still there, else prepared again."""
    from nanophi.prepare import META_FILE, open_prepared, prepare

    data_dir = run.state.get("data_dir")
    if data_dir and (Path(data_dir) / META_FILE).is_file():
        data = open_prepared(Path(data_dir))
        if data.meta.get("sha256") == run.state.get("data_sha256"):
            return data
    dc = cfg.data
    return prepare(dc.data, tokenizer=dc.tokenizer, vocab_size=dc.vocab_size, val_fraction=dc.val_fraction,
                   glob=dc.glob, tokenizer_obj=run.tokenizer)


# --- CLI -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="nanophi run directory or checkpoint")
    parser.add_argument("--backend", choices=sorted(BACKENDS), required=True,
                        help="jax (Flax NNX) or tf (Keras 3 on TensorFlow)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences in the parity batch")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: block_size)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="tokens of each sequence used as greedy prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest logit difference accepted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batch (when the val data is gone)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also train the port this many steps on the run's data and recipe (0 = off)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.train_steps < 0:
        raise UserError(f"--train-steps must be >= 0, got {args.train_steps}")
    result = check(args.run, args.backend, args.batch_size, args.seq_len, args.prompt_tokens, args.new_tokens,
                   args.tolerance, args.seed)
    if args.train_steps:
        result["train"] = train_port(args.run, args.backend, args.train_steps)
    if args.json:
        print(json.dumps(result))
    else:
        print(_describe(result))
    return 0 if result["ok"] else 1


def _describe(r: dict[str, Any]) -> str:
    verdict = "OK" if r["ok"] else "MISMATCH"
    greedy = f"{r['greedy_tokens']} greedy tokens " + ("match" if r["greedy_match"] else
                                                       f"differ (first: {r['first_mismatch']})")
    line = (f"{r['backend']} ({r['framework']}) vs PyTorch: max |logit diff| {r['max_abs_diff']:.2e} "
            f"(tolerance {r['tolerance']:.0e}) on a {tuple(r['batch'])} {r['batch_source']} batch; {greedy}: {verdict}")
    if "train" in r:
        t, ref = r["train"], r["train"]["torch_run"]
        torch_part = (f"; the PyTorch run: {ref['val_loss']:.4f} at step {ref['step']}"
                      if ref["val_loss"] is not None else "")
        line += (f"\ntrained {t['steps']} steps: train loss {t['train_loss']:.4f}, accuracy {t['train_accuracy']:.4f}"
                 f"; val loss {t['val_loss']:.4f}, accuracy {t['val_accuracy']:.4f}{torch_part}"
                 f" ({t['ms_per_step']:.1f} ms/step, first step {t['first_step_s']:.1f} s)")
    return line
