"""nanophi's GPT in JAX with Flax NNX, module for module, and a jitted optax training loop.

    model, config, tokenizer = from_nanophi("runs/tiny")     # a nanophi run's weights, in Flax
    logits(model, ids)                                      # (B, T, V), PyTorch's logits within 1e-4 in fp32
    generate(model, [tokenizer.encode("def ")], 50)         # greedy: PyTorch's tokens
    history = train_jax(prepared_dir, config, steps=500)    # same data, batches, init and schedule as nanophi train

Names follow the PyTorch module (`wte`, `h[i].attn.c_attn`, `mlp.c_fc`, `ln_f`); Flax keeps Linear kernels as
(in, out), so conversion transposes them (see `nanophi.ports.to_port_tensors`). Needs `pip install -e .[jax]`.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nanophi.errors import UserError
from nanophi.model import GPTConfig
from nanophi.ports import (
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

PORT = "JAX"
INIT_STD = 0.02  # GPT-2's init, as nanophi.model.GPT.init_weights
# Full-fp32 matmuls. On CPU that is the default anyway; on GPUs and TPUs JAX's default precision runs matmuls in
# bf16/TF32 passes, which is ~1e-3 relative error, far from PyTorch's fp32 logits.
PRECISION = jax.lax.Precision.HIGHEST
ATTRS = {"embedding": "embedding", "kernel": "kernel", "scale": "scale", "bias": "bias"}  # PortTensor.kind -> Flax


def _normal(std: float) -> Any:
    return nnx.initializers.normal(std) if std > 0 else nnx.initializers.zeros


def _linear(n_in: int, n_out: int, bias: bool, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, precision=PRECISION, kernel_init=_normal(std), rngs=rngs)


def _proj_std(config: GPTConfig) -> float:
    # residual output projections: scaled so the residual stream's variance doesn't grow with depth (or zero)
    return 0.0 if config.zero_init_proj else INIT_STD / math.sqrt(2 * config.n_layer)


def make_norm(config: GPTConfig, ndim: int, rngs: nnx.Rngs, rms: bool = False) -> nnx.Module:
    # use_fast_variance=False: E[(x - mean)^2] and E[x^2] as PyTorch computes them, not E[x^2] - mean^2
    if rms or config.norm == "rmsnorm":
        return nnx.RMSNorm(ndim, epsilon=config.norm_eps, use_fast_variance=False, rngs=rngs)
    return nnx.LayerNorm(ndim, epsilon=config.norm_eps, use_bias=config.bias, use_fast_variance=False, rngs=rngs)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: (B, T, nh, hs); cos, sin: (T, hs/2)."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs) -> None:
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim  # [q; k; v], k/v narrower with GQA
        self.c_attn = _linear(config.n_embd, width, config.bias, INIT_STD, rngs)
        self.c_proj = _linear(config.n_embd, config.n_embd, config.bias, _proj_std(config), rngs)
        # QK-norm is an RMSNorm over each head, whatever the blocks' norm is
        self.q_norm = make_norm(config, self.head_dim, rngs, rms=True) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim, rngs, rms=True) if config.qk_norm else None

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = jnp.split(self.c_attn(x), [nh * hs, (nh + nkv) * hs], axis=-1)
        q = q.reshape(B, T, nh, hs)  # (B, T, nh, hs): Flax keeps heads after time, no transpose needed
        k, v = k.reshape(B, T, nkv, hs), v.reshape(B, T, nkv, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if nkv != nh:  # each k/v head serves nh // nkv consecutive query heads (PyTorch's repeat_interleave)
            k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=PRECISION) / math.sqrt(hs)  # (B, nh, T, T)
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        att = jax.nn.softmax(jnp.where(causal, att, -jnp.inf), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v, precision=PRECISION).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs) -> None:
        self.kind = config.mlp
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections share one matrix, [gate; up], as in the PyTorch module
        self.c_fc = _linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, config.bias,
                            INIT_STD, rngs)
        self.c_proj = _linear(hidden, config.n_embd, config.bias, _proj_std(config), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * up
        elif self.kind == "relu2":
            h = jnp.square(jax.nn.relu(h))
        else:
            h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh approximation
        return self.c_proj(h)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, rngs: nnx.Rngs) -> None:
        self.ln_1 = make_norm(config, config.n_embd, rngs)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = make_norm(config, config.n_embd, rngs)
        self.mlp = MLP(config, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    """idx (B, T) int -> logits (B, T, V), every position (a loss or a sampler picks what it needs)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        check_supported(config, PORT)
        # Kept as a tuple of items: the module's static part must hash (it keys jax.jit's cache); GPTConfig does not.
        self.config_items = tuple(sorted(config.to_dict().items()))
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=_normal(INIT_STD), rngs=rngs)
        self.wpe = (nnx.Embed(config.block_size, config.n_embd, embedding_init=_normal(INIT_STD), rngs=rngs)
                    if config.pos == "learned" else None)
        self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config, config.n_embd, rngs)
        head_std = 0.0 if config.zero_init_proj else INIT_STD
        self.lm_head = (None if config.tie_embeddings
                        else _linear(config.n_embd, config.vocab_size, False, head_std, rngs))

    @property
    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(dict(self.config_items))

    def __call__(self, idx: jax.Array) -> jax.Array:
        cfg = self.config
        B, T = idx.shape
        assert T <= cfg.block_size, f"sequence of {T} tokens > block_size {cfg.block_size}"
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(jnp.arange(T))
        else:
            cos, sin = rotary_tables(cfg.head_dim, T, cfg.rope_theta)  # numpy: constants in the jitted graph
            rope = (jnp.asarray(cos), jnp.asarray(sin))
        for block in self.h:
            x = block(x, rope)
        x = self.ln_f(x)
        if self.lm_head is None:  # tied: the output head is the token embedding
            logits = jnp.einsum("btc,vc->btv", x, self.wte.embedding[...], precision=PRECISION)
        else:
            logits = self.lm_head(x)
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return logits


