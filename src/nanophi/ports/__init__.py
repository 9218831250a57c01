"""The GPT in two more frameworks: JAX/Flax NNX (`nanophi.ports.jax`) and Keras 3 (`nanophi.ports.keras`).

    model, config, tokenizer = nanophi.ports.jax.from_nanophi("runs/tiny")   # the run's weights, in Flax
    history = nanophi.ports.keras.train_keras(prepared_dir, config, steps=500) # train in Keras on the same data

Both ports implement every `GPTConfig` switch (learned or rotary positions, LayerNorm or RMSNorm, GELU, SwiGLU or
ReLU², grouped-query attention, QK-norm, tied or untied head, logit soft-cap) and keep the PyTorch module's names
(`wte`, `h[i].attn.c_attn`, `mlp.c_fc`, ...), so weights move across by name. `nanophi parity` checks the logits
and greedy tokens against PyTorch. This module holds what the two ports share and that needs neither framework:
reading a checkpoint into numpy, the name mapping, the training recipe, the batches and the evaluation loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from nanophi.errors import UserError
from nanophi.model import GPTConfig

log = logging.getLogger(__name__)

# Every GPTConfig field, with how the ports treat it. A field added to GPTConfig later and not listed here makes
# the ports refuse a config that sets it away from its default, instead of silently computing something else.
PORTED_FIELDS = frozenset({
    "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size", "bias", "pos", "norm", "mlp",
    "mlp_hidden", "qk_norm", "tie_embeddings", "rope_theta", "norm_eps", "zero_init_proj", "logit_softcap",
    "dropout",  # identity at inference; training in the ports refuses dropout > 0 (see `check_trainable`)
})
SUPPORTED_VALUES = {"pos": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu", "relu2")}

Kind = Literal["embedding", "kernel", "scale", "bias"]


def check_supported(config: GPTConfig, port: str) -> None:
    """UserError when `config` uses a switch the ports do not implement."""
    for f in fields(GPTConfig):
        if f.name not in PORTED_FIELDS and getattr(config, f.name) != f.default:
            raise UserError(f"the {port} port does not implement {f.name}={getattr(config, f.name)!r}; "
                            f"train without it or use the PyTorch model")
    for name, allowed in SUPPORTED_VALUES.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"the {port} port supports {name} in {'|'.join(allowed)}, not {getattr(config, name)!r}")
    if config.vocab_size < 1:
        raise UserError("vocab_size must be set (from the tokenizer) before building a port model")


def check_trainable(config: GPTConfig, port: str) -> None:
    check_supported(config, port)
    if config.dropout:
        # Dropout changes the random stream per framework, so runs could not be compared step for step anyway.
        raise UserError(f"the {port} port trains without dropout; set dropout=0 (got {config.dropout})")


# ----------------------------------------------------------------------------------------------------------------
# weights: a nanophi checkpoint -> numpy arrays named the way the ports name them


@dataclass(frozen=True)
class PortTensor:
    """One nanophi tensor in port layout: `path` walks the port's modules (`("h", 0, "attn", "c_attn")`)."""

    name: str  # the nanophi (PyTorch) name, e.g. transformer.h.0.attn.c_attn.weight
    path: tuple[str | int, ...]
    kind: Kind
    value: np.ndarray  # float32, already in the port's layout (Linear weights transposed to (in, out))


EMBEDDINGS = ("wte", "wpe")


def port_location(name: str, ndim: int) -> tuple[tuple[str | int, ...], Kind]:
    """Where a nanophi tensor lives in a port: `transformer.h.0.attn.c_attn.weight` -> (("h", 0, "attn", "c_attn"),
    "kernel"). Embeddings are `wte`/`wpe`, other 2-d weights are linear kernels, 1-d weights are norm gains."""
    *modules, leaf = name.removeprefix("transformer.").split(".")
    path = tuple(int(p) if p.isdigit() else p for p in modules)
    if leaf == "bias":
        return path, "bias"
    if leaf != "weight" or not path:
        raise UserError(f"unexpected tensor {name!r} in the checkpoint; is it a nanophi checkpoint?")
    if path[-1] in EMBEDDINGS:
        return path, "embedding"
    return path, "kernel" if ndim == 2 else "scale"


def to_port_tensors(weights: dict[str, Any]) -> list[PortTensor]:
    """nanophi weights (name -> torch tensor or numpy array) -> port tensors.

    PyTorch's Linear stores (out, in) and computes x @ W.T; Flax and Keras store the kernel as (in, out), so
    linear weights are transposed. Embeddings and norm vectors keep their layout. A tied head is stored once
    (as `transformer.wte.weight`) and the ports tie it the same way.
    """
    out = []
    for name, tensor in weights.items():
        value = _to_numpy(tensor)
        path, kind = port_location(name, value.ndim)
        if kind == "kernel":
            value = np.ascontiguousarray(value.T)
        out.append(PortTensor(name, path, kind, value))
    return out


