"""`nanophi bench generate --compare llama.cpp`: nanophi and llama-cpp-python on the same weights in one process.
No test asserts on speed; they check that both sides ran the same work and that greedy tokens agree in fp32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nanophi.cli import main


def test_missing_llama_cpp_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets when it is not installed
    assert main(["bench", "generate", "--model", "runs/none", "--compare", "llama.cpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs llama-cpp-python" in err and "pip install llama-cpp-python" in err


def test_unknown_pair_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    assert main(["bench", "generate", "--model", "runs/none", "--compare", "llama.cpp", "--pairs", "fp8"]) == 2
    assert "--pairs takes a comma list of fp32, int8, int4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained llama-preset model (RoPE, RMSNorm, SwiGLU: the architecture llama.cpp runs), widths that
    int4 and Q4_1 can pack."""
    pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp("llama")
    corpus = tmp / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    assert main(["train", "--data", str(corpus), "--out", str(tmp / "run"), "--preset", "llama",
                 "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--max-iters", "30",
                 "--lr", "3e-3", "--dashboard", "off", "--tokenizer", "bpe", "--vocab-size", "320"]) == 0
    return tmp / "run"


def test_compare_llama_cpp_times_both_on_the_same_weights(llama_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["bench", "generate", "--model", str(llama_run), "--compare", "llama.cpp", "--threads", "1",
                 "--rounds", "2", "--prompt-tokens", "8", "--new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["threads"] == 1 and out["rounds"] == 2
    for pair, gguf_type in (("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_1")):
        r = out[pair]
        assert r["llama_cpp_type"] == gguf_type and r["file"] == f"{gguf_type}.gguf"
        assert r["nanophi_tok_s"]["min"] > 0 and r["llama_cpp_tok_s"]["min"] > 0
        assert r["ratio"]["min"] <= r["ratio"]["median"] <= r["ratio"]["max"]
    # the same fp32 weights, the same prompt, greedy: llama.cpp picks the tokens nanophi picks
    assert out["fp32"]["greedy_tokens_agree"] == 12


def test_batch_compare_decodes_every_row_like_llama_cpp(llama_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--batch-size 4: llama.cpp decodes 4 sequences in one llama_batch; in fp32 every row's greedy tokens match."""
    capsys.readouterr()
    assert main(["bench", "generate", "--model", str(llama_run), "--compare", "llama.cpp", "--threads", "1",
                 "--rounds", "1", "--batch-size", "4", "--prompt-tokens", "8", "--new-tokens", "12",
                 "--pairs", "fp32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["batch_size"] == 4
    r = out["fp32"]
    assert r["nanophi_tok_s"]["min"] > 0 and r["llama_cpp_tok_s"]["min"] > 0
    assert r["greedy_tokens_agree"] == 12 and r["greedy_rows_agree"] == 4