# ----------------------------------------------------------------------------------------------------------------
# weights in and out


def _module_at(model: GPT, path: tuple[str | int, ...]) -> Any:
    module: Any = model
    for part in path:
        module = module[part] if isinstance(part, int) else getattr(module, part)
    return module


def load_weights(model: GPT, weights: dict[str, Any]) -> None:
    """Copy nanophi weights (name -> torch tensor or numpy array, tied head stored once) into `model`."""
    tensors = to_port_tensors(weights)
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    if len(tensors) != n_params:
        raise UserError(f"{len(tensors)} tensors for a JAX model with {n_params} parameters; "
                        "the weights do not belong to this config")
    for t in tensors:
        try:
            var = getattr(_module_at(model, t.path), ATTRS[t.kind])
        except (AttributeError, IndexError, TypeError):
            raise UserError(f"the JAX model has no place for {t.name}; the weights do not match its config") from None
        if tuple(var.shape) != t.value.shape:
            raise UserError(f"{t.name}: shape {t.value.shape} in port layout, the JAX model has {tuple(var.shape)}")
        var.set_value(jnp.asarray(t.value))  # replaces the value, so an abstract model (see `build`) fills in too


def to_nanophi(model: GPT) -> dict[str, np.ndarray]:
    """The model's weights under nanophi's names and layouts (tied head once), ready for `GPT.load_state_dict`."""
    out = {}
    for name, shape in nanophi_shapes(model.config).items():
        path, kind = port_location(name, len(shape))
        value = np.asarray(getattr(_module_at(model, path), ATTRS[kind])[...])
        out[name] = np.ascontiguousarray(value.T if kind == "kernel" else value)
    return out


def build(config: GPTConfig, weights: dict[str, Any]) -> GPT:
    """A model of `config` holding nanophi `weights`. The model is first built abstractly (shapes only): running
    Flax's random initialisers eagerly would compile one small XLA program per parameter, seconds for nothing."""
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    load_weights(model, weights)
    return model


def from_nanophi(ref: str | Path) -> tuple[GPT, GPTConfig, Any]:
    """A nanophi run directory or checkpoint -> (Flax model with its weights, GPTConfig, tokenizer)."""
    run = read_run(ref, PORT)
    return build(run.config, run.weights), run.config, run.tokenizer


