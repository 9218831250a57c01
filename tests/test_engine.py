"""The generation engine: batching, per-row budgets, early-finishing rows, bf16, streaming, chat templates, and
the `sample`/`chat` commands end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanophi import checkpoint
from nanophi.bench_decode import bench_generate
from nanophi.chat_template import PLAIN_TEMPLATE, apply_chat_template
from nanophi.cli import main
from nanophi.engine import Engine, TextStream
from nanophi.errors import UserError
from nanophi.model import GPT, PRESETS, GPTConfig
from nanophi.quantize import QuantLinear, quantize_q4
from nanophi.sampling import apply_repetition_penalty
from nanophi.tokenizer import BPETokenizer, CharTokenizer, HFTokenizer

TEXT = "It was the best of small models, it was the worst of small models.\nThe loss went down.\n" * 6
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny(vocab: int, preset: str = "llama", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=vocab) | PRESETS[preset] | kw
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():  # larger weights than the init: varied, input-dependent greedy continuations
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train([TEXT + "".join(chr(c) for c in range(32, 127))])


@pytest.fixture(scope="module")
def chat_tok() -> HFTokenizer:
    bpe = BPETokenizer.train([TEXT], vocab_size=300)
    rust = bpe.tokenizer
    from tokenizers import AddedToken

    rust.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return HFTokenizer(rust, chat_template=TEMPLATE, bos_id=rust.token_to_id("<|im_start|>"),
                       eos_id=rust.token_to_id("<|im_end|>"))


def test_ragged_batch_equals_one_by_one_with_per_row_budgets(char: CharTokenizer) -> None:
    engine = Engine(tiny(char.vocab_size, n_kv_head=2), char)
    prompts = [char.encode(p) for p in ("It was", "The loss went down.\nIt", "s", "worst of small")]
    budgets = [5, 20, 12, 1]
    together = engine.generate_ids(prompts, budgets, temperature=0)
    alone = [engine.generate_ids([p], b, temperature=0)[0] for p, b in zip(prompts, budgets)]
    assert together == alone and [len(r) for r in together] == budgets
    assert together == engine.generate_ids(prompts, budgets, temperature=0, use_cache=False)


def test_repetition_penalty_is_hugging_faces(char: CharTokenizer) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits, ids = torch.randn(3, 40), torch.randint(0, 40, (3, 7))
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)
    # in the engine: the cached batch (ragged budgets, rows dropped as they finish) equals nanoGPT's loop
    engine = Engine(tiny(char.vocab_size), char)
    prompts = [char.encode(p) for p in ("It was", "The loss went down.\nIt", "s", "worst of small")]
    budgets = [5, 20, 12, 1]
    penalized = engine.generate_ids(prompts, budgets, temperature=0, repetition_penalty=1.5)
    assert penalized == engine.generate_ids(prompts, budgets, temperature=0, repetition_penalty=1.5, use_cache=False)
    assert penalized != engine.generate_ids(prompts, budgets, temperature=0)
    with pytest.raises(UserError, match="repetition_penalty"):
        engine.generate_ids(prompts, 4, repetition_penalty=0)


def test_rows_that_stop_early_are_dropped_without_changing_the_others(char: CharTokenizer) -> None:
    engine = Engine(tiny(char.vocab_size), char)
    prompts = [char.encode(p) for p in ("It was", "The loss", "small models", "best", "went", "w")]
    free = engine.generate_ids(prompts, 16, temperature=0)
    stop = {free[0][2], free[3][1]}  # tokens that end some rows early
    stopped = engine.generate_ids(prompts, 16, temperature=0, stop_ids=stop)
    for row, full in zip(stopped, free):
        cut = next((k for k, t in enumerate(full) if t in stop), len(full))
        assert row == full[:cut]
    assert stopped == engine.generate_ids(prompts, 16, temperature=0, stop_ids=stop, use_cache=False)


def test_generation_runs_past_the_context(char: CharTokenizer) -> None:
    engine = Engine(tiny(char.vocab_size, preset="gpt2"), char)
    out = engine.generate_ids([char.encode("It was the best of")], 100, temperature=0)[0]
    assert len(out) == 100  # block_size is 48: the cache refilled from the last half-context


def test_seeded_sampling_is_reproducible(char: CharTokenizer) -> None:
    engine = Engine(tiny(char.vocab_size), char)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, seed=123)
    a = engine.generate(["It was", "The"], 20, **kw)
    assert a == engine.generate(["It was", "The"], 20, **kw)
    assert a != engine.generate(["It was", "The"], 20, **(kw | {"seed": 124}))


def test_bf16_engine_leaves_the_model_alone(char: CharTokenizer) -> None:
    model = tiny(char.vocab_size)
    engine = Engine(model, char, dtype=torch.bfloat16)
    out = engine.generate_ids([char.encode("It was")], 10, temperature=0)[0]
    assert len(out) == 10
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    assert engine.model.transformer.wte.weight.dtype == torch.float32  # the residual stream stays fp32


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_engine_quantizes_a_copy(char: CharTokenizer, quantize: str) -> None:
    model = tiny(char.vocab_size, n_embd=64)  # int4 packs whole groups of 32 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, char, quantize=quantize)
    out = engine.generate_ids([char.encode("It was"), char.encode("The")], 10, temperature=0)
    assert [len(r) for r in out] == [10, 10]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear
    if quantize == "int4":
        bits = {m.bits for name, m in engine.model.named_modules() if isinstance(m, QuantLinear) and name != "lm_head"}
        assert bits == {4} and engine.model.lm_head.bits == 8  # the head is the embedding, kept at 8 bits
    else:
        assert type(engine.model.transformer.h[0].attn.c_attn).__name__ == "Linear"  # fbgemm's dynamic one
        assert type(engine.model.transformer.h[0].attn.c_attn) is not torch.nn.Linear
    if quantize == "int8":  # prompts are read by the model itself in fp32: per-call activation scales hurt there
        assert engine.prefill_model is model
        _, last = engine._prefill([char.encode("It was the best")], 24)
        torch.testing.assert_close(last, model(torch.tensor([char.encode("It was the best")]))[0][:, -1])
    with torch.no_grad():  # the quantized logits track the fp32 ones; 4 bits of random weights lose more
        x = torch.tensor([char.encode("It was the best")])
        ref, q = model(x)[0], engine.model(x)[0]
    assert torch.corrcoef(torch.stack([ref.flatten(), q.flatten()]))[0, 1] > (0.99 if quantize == "int8" else 0.9)


def test_int4_reproduces_q4_1_codes_exactly(char: CharTokenizer) -> None:
    """Weights dequantized from a Q4_1 GGUF (SmolLM2's) re-quantize to the file's own codes and scales."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = torch.randn(48, 96).numpy()
    q41 = torch.from_numpy(dequantize(quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1))
    codes, scale, lo = quantize_q4(q41)
    again = (codes.view(48, 3, 32) * scale[..., None] + lo[..., None]).view(48, 96)
    assert codes.min() >= 0 and codes.max() <= 15
    torch.testing.assert_close(again, q41.float(), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="--quantize"):
        Engine(tiny(char.vocab_size), char, quantize="int3")


def test_stop_strings_stream_exactly_the_returned_text(char: CharTokenizer) -> None:
    engine = Engine(tiny(char.vocab_size), char)
    full = engine.generate(["It was"], 30, temperature=0)[0]
    stop = full[10:13]
    pieces: list[tuple[int, str]] = []
    out = engine.generate(["It was", "The"], 30, temperature=0, stop=[stop], on_text=lambda i, d: pieces.append((i, d)))
    assert out[0] == full[: full.find(stop)]
    for row in (0, 1):
        assert "".join(d for i, d in pieces if i == row) == out[row]


def test_text_stream_holds_back_a_possible_stop_prefix(char: CharTokenizer) -> None:
    got: list[str] = []
    stream = TextStream(char, ["END"], got.append)
    for text in ("ab", "abE", "abEN", "abENx"):
        stream.push(char.encode(text))
    assert "".join(got) == "abENx"[:3]  # "EN" was held back while it could have become "END", then let go
    assert stream.finish(char.encode("abENxEND")) == "abENx" and "".join(got) == "abENx"


def test_chat_template_renders_like_transformers(chat_tok: HFTokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    hf = PreTrainedTokenizerFast(tokenizer_object=chat_tok.tokenizer)
    hf.chat_template = TEMPLATE
    ours = apply_chat_template(chat_tok, msgs, add_generation_prompt=True)
    assert ours == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert apply_chat_template(chat_tok, msgs, template=PLAIN_TEMPLATE) == "system: Be brief.\nuser: Hi!\nassistant:"
    engine = Engine(tiny(chat_tok.vocab_size), chat_tok)
    reply = engine.chat(msgs, max_new_tokens=8)
    assert reply == engine.generate([ours], 8, temperature=0)[0]


def save_run(model: GPT, tok, run: Path) -> Path:
    tok.save(run.parent / f"{run.name}-tok")
    checkpoint.save(run, 0, model, {"model": model.config.to_dict()}, {}, None, run.parent / f"{run.name}-tok")
    return run


def test_sample_temperature_zero_is_greedy(char: CharTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny(char.vocab_size)
    run = save_run(model, char, tmp_path / "run")
    assert main(["sample", str(run), "--prompt", "It was", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    expected = Engine(model, char).generate(["It was"], 20, temperature=0)[0]
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("templated", [False, True])
def test_chat_repl_through_piped_stdin(templated: bool, char: CharTokenizer, chat_tok: HFTokenizer,
                                       tmp_path: Path) -> None:
    tok = chat_tok if templated else char
    run = save_run(tiny(tok.vocab_size), tok, tmp_path / "run")
    stdin = "Hello there\n/reset\nThe loss\n/bogus\n/exit\nnever read\n"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "nanophi.cli", "chat", str(run), "--temperature", "0",
                           "--max-new-tokens", "12"], input=stdin, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert "(conversation reset)" in lines and any(l.startswith("(unknown command /bogus") for l in lines)
    engine = Engine(tiny(tok.vocab_size), tok)
    if templated:
        first = engine.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=12)
    else:
        first = engine.generate(["Hello there\n"], 12, temperature=0)[0]
    assert proc.stdout.startswith(first + "\n")


def test_bench_generate_reports_throughput(char: CharTokenizer) -> None:
    result = bench_generate((tiny(char.vocab_size), char), batch_size=4, new_tokens=8, prompt_tokens=8,
                            repeats=1, compare_hf=True)
    for key in ("decode_tok_s", "prefill_s", "hf_decode_tok_s", "hf_batch1_decode_tok_s", "speedup_vs_hf"):
        assert result[key] > 0, key


def test_a_seeded_row_samples_the_same_alone_or_batched_with_other_settings(char: CharTokenizer) -> None:
    """Rows with their own temperature/top-k/top-p/seed/penalty share one batch (the server's case), and a seeded
    row's tokens do not depend on its batch-mates, cached or not, and whichever rows finish first."""
    from nanophi.sampling import Sampling

    engine = Engine(tiny(char.vocab_size), char)
    prompts = [char.encode(p) for p in ("It was", "The loss went down.\nIt", "s", "worst of small", "went")]
    settings = [Sampling(0.9, None, None, 7), Sampling(1.3, 5, None, 8), Sampling(0.0),
                Sampling(0.8, None, 0.7, 9, repetition_penalty=1.3), Sampling(1.0, 12, 0.9, 10)]
    budgets = [20, 6, 15, 20, 3]
    together = engine.generate_ids(prompts, budgets, sampling=settings)
    alone = [engine.generate_ids([p], b, sampling=[s])[0] for p, s, b in zip(prompts, settings, budgets)]
    assert together == alone and [len(r) for r in together] == budgets
    assert together == engine.generate_ids(prompts, budgets, sampling=settings, use_cache=False)
    assert together[2] == engine.generate_ids([prompts[2]], 15, temperature=0)[0]  # the greedy row is greedy
    # a batch seed s gives row i the seed s + i: n samples of one prompt differ, and row 0 is the seed's own
    rows = engine.generate_ids([prompts[0]] * 3, 20, temperature=0.9, seed=7)
    assert rows[0] == together[0] and len({tuple(r) for r in rows}) == 3


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                                        ("--top-p", "nan"), ("--top-p", "1.5"), ("--top-k", "0"),
                                        ("--repetition-penalty", "nan"), ("--repetition-penalty", "0"),
                                        ("--max-new-tokens", "0")])
@pytest.mark.parametrize("command", ["sample", "chat"])
def test_nonsense_sampling_flags_are_one_line_exit_2(command: str, flag: str, value: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    # checked before the model loads: the path need not even exist
    assert main([command, str(tmp_path / "no-such-run"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    with pytest.raises(UserError, match="temperature"):
        Engine(tiny(8), CharTokenizer(list("abcdefgh"))).generate_ids([[1]], 2, temperature=float("nan"))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("arch", [dict(preset="llama", n_kv_head=2), dict(preset="gpt2"),
                                  dict(preset="llama", qk_norm=True, mlp="relu2", logit_softcap=15.0, bias=True)])
def test_lean_decode_step_computes_the_models_forward(char: CharTokenizer, arch: dict, quantize: str | None) -> None:
    """engine_static.DecodeStep against GPT.forward with a KV cache on the same decode copy: a left-padded batch
    (per-row positions, a pad mask), several steps, every architecture switch the step reads."""
    model = tiny(char.vocab_size, n_embd=64, **arch)
    engine = Engine(model, char, quantize=quantize)
    assert engine.step is not None
    rows = [char.encode("It was the best"), char.encode("The")]
    (c1, logits), (c2, _) = engine._prefill(rows, 24), engine._prefill(rows, 24)
    ids = logits.argmax(-1)
    with torch.inference_mode():
        for _ in range(4):
            ref = engine.model(ids[:, None], cache=c1)[0][:, -1]
            got = engine.decode_step(ids, c2)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            ids = ref.argmax(-1)
    torch.testing.assert_close(c2.k, c1.k, rtol=1e-4, atol=1e-4)
    assert c1.pos == c2.pos
