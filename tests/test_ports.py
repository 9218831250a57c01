"""The JAX and Keras ports against PyTorch: same logits, same greedy tokens, same training run.

A tiny nanophi run is saved with `nanophi.checkpoint.save` (weights scaled up from the init so logits spread out
and greedy decoding has no near-ties), then loaded into each port through the production conversion code.
Training starts every framework from the same init and batches, so the val losses agree to a few decimals.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanophi import checkpoint
from nanophi.cli import main
from nanophi.config import resolve
from nanophi.errors import UserError
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.ports import check_trainable, to_port_tensors

TOLERANCE = 1e-4
WEIGHT_SCALE = 4.0  # init std 0.02 gives near-uniform logits, whose argmax fp32 rounding could flip
CORPUS = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(300))
BACKENDS = {"jax": ("flax", "nanophi.ports.jax"), "tf": ("keras", "nanophi.ports.keras")}
TRAIN = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8, lr=3e-3, max_iters=12, warmup_iters=2,
             log_interval=3, eval_interval=12, eval_iters=4, eval_batch_size=16, dashboard="off")
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Beyond the gpt2 preset: Llama blocks (RoPE, RMSNorm, SwiGLU) with GQA, plus QK-norm, an untied head and soft-cap
# in the default suite; the remaining switches (ReLU², LayerNorm without bias, one k/v head) under slow.
VARIANTS = {
    "llama": dict(PRESETS["llama"], n_kv_head=2, qk_norm=True, tie_embeddings=False, logit_softcap=10.0),
    "others": dict(PRESETS["gpt2"], mlp="relu2", bias=False, n_kv_head=1),
}
SLOW_VARIANTS = {"others"}


def port(backend: str):
    framework, module = BACKENDS[backend]
    pytest.importorskip(framework)
    if backend == "tf":
        pytest.importorskip("tensorflow")
    return __import__(module, fromlist=["_"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ports")


@pytest.fixture(scope="module")
def prepared(workdir: Path, monkeypatch_module: pytest.MonkeyPatch):
    from nanophi.prepare import prepare

    corpus = workdir / "corpus.txt"
    corpus.write_text(CORPUS)
    return prepare(str(corpus), out_dir=workdir / "prepared")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _cache(workdir: Path, monkeypatch_module: pytest.MonkeyPatch) -> None:
    monkeypatch_module.setenv("NANOPHI_CACHE", str(workdir / "cache"))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These models are tiny: a second PyTorch thread only spin-waits, taking a core from XLA's and TF's compilers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_run(run_dir: Path, config: GPTConfig, prepared, seed: int = 0) -> GPT:
    """A randomly initialised nanophi run with widened weights, pointing at `prepared` as its data."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(WEIGHT_SCALE)
    tok_dir = run_dir.parent / f"{run_dir.name}-tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    prepared.tokenizer.save(tok_dir)
    state = {"best_val": None, "data_dir": str(prepared.dir), "data_sha256": prepared.meta["sha256"]}
    config_json = {"model": config.to_dict(), "train": {}, "data": {}}
    checkpoint.save(run_dir, 1, model, config_json, state, None, tok_dir, links=("last", "best"))
    return model


@pytest.fixture(scope="module")
def gpt2_run(workdir: Path, prepared) -> Path:
    config = GPTConfig(**PRESETS["gpt2"], n_layer=2, n_head=2, n_embd=32, block_size=16,
                       vocab_size=prepared.vocab_size)
    save_run(workdir / "gpt2", config, prepared)
    return workdir / "gpt2"


@pytest.fixture(scope="module")
def torch_training(workdir: Path, prepared) -> float:
    """Val loss of `nanophi train` (PyTorch) at the TRAIN settings."""
    from nanophi.train import train

    cfg = resolve({**TRAIN, "data": str(workdir / "corpus.txt"), "out": str(workdir / "torch-run")})
    return train(cfg)["best_val_loss"]


# ----------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_parity_cli_gpt2(backend: str, gpt2_run: Path, capsys: pytest.CaptureFixture) -> None:
    port(backend)
    rc = main(["parity", str(gpt2_run), "--backend", backend, "--json", "--new-tokens", "24"])
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] <= TOLERANCE, result
    assert result["greedy_match"] and result["greedy_tokens"] == 4 * 24, result
    assert result["batch_source"] == "val" and result["ok"] and rc == 0