def nanophi_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a nanophi checkpoint of `config` holds, with its PyTorch shape."""
    import torch

    from nanophi.model import GPT

    with torch.device("meta"):  # shapes only: no memory, no init work
        model = GPT(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")  # stored once, under transformer.wte.weight
    return shapes


def _to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through float32)
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32)


@dataclass
class RunWeights:
    """What a port needs from a nanophi run: the model config, the weights as numpy, and the tokenizer."""

    path: Path
    config: GPTConfig
    weights: dict[str, np.ndarray]
    tokenizer: Any
    run_config: dict[str, Any]  # the checkpoint's whole config.json: {"model": ..., "train": ..., "data": ...}
    state: dict[str, Any]  # its state.json: step, best_val, data_dir ...


def read_run(ref: str | Path, port: str) -> RunWeights:
    """Read a nanophi run directory or checkpoint (its `best`, else `last`) into numpy float32 arrays."""
    from nanophi import checkpoint
    from nanophi.tokenizer import load_tokenizer

    ckpt = checkpoint.load(Path(ref), with_trainer=False)
    config = GPTConfig.from_dict(ckpt.config["model"])
    check_supported(config, port)
    expected = nanophi_shapes(config)
    got = {k: tuple(v.shape) for k, v in ckpt.weights.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise UserError(f"checkpoint {ckpt.path} does not match its config: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shape {wrong[:3]}")
    weights = {k: _to_numpy(v) for k, v in ckpt.weights.items()}
    tokenizer = load_tokenizer(ckpt.path / checkpoint.TOKENIZER)
    return RunWeights(ckpt.path, config, weights, tokenizer, ckpt.config, ckpt.state)


def nanophi_init(config: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """The weights `nanophi train` starts from with this seed (it seeds torch, then builds the GPT), as numpy.

    Starting the ports from the very same tensors makes a training comparison about the frameworks' numerics,
    not about two random draws. The caller's torch RNG is left as it was.
    """
    import torch

    from nanophi.checkpoint import model_state_dict
    from nanophi.model import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    return {k: v.numpy() for k, v in model_state_dict(model).items()}


# ----------------------------------------------------------------------------------------------------------------
# rotary tables (the same float32 arithmetic as nanophi.model.Rotary)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (max_len, head_dim // 2) float32, for the 'rotate half' layout."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)))
    freqs = np.outer(np.arange(max_len, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# training: the recipe, the batches and the evaluation that PyTorch's trainer uses


@dataclass
class TrainHistory:
    """What `train_jax` / `train_keras` return: losses per log interval, the final val metrics, the model."""

    backend: str
    step: list[int] = field(default_factory=list)  # the step each entry ends at
    loss: list[float] = field(default_factory=list)  # mean train loss (nats/token) over the interval
    accuracy: list[float] = field(default_factory=list)  # mean next-token accuracy over the interval
    val_loss: float = math.nan
    val_accuracy: float = math.nan
    val_bpb: float = math.nan
    train_time_s: float = 0.0  # the training loop, compilation included; data preparation and eval excluded
    first_step_s: float = 0.0  # the first step alone: mostly tracing and compilation
    model: Any = field(default=None, repr=False)  # the trained port model
    config: GPTConfig | None = field(default=None, repr=False)

    def record(self, step: int, loss: float, accuracy: float) -> None:
        self.step.append(step)
        self.loss.append(loss)
        self.accuracy.append(accuracy)
        log.info(f"{self.backend} step {step}: loss {loss:.4f}, accuracy {accuracy:.4f}")

    def set_eval(self, metrics: dict[str, float]) -> None:
        self.val_loss, self.val_accuracy = metrics["val_loss"], metrics["val_accuracy"]
        self.val_bpb = metrics["val_bpb"]
        log.info(f"{self.backend} val loss {self.val_loss:.4f}, accuracy {self.val_accuracy:.4f}")

    def summary(self) -> dict[str, Any]:
        """Plain numbers, JSON-ready (no model)."""
        steps = self.step[-1] if self.step else 0
        steady = (self.train_time_s - self.first_step_s) / max(1, steps - 1)
        return {"backend": self.backend, "steps": steps, "train_loss": self.loss[-1] if self.loss else None,
                "train_accuracy": self.accuracy[-1] if self.accuracy else None, "val_loss": self.val_loss,
                "val_accuracy": self.val_accuracy, "val_bpb": self.val_bpb, "train_time_s": self.train_time_s,
                "first_step_s": self.first_step_s, "ms_per_step": 1000 * steady}


@dataclass
class Recipe:
    """Everything a port's training run reads, resolved: data, model shape, and PyTorch's TrainConfig."""

    data: Any  # nanophi.prepare.PreparedData
    model: GPTConfig
    train: Any  # nanophi.config.TrainConfig
    lr_table: np.ndarray  # (steps,) float32: the learning rate of every step, as PyTorch's trainer sets it

    @property
    def steps(self) -> int:
        return self.train.max_iters


def resolve_recipe(
    data: Any,
    model: GPTConfig | None,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    train: Any,
    port: str,
) -> Recipe:
    """Open or prepare the data and fill the unset settings with the defaults `nanophi train` uses."""
    from nanophi.config import TrainConfig, resolve
    from nanophi.optim import lr_multiplier

    prepared = open_data(data)
    model = replace(model) if model is not None else resolve({}).model  # a copy: vocab_size is set below
    model.vocab_size = prepared.vocab_size
    check_trainable(model, port)
    tc = replace(train) if train is not None else TrainConfig()
    overrides = {k: v for k, v in (("max_iters", steps), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    tc = replace(tc, **overrides)  # replace() reruns __post_init__, so bad values raise UserError
    if tc.grad_accum != 1:
        raise UserError(f"the {port} port trains with grad_accum=1; raise batch_size instead (got {tc.grad_accum})")
    if tc.optimizer != "adamw":
        raise UserError(f"the {port} port trains with AdamW only, not {tc.optimizer!r}")
    if len(prepared.train) < model.block_size + 1:
        raise UserError(f"the training split has {len(prepared.train)} tokens, fewer than block_size + 1 = "
                        f"{model.block_size + 1}; use more text or a smaller block_size")
    lr_table = np.array([tc.lr * lr_multiplier(s, tc) for s in range(tc.max_iters)], dtype=np.float32)
    return Recipe(prepared, model, tc, lr_table)


def open_data(data: Any) -> Any:
    """A PreparedData, a prepared directory, or a corpus source for `nanophi.prepare.prepare` (None: CPython docs)."""
    from nanophi.prepare import META_FILE, PreparedData, open_prepared, prepare

    if isinstance(data, PreparedData):
        return data
    if data is not None and (Path(data) / META_FILE).is_file():
        return open_prepared(Path(data))
    return prepare(None if data is None else str(data))


def train_batches(recipe: Recipe) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) int32 (B, T) batches: the very windows, in the same order, that PyTorch's trainer draws."""
    import torch

    from nanophi.dataloader import BatchLoader

    loader = BatchLoader(recipe.data.train, recipe.model.block_size, recipe.train.batch_size, recipe.train.seed,
                         torch.device("cpu"))
    for _ in range(recipe.steps):
        x, y = loader.next()
        yield x.numpy().astype(np.int32), y.numpy().astype(np.int32)


