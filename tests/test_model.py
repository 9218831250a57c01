"""Model invariants: shapes, loss at init, learning one batch, KV-cache parity, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from nanophi.engine import Engine
from nanophi.errors import UserError
from nanophi.kv_cache import KVCache
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.sampling import sample_logits

V = 61


def tiny(preset: str = "gpt2", **kw) -> GPT:
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=V) | PRESETS[preset] | kw
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


PRESET_VARIANTS = [
    ("gpt2", {}),
    ("llama", {"n_kv_head": 2}),
    ("llama", {"mlp": "relu2", "qk_norm": True, "tie_embeddings": False, "zero_init_proj": True}),
]


@pytest.mark.parametrize("preset,kw", PRESET_VARIANTS)
def test_shapes(preset: str, kw: dict) -> None:
    m = tiny(preset, **kw)
    x = torch.randint(0, V, (3, 16))
    logits, loss = m(x, x)
    assert logits.shape == (3, 16, V) and loss.shape == ()
    logits, loss = m(x)
    assert logits.shape == (3, 1, V) and loss is None  # sampling needs only the last position
    assert m(x, all_logits=True)[0].shape == (3, 16, V)


@pytest.mark.parametrize("preset,kw", PRESET_VARIANTS[:2])
def test_loss_at_init_is_ln_vocab(preset: str, kw: dict) -> None:
    m = tiny(preset, **kw)
    x, y = torch.randint(0, V, (8, 16)), torch.randint(0, V, (8, 16))
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(V)) < 0.1


@pytest.mark.parametrize("preset,kw", PRESET_VARIANTS)
def test_overfits_one_batch(preset: str, kw: dict) -> None:
    m = tiny(preset, **kw)
    x, y = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_tied_embeddings_share_storage_and_count_once() -> None:
    m = tiny("gpt2")
    assert m.lm_head.weight is m.transformer.wte.weight
    untied = tiny("gpt2", tie_embeddings=False)
    assert untied.num_params() - m.num_params() == V * 32


def test_flops_per_token_formula() -> None:
    m = tiny("gpt2")
    cfg = m.config
    assert m.flops_per_token() == 6 * m.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


@pytest.mark.parametrize("preset,kw", PRESET_VARIANTS)
def test_kv_cache_logits_match_full_forward(preset: str, kw: dict) -> None:
    m = tiny(preset, **kw).eval()
    x = torch.randint(0, V, (2, 12))
    full, _ = m(x, all_logits=True)
    cache = KVCache(2, 2, m.config.n_kv_head, m.config.head_dim, 16)
    parts = [m(x[:, :5], cache=cache, all_logits=True)[0]]
    for t in range(5, 12):  # then one token at a time, as decoding does
        parts.append(m(x[:, t : t + 1], cache=cache, all_logits=True)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


class IdTokenizer:
    """Token ids as text, for engine tests that don't need a real tokenizer."""

    eot_id = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return "".join(f" {i}" for i in ids)


@pytest.mark.parametrize("preset,kw", PRESET_VARIANTS)
def test_greedy_with_and_without_cache_agree(preset: str, kw: dict) -> None:
    m = tiny(preset, **kw)
    engine = Engine(m, IdTokenizer())
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [5]]  # different lengths share one left-padded batch
    # 12 new tokens pass block_size for the longest prompt: the cached path must refill its context
    for n in (8, 12):
        cached = engine.generate_ids(prompts, n, temperature=0)
        uncached = engine.generate_ids(prompts, n, temperature=0, use_cache=False)
        if n == 8:
            assert cached == uncached
        assert all(len(r) == n for r in cached)


def test_batched_generation_equals_one_by_one() -> None:
    m = tiny("llama", n_kv_head=2)
    engine = Engine(m, IdTokenizer())
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    together = engine.generate_ids(prompts, 6, temperature=0)
    alone = [engine.generate_ids([p], 6, temperature=0)[0] for p in prompts]
    assert together == alone


def test_sampling_controls() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    assert sample_logits(logits, 0, None, None, None).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, 1.0, 2, None, g).item() for _ in range(200)}
    assert draws == {2, 3}  # top-k 2 keeps the two best
    draws = {sample_logits(logits, 1.0, None, 0.5, g).item() for _ in range(200)}
    assert draws == {2}  # token 2 alone holds > 50% of the mass


def test_stop_strings_and_streaming() -> None:
    m = tiny("gpt2")
    engine = Engine(m, IdTokenizer())
    full = engine.generate(["1 2 3"], 10, temperature=0)[0]
    stop = full.split()[3]  # the 4th generated id, as text
    pieces: list[str] = []
    out = engine.generate(["1 2 3"], 10, temperature=0, stop=[f" {stop} "], on_text=lambda i, d: pieces.append(d))[0]
    assert f" {stop} " not in out and full.startswith(out)
    assert "".join(pieces) == out


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
        (dict(mlp="tanh"), "mlp must be one of"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_config_is_a_user_error(kw: dict, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        GPTConfig(**(dict(n_layer=1, n_head=4, n_embd=32, block_size=8, vocab_size=10) | kw))
