"""Speed tooling: Muon, the MFU peak table and probe, and `nanophi bench train`. No test asserts on wall time."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from nanophi.cli import main
from nanophi.config import TrainConfig
from nanophi.mfu import peak_flops, table_peak
from nanophi.model import GPT, GPTConfig
from nanophi.muon import (NS_COEFFS, NS_STEPS, MuonAdamW, _gram_newton_schulz, build_muon, muon_param_groups,
                          orthogonalize)


def tiny_model(**kw: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, **kw))


# --- Muon ------------------------------------------------------------------------------------------------------
def _with_spectrum(n: int, low: float) -> torch.Tensor:
    """A square matrix whose singular values spread from `low` to 1 (a random square Gaussian has one near 0,
    which five Newton-Schulz steps cannot lift: Muon does not need them to)."""
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return u @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(low)).item(), n)) @ v.T


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("g", [_randn(96, 32), _randn(32, 128), _randn(3, 48, 16), _with_spectrum(64, 1e-2)],
                         ids=["tall", "wide", "batched", "square"])
def test_orthogonalize_gives_near_unit_singular_values(g: torch.Tensor) -> None:
    s = torch.linalg.svdvals(orthogonalize(g))
    # the quintic iteration trades exactness for speed: singular values land in about [0.7, 1.2]
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert orthogonalize(g).shape == g.shape


def test_gram_form_equals_the_direct_iteration() -> None:
    g = _randn(2, 40, 128)
    a, b, c = NS_COEFFS
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    gram = _gram_newton_schulz(x, NS_STEPS)
    for _ in range(NS_STEPS):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    assert torch.allclose(gram, x, atol=1e-5)


def test_muon_takes_hidden_matrices_only() -> None:
    model = tiny_model(tie_embeddings=False, bias=True)
    groups = muon_param_groups(model, TrainConfig(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= adam
    assert muon.isdisjoint(adam) and len(muon) + len(adam) == len(list(model.parameters()))
    assert all("base_lr" in g for g in groups)


def test_adamw_part_matches_torch_fused_adamw_exactly() -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonAdamW([{"params": ours, "lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}])
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    for _ in range(10):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


def _step(model: GPT, opt: torch.optim.Optimizer, seed: int) -> float:
    x = torch.randint(50, (4, 16), generator=torch.Generator().manual_seed(seed))
    _, loss = model(x, x.roll(-1, dims=1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_muon_state_dict_round_trips_exactly() -> None:
    cfg = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02)
    a = tiny_model()
    opt_a = build_muon(a, cfg)
    for i in range(3):
        _step(a, opt_a, i)
    b = tiny_model()
    b.load_state_dict(a.state_dict())
    opt_b = build_muon(b, cfg)
    buf = io.BytesIO()  # through bytes, as a checkpoint goes (a live state_dict shares its tensors)
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    assert [g["base_lr"] for g in opt_b.param_groups] == [g["base_lr"] for g in opt_a.param_groups]
    for i in range(3, 6):
        assert _step(a, opt_a, i) == _step(b, opt_b, i)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_muon_trains_a_tiny_model() -> None:
    model = tiny_model(zero_init_proj=True)
    opt = build_muon(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02))
    first = _step(model, opt, 0)
    for _ in range(40):
        last = _step(model, opt, 0)  # the same batch: Muon must be able to fit it
    assert last < 0.5 * first, (first, last)


# --- MFU -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "dtype", "tf32", "label", "tflops"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, "H100 SXM bf16", 989.4),
    ("NVIDIA H100 PCIe", torch.float16, False, "H100 PCIe fp16", 756.0),
    ("NVIDIA H200", torch.bfloat16, False, "H200 bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, "A100 tf32", 156.0),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, "A100 fp32", 19.5),
    ("NVIDIA A10G", torch.bfloat16, False, "A10G bf16", 70.0),
    ("NVIDIA L4", torch.bfloat16, False, "L4 bf16", 121.0),
    ("Tesla T4", torch.float16, False, "T4 fp16", 65.0),
    ("Tesla V100-SXM2-16GB", torch.float16, False, "V100 SXM2 fp16", 125.0),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, "RTX 4090 bf16", 165.2),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, False, "RTX 3090 bf16", 71.0),
])
def test_peak_table_lookup_by_device_name(name: str, dtype: torch.dtype, tf32: bool, label: str,
                                          tflops: float) -> None:
    assert table_peak(name, dtype, tf32) == (tflops * 1e12, label)


def test_peak_table_misses_fall_back() -> None:
    assert table_peak("Tesla T4", torch.bfloat16) is None  # Turing has no bf16 tensor cores
    assert table_peak("Some Future GPU", torch.bfloat16) is None


def test_cpu_peak_is_a_cached_measurement() -> None:
    flops, source = peak_flops("cpu", torch.float32)
    assert flops > 1e8 and source == "measured: 1024x1024 matmul probe, float32"
    assert peak_flops(torch.device("cpu"), torch.float32) == (flops, source)  # cached: same number


def test_flops_per_token_is_the_palm_formula() -> None:
    L, H, C, T, V = 2, 2, 32, 16, 50
    model = tiny_model()
    # tied embedding counted once; per block 12*C^2 matmul weights + two norm gains; the final norm; no wpe
    n = V * C + L * (12 * C * C + 2 * C) + C
    assert model.num_params() == n
    assert model.flops_per_token() == 6 * n + 12 * L * H * (C // H) * T


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_comes_from_the_table_or_a_probe() -> None:
    flops, source = peak_flops(torch.device("cuda"), torch.bfloat16)
    assert flops > 1e12 and source.startswith(("table: ", "measured: "))


# --- bench -----------------------------------------------------------------------------------------------------
def test_bench_train_prints_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    code = main(["bench", "train", "--data", str(corpus), "--tokenizer", "char", "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--iters", "3", "--warmup", "1",
                 "--device", "cpu", "--optimizer", "muon", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tokens_per_s", "ms_per_iter", "mfu", "peak_flops", "peak_source", "flops_per_token", "device",
                "dtype", "compile", "iters", "warmup"):
        assert key in out, key
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] and out["iters"] == 3 and out["optimizer"] == "muon"
    assert out["peak_source"].startswith("measured: ")


def test_bench_generate_cli_takes_int8_and_prices_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NANOPHI_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--n-layer", "1", "--n-head", "2",
                 "--n-embd", "32", "--block-size", "16", "--max-iters", "2", "--dashboard", "off",
                 "--tokenizer", "bpe", "--vocab-size", "300"]) == 0
    capsys.readouterr()
    assert main(["bench", "generate", "--model", str(tmp_path / "run"), "--batch-size", "2", "--new-tokens", "4",
                 "--prompt-tokens", "4", "--repeats", "1", "--quantize", "int8", "--quality", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["quantize"] == "int8" and out["decode_tok_s"] > 0 and out["batch_size"] == 2
    # a barely trained model: both losses near ln(300) = 5.7, and int8 is close to fp32
    assert 0 < out["fp32_loss"] < 10 and abs(out["loss_vs_fp32"]) < 0.2


def test_bench_without_a_target_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench"]) == 2
    assert "nanophi bench train|prepare|generate" in capsys.readouterr().err


# --- CPU precision -----------------------------------------------------------------------------------------------
def test_auto_dtype_on_cpu_is_bf16_exactly_when_amx_is_there() -> None:
    from nanophi.device import cpu_has_amx_bf16, pick_dtype

    expected = torch.bfloat16 if cpu_has_amx_bf16() else torch.float32
    assert pick_dtype("auto", torch.device("cpu")) == expected
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_cpu_autocast_runs_differentiated_attention_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the model's attention gets fp32 inputs when a backward follows, bf16 ones otherwise."""
    from nanophi.device import autocast
    from nanophi.model import GPT, GPTConfig

    real = torch.nn.functional.scaled_dot_product_attention
    seen: list[torch.dtype] = []

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(q.dtype)
        return real(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    x = torch.randint(0, 11, (2, 8))
    _, ref = model(x, x)
    seen.clear()
    with autocast(torch.device("cpu"), torch.bfloat16):
        _, loss = model(x, x)
    assert seen == [torch.float32, torch.float32]
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - ref.item()) < 5e-2
    seen.clear()
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        model(x)  # no backward follows: left to bf16 flash attention
    assert seen == [torch.bfloat16, torch.bfloat16]