def evaluate(logits_fn: Callable[[np.ndarray], np.ndarray], recipe: Recipe) -> dict[str, float]:
    """Val loss (nats/token), accuracy and bits per byte over the same windows PyTorch's `evaluate_tokens` scores."""
    import torch

    from nanophi.dataloader import eval_batches

    tokens = recipe.data.val
    tc = recipe.train
    nats, correct, count = 0.0, 0, 0
    for x, y in eval_batches(tokens, recipe.model.block_size, tc.eval_batch_size, torch.device("cpu"), tc.eval_iters):
        x = x.numpy().astype(np.int32)
        n = len(x)
        if n < tc.eval_batch_size:  # pad the last batch: one shape for the whole split, so one compilation
            x = np.concatenate([x, np.zeros((tc.eval_batch_size - n, x.shape[1]), dtype=np.int32)])
        logits = logits_fn(x)[:n].astype(np.float64)  # (B, T, V)
        y = y.numpy()
        scored = y != -1  # the tail window masks targets an earlier window already scored
        logz = _logsumexp(logits)
        picked = np.take_along_axis(logits, np.maximum(y, 0)[..., None], axis=-1)[..., 0]
        nats += float(((logz - picked) * scored).sum())
        correct += int(((logits.argmax(-1) == y) & scored).sum())
        count += int(scored.sum())
    loss = nats / count
    # the same bytes-per-token estimate as nanophi.train.evaluate_tokens
    bpb = nats / math.log(2) / (recipe.data.val_bytes * count / max(1, len(tokens) - 1))
    return {"val_loss": loss, "val_accuracy": correct / count, "val_bpb": bpb}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# greedy decoding: one fixed-shape forward per token


def greedy_rows(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int,
) -> list[list[int]]:
    """Greedy decoding by recomputing each row's cropped context (nanoGPT's loop, no KV cache).

    Every step runs one (B, block_size) batch: the contexts are left-aligned and right-padded, and causal attention
    keeps the padding out of the logits at each row's last real position. One shape means one compilation.
    """
    if any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    rows = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        ctx = [r[-block_size:] for r in rows]
        x = np.zeros((len(rows), block_size), dtype=np.int32)
        for i, c in enumerate(ctx):
            x[i, : len(c)] = c
        logits = logits_fn(x)  # (B, block_size, V)
        last = logits[np.arange(len(rows)), [len(c) - 1 for c in ctx]]  # (B, V)
        for i, tok in enumerate(last.argmax(-1).tolist()):
            rows[i].append(tok)
            new[i].append(tok)
    return new
