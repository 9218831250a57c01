"""Training end to end: exact resume, surviving kill -9, the CLI contract, and every bad input's one-line error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanophi import checkpoint
from nanophi.cli import main
from nanophi.config import resolve
from nanophi.optim import lr_multiplier

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-interval", "5", "--log-interval", "5", "--warmup-iters", "2", "--dashboard", "off"]


def train_cli(corpus: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(corpus), "--out", str(out), *TINY, *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / checkpoint.WEIGHTS))


@pytest.mark.parametrize("preset,optimizer", [("gpt2", "adamw"), ("llama", "adamw")])
def test_resume_is_bit_exact(corpus_file: Path, tmp_path: Path, preset: str, optimizer: str) -> None:
    # dropout > 0 so the RNG streams matter too, and grad accumulation so micro-batch order matters
    common = ["--preset", preset, "--dropout", "0.1", "--grad-accum", "2", "--optimizer", optimizer,
              "--decay-iters", "20"]  # the same lr schedule whether a run stops at 10 or 20
    assert train_cli(corpus_file, tmp_path / "straight", *common, "--max-iters", "20") == 0
    assert train_cli(corpus_file, tmp_path / "split", *common, "--max-iters", "10") == 0
    assert train_cli(corpus_file, tmp_path / "split", *common, "--max-iters", "20", "--resume") == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l).get("kind") == "train"]
    assert steps == sorted(steps) and steps[-1] == 19  # the resumed run appended, continuing the count


def test_resume_takes_the_saved_config(corpus_file: Path, tmp_path: Path) -> None:
    assert train_cli(corpus_file, tmp_path / "r", "--max-iters", "5", "--n-embd", "48") == 0
    # only --max-iters changes: the model shape comes from the checkpoint, not the defaults
    assert main(["train", "--out", str(tmp_path / "r"), "--max-iters", "10", "--resume", "--dashboard", "off"]) == 0
    ckpt = checkpoint.load(tmp_path / "r", with_trainer=False)
    assert ckpt.state["step"] == 10 and ckpt.config["model"]["n_embd"] == 48


def test_kill_9_leaves_a_loadable_checkpoint(corpus_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanophi.cli", "train", "--data", str(corpus_file), "--out", str(run), *TINY,
           "--eval-interval", "1", "--max-iters", "100000"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for attempt, delay in enumerate((0.0, 0.13, 0.29)):
        args = cmd + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        start_step = checkpoint.load(run, with_trainer=False).state["step"] if attempt else -1
        # wait until this process has written at least one new checkpoint, then kill it mid-flight
        while time.time() < deadline:
            if (run / "last").exists():
                try:
                    if checkpoint.load(run, with_trainer=False).state["step"] > start_step:
                        break
                except Exception:
                    pass  # the link may be mid-swap: that is what we are testing the loader survives below
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = checkpoint.load(run / "last")  # complete, with optimizer state
        assert ckpt.state["step"] > start_step and ckpt.trainer is not None
    assert main(["sample", str(run), "--prompt", "The", "--max-new-tokens", "5", "--seed", "0"]) == 0


def test_end_to_end_cli_in_a_subprocess(corpus_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    py = [sys.executable, "-m", "nanophi.cli"]
    r = subprocess.run(py + ["prepare", "--data", str(corpus_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(py + ["train", "--data", str(corpus_file), "--out", str(run), *TINY, "--max-iters", "30"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 30 and summary["best_val_loss"] < 4.0
    assert "tok/s" in r.stderr  # the progress line
    for link in ("last", "best"):
        assert (run / link / "model.safetensors").exists() and (run / link / "tokenizer").is_dir()
    r = subprocess.run(py + ["sample", str(run), "--prompt", "It was", "--max-new-tokens", "40", "--seed", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout) >= 20 and not r.stdout.startswith("It was")  # continuation only
    greedy = [subprocess.run(py + ["sample", str(run), "--prompt", "It", "--temperature", "0",
                                   "--max-new-tokens", "20"], capture_output=True, text=True).stdout
              for _ in range(2)]
    assert greedy[0] == greedy[1]
    r = subprocess.run(py + ["eval", str(run), "--json"], capture_output=True, text=True)
    result = json.loads(r.stdout)
    assert abs(result["loss"] - summary["best_val_loss"]) < 1e-4 and result["bpb"] > 0


def test_max_time_stops_training(corpus_file: Path, tmp_path: Path) -> None:
    assert train_cli(corpus_file, tmp_path / "t", "--max-iters", "100000", "--max-time", "2") == 0
    steps = checkpoint.load(tmp_path / "t", with_trainer=False).state["step"]
    assert 0 < steps < 100000


def test_early_stop_after_patience_evals(corpus_file: Path, tmp_path: Path) -> None:
    from nanophi.train import Trainer, prepare_data

    cfg = resolve({"data": str(corpus_file), "out": str(tmp_path / "e"), "n_layer": 1, "n_embd": 32,
                   "n_head": 2, "block_size": 16, "max_iters": 100, "eval_interval": 2, "early_stop": 2})
    trainer = Trainer(cfg, prepare_data(cfg), callbacks=[])
    losses = iter([3.0, 2.0, 2.5, 2.4, 2.1, 1.0])  # best at the 2nd eval, then two evals without improvement
    trainer.evaluate = lambda split="val": {"val_loss": next(losses), "val_bpb": 1.0}
    summary = trainer.fit()
    assert summary["stop_reason"] == "early_stop" and summary["step"] == 8 and summary["best_val_loss"] == 2.0
    assert checkpoint.load(tmp_path / "e" / "best", with_trainer=False).state["step"] == 4


def test_lr_schedules() -> None:
    cfg = resolve({"max_iters": 100, "warmup_iters": 10, "lr": 1e-3, "min_lr": 1e-4}).train
    mults = [lr_multiplier(s, cfg) for s in range(100)]
    assert mults[0] < mults[9] < 1.0 and max(mults) == pytest.approx(1.0, abs=1e-3)
    assert mults[-1] == pytest.approx(0.1, abs=1e-2)
    wsd = resolve({"max_iters": 100, "warmup_iters": 10, "schedule": "wsd", "decay_frac": 0.2}).train
    w = [lr_multiplier(s, wsd) for s in range(101)]
    assert w[50] == 1.0 and w[79] == 1.0 and w[100] == pytest.approx(0.1)


def test_toml_recipe_and_precedence(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\nn_layer = 3\nn_embd = 64\n[train]\nlr = 0.002\nbatch_size = 7\n")
    from nanophi.config import load_toml

    cfg = resolve({"lr": 0.005}, load_toml(recipe))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.train.batch_size, cfg.train.lr) == (3, 64, 7, 0.005)
    llama = resolve({"preset": "llama"})
    assert (llama.model.pos, llama.model.norm, llama.model.mlp) == ("rope", "rmsnorm", "swiglu")


# --- bad input: one line on stderr, exit 2, no traceback ------------------------------------------------------
def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], expect: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert code == 2, err
    assert "Traceback" not in err and expect in last, err


def test_bad_inputs(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"hello\x00\x01\x02world")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("just a few words here, not enough for a block\n")
    out = ["--out", str(tmp_path / "o"), *TINY]
    one_line_error(capsys, ["train", "--data", str(empty), *out], "empty")
    one_line_error(capsys, ["train", "--data", str(binary), *out], "binary")
    one_line_error(capsys, ["train", "--data", str(latin1), *out], "UTF-8")
    one_line_error(capsys, ["train", "--data", str(tmp_path / "nope.txt"), *out], "does not exist")
    one_line_error(capsys, ["train", "--data", str(short), *out, "--block-size", "64"], "block_size")
    one_line_error(capsys, ["train", "--data", str(corpus_file), *out, "--n-embd", "30", "--n-head", "4"],
                   "divisible by n_head")
    one_line_error(capsys, ["train", "--data", str(corpus_file), *out, "--resume"], "no checkpoint")
    one_line_error(capsys, ["train", "--data", str(corpus_file), *out, "--config", str(tmp_path / "x.toml")],
                   "does not exist")
    assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "last").exists()


def test_bad_flag_value_exits_2(capsys: pytest.CaptureFixture) -> None:
    one_line_error(capsys, ["train", "--lr", "fast"], "--lr expects a number, got 'fast'")


def test_errors_that_need_a_run(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert train_cli(corpus_file, run, "--max-iters", "5") == 0
    before = weights(run)
    # training into an existing run without --resume would overwrite it: refused
    one_line_error(capsys, ["train", "--data", str(corpus_file), "--out", str(run), *TINY], "--resume")
    one_line_error(capsys, ["train", "--data", str(corpus_file), "--out", str(run), *TINY, "--n-embd", "64",
                            "--resume"], "differs from the checkpoint")
    one_line_error(capsys, ["sample", str(run), "--prompt", "\u2603 snowman"], "'\u2603'")
    one_line_error(capsys, ["sample", str(tmp_path / "missing")], "does not exist")
    one_line_error(capsys, ["sample", str(run), "--top-p", "2"], "--top-p")
    for name, v in before.items():
        assert torch.equal(v, weights(run)[name])  # nothing was overwritten by the refused commands
    # a corrupt weights file: one clear line, for sampling and for resuming
    target = (run / "last").resolve() / checkpoint.WEIGHTS
    target.write_bytes(target.read_bytes()[:100])
    one_line_error(capsys, ["sample", str(run)], "corrupt")
    one_line_error(capsys, ["train", "--data", str(corpus_file), "--out", str(run), *TINY, "--resume",
                            "--max-iters", "10"], "corrupt")
    (run / "last" / checkpoint.STATE).write_text("{not json")
    one_line_error(capsys, ["eval", str(run / "last")], "corrupt")


def test_demo_target_runs_at_tiny_settings(tmp_path: Path) -> None:
    """The README's `make demo` minus the set-up: the same commands, tiny settings."""
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        ["make", "-s", "run-demo", f"PY={sys.executable}", f"RUN={tmp_path / 'demo'}",
         "DEMO_ARGS=--max-iters 20 --eval-interval 10 --n-layer 1 --n-embd 32 --n-head 2 --block-size 32"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sample" in r.stdout.lower() and len(r.stdout) > 200


def test_checkpoint_weights_are_as_readable_as_the_rest(tmp_path: Path) -> None:
    """safetensors writes 0600 by itself; a checkpoint's weights must follow the umask like its JSON files."""
    from nanophi import checkpoint
    from nanophi.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    path = checkpoint.save(tmp_path / "run", 1, model, {}, {}, {}, None, ("last",))
    weights, config = path / checkpoint.WEIGHTS, path / checkpoint.STATE
    assert weights.stat().st_mode & 0o777 == config.stat().st_mode & 0o777


def test_train_on_a_prepared_directory(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--data` may name the output of `nanophi prepare --out` (or `textbook pack`): its tokenizer is used as is."""
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--data", str(corpus_file), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--out", str(prepared)]) == 0
    assert train_cli(prepared, tmp_path / "run", "--max-iters", "5") == 0
    ckpt = checkpoint.load(tmp_path / "run", with_trainer=False)
    assert ckpt.config["model"]["vocab_size"] == json.loads((prepared / "meta.json").read_text())["vocab_size"]
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    # a model whose tokenizer differs from the prepared one (here: char) cannot train on those ids
    assert train_cli(corpus_file, tmp_path / "char", "--max-iters", "2") == 0
    one_line_error(capsys, ["train", "--data", str(prepared), "--init-from", str(tmp_path / "char"),
                            "--out", str(tmp_path / "ft"), *TINY, "--max-iters", "2"], "different tokenizer")


def test_help_shows_the_model_a_run_gets(capsys: pytest.CaptureFixture) -> None:
    """RunConfig's model (4 layers, 128 wide) is smaller than GPTConfig's own defaults; --help must say 4."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "number of transformer blocks (default: 4)" in text and "(default: 128)" in text
