"""nanophi's GPT in Keras 3 (TensorFlow backend), layer for layer, trained with `compile` + `fit`.

    model, config, tokenizer = from_nanophi("runs/tiny")       # a nanophi run's weights, in Keras
    logits(model, ids)                                        # (B, T, V), PyTorch's logits within 1e-4 in fp32
    generate(model, [tokenizer.encode("def ")], 50)           # greedy: PyTorch's tokens
    history = train_keras(prepared_dir, config, steps=500)    # AdamW + SparseCategoricalCrossentropy + accuracy

The layers use `keras.ops` only, so they run on any Keras backend; this module selects TensorFlow unless
KERAS_BACKEND says otherwise. Every layer is float32 whatever the global dtype policy. Layer names follow the
PyTorch module (`wte`, `h[i].attn.c_attn`, `mlp.c_fc`, `ln_f`). Needs `pip install -e .[tf]`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

# Keras picks its backend once, when first imported: ask for TensorFlow unless the user chose one. TF's C++ start-up
# chatter (CPU instruction sets, oneDNN) would otherwise land on stderr of every command that imports this module.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

from nanophi.errors import UserError  # noqa: E402
from nanophi.model import GPTConfig  # noqa: E402
from nanophi.ports import (  # noqa: E402
    TrainHistory,
    check_supported,
    evaluate,
    greedy_rows,
    nanophi_init,
    nanophi_shapes,
    port_location,
    read_run,
    resolve_recipe,
    rotary_tables,
    to_port_tensors,
    train_batches,
)

log = logging.getLogger(__name__)

PORT = "Keras"
DTYPE = "float32"  # per layer, so a global mixed-precision policy cannot change the numerics
INIT_STD = 0.02  # GPT-2's init, as nanophi.model.GPT.init_weights


def _normal(std: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, std) if std > 0 else keras.initializers.Zeros()


def _dense(units: int, bias: bool, std: float, name: str) -> layers.Dense:
    return layers.Dense(units, use_bias=bias, kernel_initializer=_normal(std), dtype=DTYPE, name=name)


def _proj_std(config: GPTConfig) -> float:
    # residual output projections: scaled so the residual stream's variance doesn't grow with depth (or zero)
    return 0.0 if config.zero_init_proj else INIT_STD / math.sqrt(2 * config.n_layer)


def make_norm(config: GPTConfig, name: str, rms: bool = False) -> layers.Layer:
    if rms or config.norm == "rmsnorm":
        return layers.RMSNormalization(epsilon=config.norm_eps, dtype=DTYPE, name=name)
    return layers.LayerNormalization(epsilon=config.norm_eps, center=config.bias, dtype=DTYPE, name=name)


def apply_rotary(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate-half RoPE. x: (B, T, nh, hs); cos, sin: (T, hs/2)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = ops.split(x, 2, axis=-1)
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class CausalSelfAttention(layers.Layer):
    def __init__(self, config: GPTConfig, **kwargs: Any) -> None:
        super().__init__(dtype=DTYPE, **kwargs)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim  # [q; k; v], k/v narrower with GQA
        self.c_attn = _dense(width, config.bias, INIT_STD, "c_attn")
        self.c_proj = _dense(config.n_embd, config.bias, _proj_std(config), "c_proj")
        # QK-norm is an RMSNorm over each head, whatever the blocks' norm is
        self.q_norm = make_norm(config, "q_norm", rms=True) if config.qk_norm else None
        self.k_norm = make_norm(config, "k_norm", rms=True) if config.qk_norm else None

    def call(self, x: Any, cos: Any = None, sin: Any = None) -> Any:
        T, C = x.shape[1], x.shape[2]
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)
        q, k, v = qkv[..., : nh * hs], qkv[..., nh * hs : (nh + nkv) * hs], qkv[..., (nh + nkv) * hs :]
        q = ops.reshape(q, (-1, T, nh, hs))  # (B, T, nh, hs)
        k, v = ops.reshape(k, (-1, T, nkv, hs)), ops.reshape(v, (-1, T, nkv, hs))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if nkv != nh:  # each k/v head serves nh // nkv consecutive query heads (PyTorch's repeat_interleave)
            k, v = ops.repeat(k, nh // nkv, axis=2), ops.repeat(v, nh // nkv, axis=2)
        att = ops.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hs)  # (B, nh, T, T)
        causal = ops.tril(ops.ones((T, T), dtype="bool"))
        att = ops.softmax(ops.where(causal, att, float("-inf")), axis=-1)
        y = ops.reshape(ops.einsum("bhqk,bkhd->bqhd", att, v), (-1, T, C))
        return self.c_proj(y)


class MLP(layers.Layer):
    def __init__(self, config: GPTConfig, **kwargs: Any) -> None:
        super().__init__(dtype=DTYPE, **kwargs)
        self.kind = config.mlp
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections share one matrix, [gate; up], as in the PyTorch module
        self.c_fc = _dense(2 * hidden if self.kind == "swiglu" else hidden, config.bias, INIT_STD, "c_fc")
        self.c_proj = _dense(config.n_embd, config.bias, _proj_std(config), "c_proj")

    def call(self, x: Any) -> Any:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = ops.split(h, 2, axis=-1)
            h = ops.silu(gate) * up
        elif self.kind == "relu2":
            h = ops.square(ops.relu(h))
        else:
            h = ops.gelu(h, approximate=True)  # GPT-2's tanh approximation
        return self.c_proj(h)


class Block(layers.Layer):
    def __init__(self, config: GPTConfig, **kwargs: Any) -> None:
        super().__init__(dtype=DTYPE, **kwargs)
        self.ln_1 = make_norm(config, "ln_1")
        self.attn = CausalSelfAttention(config, name="attn")
        self.ln_2 = make_norm(config, "ln_2")
        self.mlp = MLP(config, name="mlp")

    def call(self, x: Any, cos: Any = None, sin: Any = None) -> Any:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class GPT(keras.Model):
    """idx (B, T) int -> logits (B, T, V), every position (what SparseCategoricalCrossentropy expects)."""

    def __init__(self, config: GPTConfig, **kwargs: Any) -> None:
        check_supported(config, PORT)
        super().__init__(dtype=DTYPE, name=kwargs.pop("name", "gpt"), **kwargs)
        self.gpt_config = config
        self.wte = layers.Embedding(config.vocab_size, config.n_embd, embeddings_initializer=_normal(INIT_STD),
                                    dtype=DTYPE, name="wte")
        self.wpe = (layers.Embedding(config.block_size, config.n_embd, embeddings_initializer=_normal(INIT_STD),
                                     dtype=DTYPE, name="wpe") if config.pos == "learned" else None)
        self.h = [Block(config, name=f"h_{i}") for i in range(config.n_layer)]
        self.ln_f = make_norm(config, "ln_f")
        head_std = 0.0 if config.zero_init_proj else INIT_STD
        self.lm_head = None if config.tie_embeddings else _dense(config.vocab_size, False, head_std, "lm_head")
        self(np.zeros((1, config.block_size), dtype=np.int32))  # creates every weight, so they can be loaded

    def call(self, idx: Any) -> Any:
        cfg = self.gpt_config
        T = idx.shape[1]
        x = self.wte(idx)  # (B, T, C)
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(ops.arange(T))
        else:
            cos, sin = (ops.convert_to_tensor(t) for t in rotary_tables(cfg.head_dim, T, cfg.rope_theta))
        for block in self.h:
            x = block(x, cos, sin)
        x = self.ln_f(x)
        if self.lm_head is None:  # tied: the output head is the token embedding
            logits = ops.matmul(x, ops.transpose(self.wte.embeddings))
        else:
            logits = self.lm_head(x)
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * ops.tanh(logits / cfg.logit_softcap)
        return logits

    @property
    def config(self) -> GPTConfig:
        return self.gpt_config


# ----------------------------------------------------------------------------------------------------------------
# weights in and out


def _variable(model: GPT, path: tuple[str | int, ...], kind: str) -> Any:
    layer: Any = model
    for part in path:
        layer = layer[part] if isinstance(part, int) else getattr(layer, part)
    if kind == "embedding":
        return layer.embeddings
    if isinstance(layer, layers.LayerNormalization):  # Keras names a LayerNorm's gain/shift gamma/beta
        return layer.gamma if kind == "scale" else layer.beta
    return getattr(layer, kind)  # Dense: kernel, bias; RMSNormalization: scale


def load_weights(model: GPT, weights: dict[str, Any]) -> None:
    """Copy nanophi weights (name -> torch tensor or numpy array, tied head stored once) into `model`."""
    tensors = to_port_tensors(weights)
    if len(tensors) != len(model.weights):
        raise UserError(f"{len(tensors)} tensors for a Keras model with {len(model.weights)} weights; "
                        "the weights do not belong to this config")
    for t in tensors:
        try:
            var = _variable(model, t.path, t.kind)
        except (AttributeError, IndexError, TypeError):
            raise UserError(f"the Keras model has no place for {t.name}; the weights do not match its config") from None
        if tuple(var.shape) != t.value.shape:
            raise UserError(f"{t.name}: shape {t.value.shape} in port layout, the Keras model has {tuple(var.shape)}")
        var.assign(t.value)


def to_nanophi(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under nanophi's names and layouts (tied head once), ready for `GPT.load_state_dict`."""
    out = {}
    for name, shape in nanophi_shapes(model.gpt_config).items():
        path, kind = port_location(name, len(shape))
        value = ops.convert_to_numpy(_variable(model, path, kind))
        out[name] = np.ascontiguousarray(value.T if kind == "kernel" else value)
    return out