@pytest.mark.parametrize("variant", [v if v not in SLOW_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
                                     for v in sorted(VARIANTS)])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_parity_switches(backend: str, variant: str, workdir: Path, prepared) -> None:
    """The other switches, through the Python API: from_nanophi, logits, generate, to_nanophi."""
    from nanophi.engine import Engine

    p = port(backend)
    config = GPTConfig(**VARIANTS[variant], n_layer=2, n_head=4, n_embd=32, block_size=12,
                       vocab_size=prepared.vocab_size)
    torch_model = save_run(workdir / f"{variant}-{backend}", config, prepared, seed=1)
    model, loaded_config, tokenizer = p.from_nanophi(workdir / f"{variant}-{backend}")
    assert loaded_config == config and tokenizer.vocab_size == prepared.vocab_size
    # two rows of block_size: the shape greedy decoding below runs too, so the port compiles once
    x = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch_model(x, all_logits=True)[0].numpy()
    assert np.abs(p.logits(model, x.numpy()) - want).max() <= TOLERANCE
    # prompts of different lengths, and more new tokens than block_size: the context is cropped
    prompts = [[1, 2, 3], [4]]
    torch_ids = Engine(torch_model, tokenizer).generate_ids(prompts, 20, temperature=0, use_cache=False)
    assert p.generate(model, prompts, 20) == torch_ids
    back = p.to_nanophi(model)
    assert all(np.array_equal(back[k], v.numpy()) for k, v in checkpoint.model_state_dict(torch_model).items())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_mismatched_weights_are_a_user_error(backend: str, prepared) -> None:
    p = port(backend)
    small = GPTConfig(**PRESETS["gpt2"], n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    big = GPTConfig(**PRESETS["gpt2"], n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=11)
    with pytest.raises(UserError, match="shape"):
        p.build(small, checkpoint.model_state_dict(GPT(big)))


# ----------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_training_matches_pytorch(backend: str, workdir: Path, prepared, torch_training: float) -> None:
    p = port(backend)
    cfg = resolve({**TRAIN, "out": str(workdir / "unused")})
    if backend == "jax":  # a 12-step run: halve the train step's compilation, at the cost of slower steps
        history = p.train_jax(prepared.dir, cfg.model, train=cfg.train, compiler_options=FAST_COMPILE)
    else:
        history = p.train_keras(prepared.dir, cfg.model, train=cfg.train)
    assert history.step == [3, 6, 9, 12]
    assert history.loss[-1] < history.loss[0] - 0.3, history.loss
    assert 0.0 <= history.accuracy[0] < history.accuracy[-1] <= 1.0
    # same init, same batches, same schedule: only the frameworks' fp32 rounding differs
    assert math.isclose(history.val_loss, torch_training, abs_tol=2e-3), (history.val_loss, torch_training)
    assert history.val_loss < math.log(prepared.vocab_size)


def test_training_refuses_dropout() -> None:
    with pytest.raises(UserError, match="dropout"):
        check_trainable(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=5, dropout=0.1), "JAX")


def test_port_tensor_layout() -> None:
    """Linear weights transpose to (in, out); embeddings and norm vectors keep their layout; the tied head is absent."""
    model = GPT(GPTConfig(**PRESETS["gpt2"], n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=5))
    tensors = {t.name: t for t in to_port_tensors(checkpoint.model_state_dict(model))}
    attn = tensors["transformer.h.0.attn.c_attn.weight"]
    assert attn.path == ("h", 0, "attn", "c_attn") and attn.kind == "kernel" and attn.value.shape == (8, 24)
    assert tensors["transformer.wte.weight"].kind == "embedding"
    assert tensors["transformer.ln_f.weight"].kind == "scale" and tensors["transformer.ln_f.bias"].kind == "bias"
    assert "lm_head.weight" not in tensors


def test_core_imports_without_frameworks() -> None:
    code = ("import sys, nanophi.ports, nanophi.ports.parity, nanophi.cli; nanophi.cli.build_parser(['parity']); "
            "print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_framework_is_a_user_error(gpt2_run: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax` fail as if it were not installed
    monkeypatch.delitem(sys.modules, "nanophi.ports.jax", raising=False)
    assert main(["parity", str(gpt2_run), "--backend", "jax"]) == 2
    assert "pip install -e '.[jax]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the notebooks' recorded runs (docs/ports_results.json, written from notebooks 03 and 04 at full settings)

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOK_RUNS = ("03_gpt_in_keras", "04_gpt_in_jax")


def test_notebook_results_are_recorded_and_quoted() -> None:
    """Each notebook's full run learned (val loss well below a uniform guess), its port matched PyTorch, and
    docs/ports.md quotes the recorded numbers rather than its own."""
    results = json.loads((DOCS / "ports_results.json").read_text(encoding="utf-8"))
    doc = (DOCS / "ports.md").read_text(encoding="utf-8")
    for name in NOTEBOOK_RUNS:
        r = results[name]
        m = r["model"]
        assert not r["smoke"] and (m["n_layer"], m["n_head"], m["n_embd"], m["block_size"]) == (4, 4, 128, 64), name
        assert r["val_loss"] < math.log(r["vocab_size"]) - 2.0 and 0.3 < r["val_accuracy"] < 1.0, name
        parity = r["parity"]
        assert parity["max_abs_diff"] <= TOLERANCE and parity["greedy_match"] and parity["greedy_tokens"] > 0, name
        for number in (f"{r['val_loss']:.3f}", f"{r['val_accuracy']:.3f}", f"{parity['max_abs_diff']:.1e}"):
            assert number in doc, f"docs/ports.md should quote {name}'s {number} from ports_results.json"