# ----------------------------------------------------------------------------------------------------------------
# inference


@partial(jax.jit, static_argnums=0)
def _apply(graphdef: Any, state: Any, idx: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(idx)


def forward_fn(model: GPT) -> Any:
    """A numpy -> numpy logits function of `model`'s current weights. The model is split into its (static)
    structure and its arrays once, so each call is one compiled XLA call without walking the module graph."""
    graphdef, state = nnx.split(model)
    return lambda idx: np.asarray(_apply(graphdef, state, jnp.asarray(idx, dtype=jnp.int32)))


def logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    """(B, T) token ids -> (B, T, V) float32 logits, as numpy."""
    return forward_fn(model)(idx)


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt (new tokens only), recomputing the cropped context every step."""
    return greedy_rows(forward_fn(model), [list(p) for p in prompts], max_new_tokens, model.config.block_size)


# ----------------------------------------------------------------------------------------------------------------
# training


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only, not on biases and norm gains (nanophi.optim.param_groups)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _train_step(graphdef: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array, jax.Array]:
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(m: GPT) -> tuple[jax.Array, jax.Array]:
        out = m(x)
        return cross_entropy(out, y), out

    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    accuracy = jnp.mean(jnp.argmax(out, axis=-1) == y)
    return nnx.state((model, optimizer)), loss, accuracy


def train_jax(
    data: Any = None,
    model: GPTConfig | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    train: Any = None,
    log_interval: int | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> TrainHistory:
    """Train the Flax port on prepared data the way `nanophi train` trains the PyTorch model.

    data: a `PreparedData`, a prepared directory, or a corpus for `nanophi.prepare.prepare` (None: the CPython
    docs, char tokenizer). model: the shape (default: `nanophi train`'s; vocab_size comes from the data).
    steps / batch_size / lr override `train`, a `nanophi.config.TrainConfig` that supplies the rest of the recipe
    (warmup + cosine schedule, AdamW betas and weight decay on matrices, grad clip, seed, eval batches).

    The model starts from the weights `nanophi train` would draw with the same seed and sees the same batches in
    the same order, so the final val loss differs from PyTorch's only by the frameworks' numerics. Returns the
    per-interval train loss and accuracy, the val loss/accuracy/bits-per-byte over the val split, and the model.

    compiler_options go to `jax.jit` for the train step: {"xla_backend_optimization_level": 0} halves its
    compilation on CPU and makes each step ~2.5x slower, a good trade for runs of a few dozen steps.
    """
    recipe = resolve_recipe(data, model, steps, batch_size, lr, train, PORT)
    tc = recipe.train
    net = build(recipe.model, nanophi_init(recipe.model, tc.seed))
    table = jnp.asarray(recipe.lr_table)

    def schedule(count: jax.Array) -> jax.Array:
        return table[jnp.minimum(count, table.shape[0] - 1)]  # the exact per-step lr PyTorch's trainer sets

    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=tc.beta1, b2=tc.beta2, eps=1e-8, weight_decay=tc.weight_decay, mask=_decay_mask),
    )
    optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
    # split once and jit a pure function of the state: cheaper per step than nnx.jit's graph traversal
    graphdef, state = nnx.split((net, optimizer))
    step_fn = jax.jit(partial(_train_step, graphdef), donate_argnums=0, compiler_options=compiler_options)

    history = TrainHistory("jax", config=recipe.model)
    interval = log_interval or tc.log_interval
    losses: list[jax.Array] = []
    accs: list[jax.Array] = []
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(train_batches(recipe)):
        state, loss, acc = step_fn(state, x, y)
        losses.append(loss)  # device scalars: read back once per interval so steps are dispatched ahead
        accs.append(acc)
        if i == 0:
            jax.block_until_ready(loss)
            history.first_step_s = time.perf_counter() - t0  # mostly compilation
        if (i + 1) % interval == 0 or i + 1 == recipe.steps:
            history.record(i + 1, float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(accs))))
            losses, accs = [], []
    jax.block_until_ready(state)
    history.train_time_s = time.perf_counter() - t0
    nnx.update((net, optimizer), state)
    history.model = net
    history.set_eval(evaluate(forward_fn(net), recipe))
    return history