def build(config: GPTConfig, weights: dict[str, Any]) -> GPT:
    """A model of `config` holding nanophi `weights`."""
    model = GPT(config)
    load_weights(model, weights)
    return model


def from_nanophi(ref: str | Path) -> tuple[GPT, GPTConfig, Any]:
    """A nanophi run directory or checkpoint -> (Keras model with its weights, GPTConfig, tokenizer)."""
    run = read_run(ref, PORT)
    return build(run.config, run.weights), run.config, run.tokenizer


# ----------------------------------------------------------------------------------------------------------------
# inference


def forward_fn(model: GPT) -> Any:
    """A numpy -> numpy logits function of `model` (through Keras' compiled predict function)."""
    return lambda idx: np.asarray(model.predict_on_batch(np.asarray(idx, dtype=np.int32)))


def logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    """(B, T) token ids -> (B, T, V) float32 logits, as numpy."""
    return forward_fn(model)(idx)


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (new tokens only), recomputing the cropped context every step."""
    return greedy_rows(forward_fn(model), [list(p) for p in prompts], max_new_tokens, model.gpt_config.block_size)


# ----------------------------------------------------------------------------------------------------------------
# training


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate of every step, precomputed with nanophi.optim.lr_multiplier (warmup, then cosine/wsd)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = np.asarray(table, dtype=np.float32)

    def __call__(self, step: Any) -> Any:
        last = len(self.table) - 1
        return ops.take(ops.convert_to_tensor(self.table), ops.minimum(ops.cast(step, "int32"), last))

    def get_config(self) -> dict[str, Any]:
        return {"table": self.table.tolist()}


def train_keras(
    data: Any = None,
    model: GPTConfig | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    train: Any = None,
    log_interval: int | None = None,
    jit_compile: bool | str = "auto",
) -> TrainHistory:
    """Train the Keras port on prepared data the way `nanophi train` trains the PyTorch model.

    `model.compile(optimizer=AdamW, loss=SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])`
    and `model.fit` over windows of the train memmap. Arguments as `nanophi.ports.jax.train_jax`: data is a
    `PreparedData`, a prepared directory or a corpus source; steps / batch_size / lr override `train`, a
    `nanophi.config.TrainConfig` that supplies the schedule, AdamW settings, grad clip, seed and eval batches.
    Keras logs one "epoch" per log interval. Same init and batches as PyTorch's trainer with the same seed.
    """
    recipe = resolve_recipe(data, model, steps, batch_size, lr, train, PORT)
    tc = recipe.train
    keras.utils.set_random_seed(tc.seed)
    net = build(recipe.model, nanophi_init(recipe.model, tc.seed))
    optimizer = keras.optimizers.AdamW(
        learning_rate=TableSchedule(recipe.lr_table), weight_decay=tc.weight_decay, beta_1=tc.beta1,
        beta_2=tc.beta2, epsilon=1e-8, global_clipnorm=tc.grad_clip if tc.grad_clip > 0 else None,
    )
    # weight decay on matrices and embeddings only, not on biases and norm gains (nanophi.optim.param_groups)
    optimizer.exclude_from_weight_decay(var_list=[v for v in net.trainable_variables if len(v.shape) < 2])
    net.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"], jit_compile=jit_compile)

    interval = min(log_interval or tc.log_interval, recipe.steps)
    history = TrainHistory("keras", config=recipe.model)
    batches = train_batches(recipe)
    timing = _StepTimer()
    t0 = time.perf_counter()
    done = 0
    while done < recipe.steps:
        # One fit() per log interval on that interval's batches, in order (shuffle=False): the windows and their
        # order are exactly nanophi's, which a generator or PyDataset would not guarantee (Keras prefetches them
        # out of order). The compiled train step is reused across calls.
        n = min(interval, recipe.steps - done)
        xs, ys = zip(*(next(batches) for _ in range(n)), strict=True)
        x, y = np.concatenate(xs), np.concatenate(ys)
        fitted = net.fit(x, y, batch_size=tc.batch_size, epochs=1, shuffle=False, verbose=0,
                         callbacks=[timing] if done == 0 else [])
        done += n
        history.record(done, float(fitted.history["loss"][-1]), float(fitted.history["accuracy"][-1]))
    history.train_time_s = time.perf_counter() - t0
    history.first_step_s = timing.first_step_s
    history.model = net
    history.set_eval(evaluate(forward_fn(net), recipe))
    return history


class _StepTimer(keras.callbacks.Callback):
    """Time of the first training step (tracing and compilation)."""

    def __init__(self) -> None:
        super().__init__()
        self.first_step_s = 0.0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch == 0:
            self.first_step_s = time.perf_counter() - self._t0
