"""`nanophi bench serve`: the real server (uvicorn on loopback) and the real openai client against the Engine's
batch on the same prompts. No test asserts on speed; they check that both sides did the same work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nanophi import checkpoint
from nanophi.cli import main
from nanophi.model import GPT
from nanophi.tokenizer import CharTokenizer

from conftest import ASCII, tiny_ascii_model



def tiny() -> tuple[GPT, CharTokenizer]:
    return tiny_ascii_model(), CharTokenizer(sorted(ASCII))


@pytest.mark.parametrize("missing", ["openai", "uvicorn", "fastapi"])
def test_missing_serve_extra_is_one_line(missing: str, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # what `import x` meets when x is not installed
    assert main(["bench", "serve", "--model", "runs/none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the serve extra" in err and missing in err
    assert "pip install 'nanophi[serve]'" in err


def test_bench_serve_counts_the_same_tokens_as_the_engine() -> None:
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from nanophi.bench_serve import bench_serve

    # a wide batch window: on a loaded machine all 6 requests still reach the server before the batch starts
    out = bench_serve(tiny(), clients=6, max_tokens=9, prompt_tokens=5, rounds=2, batch_window_ms=500)
    assert out["clients"] == 6 and out["rounds"] == 2 and len(out["serve_batches"]) == 2
    assert out["serve_batches"] == [1, 1]  # the six concurrent requests shared one engine batch
    assert out["serve_tok_s"]["min"] > 0 and out["engine_tok_s"]["min"] > 0
    assert out["ratio"]["min"] <= out["ratio"]["median"] <= out["ratio"]["max"]
    # one batch of the same rows, greedy, fp32: every completion is the engine's own text
    assert out["completions_equal_engine"] == 6


def test_bench_serve_command_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    model, tok = tiny()
    tok.save(tmp_path / "tok")
    checkpoint.save(tmp_path / "run", 0, model, {"model": model.config.to_dict()}, {}, None, tmp_path / "tok")
    assert main(["bench", "serve", "--model", str(tmp_path / "run"), "--clients", "3", "--max-tokens", "4",
                 "--prompt-tokens", "3", "--rounds", "1", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["clients"] == 3 and out["threads"] == 1 and out["max_tokens"] == 4
    assert out["target_ratio"] == 0.8 and out["ratio"]["median"] > 0
    assert "load_avg_1m" in out and "cpu_flags" in out


def test_bench_serve_refuses_a_prompt_past_the_context() -> None:
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from nanophi.bench_serve import bench_serve
    from nanophi.errors import UserError

    with pytest.raises(UserError, match="> the model's context 64"):
        bench_serve(tiny(), clients=2, max_tokens=40, prompt_tokens=40)
