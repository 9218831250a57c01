"""Debugging features: NaN localisation, boundary checks, diagnostics, sinks, dashboard, report, overfit, lr-find.

Everything runs on a 2-layer, 32-wide char model over a small generated corpus, so the file stays fast."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanophi.callbacks import Callback
from nanophi.cli import main
from nanophi.config import resolve
from nanophi.errors import UserError

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"]
TINY_FLAGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 4}


def _write_corpus(path: Path) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the park with a red ball while a bird sang".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "tiny.txt")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("NANOPHI_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: a second thread only adds synchronisation, and on a busy machine a lot of it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(corpus: Path, out: Path, callbacks: list[Callback] | None = None, **flags):
    from nanophi.train import Trainer, prepare_data

    cfg = resolve({"data": str(corpus), "out": str(out), "eval_iters": 2, "warmup_iters": 2, **TINY_FLAGS, **flags})
    return Trainer(cfg, prepare_data(cfg), callbacks=callbacks)


# --- one real training run through the CLI, in a subprocess so stdout is a pipe (not a TTY) -------------------------
@pytest.fixture(scope="module")
def cli_run(corpus: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("runs") / "r"
    cmd = [sys.executable, "-m", "nanophi.cli", "train", "--data", str(corpus), *TINY, "--max-iters", "8",
           "--eval-interval", "4", "--eval-iters", "2", "--log-interval", "2", "--sample-interval", "4",
           "--debug-interval", "4", "--warmup-iters", "2", "--tensorboard", "--out", str(run)]
    env = {**os.environ, "NANOPHI_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"run": run, "proc": proc, "records": records}


def test_non_tty_output_is_plain_lines(cli_run: dict) -> None:
    out = cli_run["proc"].stdout + cli_run["proc"].stderr
    assert "\r" not in out and "\x1b[" not in out
    assert re.search(r"^step +\d+/8 \| loss", cli_run["proc"].stderr, re.M)  # ConsoleLog, not the dashboard


def test_metrics_file_has_the_documented_keys(cli_run: dict) -> None:
    recs = cli_run["records"]
    train = [r for r in recs if r["kind"] == "train"]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_rss_mb"):
        assert key in train[0], key
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals and {"val_loss", "val_bpb"} <= set(evals[0])
    assert [r["step"] for r in recs if r["kind"] == "sample"] == [4, 8]
    diag = [r for r in train if r["step"] % 4 == 0]
    assert [r["step"] for r in diag] == [0, 4]
    for key in ("act/block1/std", "act/block0.mlp/std", "grad/block0/norm", "grad/embed/norm",
                "update/transformer.h.0.attn.c_attn.weight/log10", "attn/block1/head1/entropy",
                "mlp/block0/dead_frac", "mlp/block0/sat_frac"):
        assert all(key in r for r in diag), key
    assert not any(k.startswith("act/") for r in train if r["step"] % 4 for k in r)  # only on debug steps


def test_tensorboard_event_files_read_back(cli_run: dict) -> None:
    from nanophi.debug.sinks import skip_tensorflow_in_tensorboard

    skip_tensorflow_in_tensorboard()  # reading local files needs no TensorFlow, and importing it takes seconds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(cli_run["run"] / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()
    for tag in ("train/loss", "train/lr", "eval/val_loss", "grad/block0/norm", "attn/block0/head0/entropy"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in ea.Scalars("eval/val_loss")] == [4, 8]
    assert "sample/text_summary" in tags["tensors"]


def test_report_is_self_contained(cli_run: dict) -> None:
    run = cli_run["run"]
    assert main(["report", str(run), "--prompt", "the cat sat"]) == 0
    page = (run / "report.html").read_text()
    assert page.count("<img") >= 5
    assert page.count('src="data:image/png;base64,') == page.count("<img")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    assert "<script" not in page
    for name in ("loss", "lr", "update_ratio", "attention", "embeddings", "activations"):
        assert (run / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the cat sat" in page and "Samples during training" in page


# --- guards -------------------------------------------------------------------------------------------------------
class _PoisonAt(Callback):
    """Sets one weight of transformer.h.1.mlp.c_fc to NaN at the start of step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, trainer, step: int) -> None:
        if step == self.step:
            with torch.no_grad():
                trainer.raw_model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")


def test_nan_is_traced_to_its_layer_step_and_last_checkpoint(corpus: Path, tmp_path: Path) -> None:
    from nanophi.train import TrainingDiverged

    trainer = _trainer(corpus, tmp_path / "run", [_PoisonAt(3)], max_iters=6, eval_interval=2)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc" in msg
    assert "step 3" in msg
    assert "ckpt-0000002" in msg  # the checkpoint written after steps 0 and 1


def test_locate_nonfinite_names_the_first_bad_gradient(corpus: Path, tmp_path: Path) -> None:
    from nanophi.debug.guards import locate_nonfinite

    model = _trainer(corpus, tmp_path / "run").raw_model
    model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: g * math.inf)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    where = locate_nonfinite(model, x, x, torch.device("cpu"), torch.float32)
    assert where == "first non-finite gradient in transformer.h.0.mlp.c_fc.weight"


def test_checks_reject_bad_inputs_and_cost_nothing_when_off(corpus: Path, tmp_path: Path) -> None:
    model = _trainer(corpus, tmp_path / "on", checks="on").raw_model
    V = model.config.vocab_size
    good = torch.randint(0, V, (2, 16))
    model(good, good)
    for bad, words in ((good.float(), "int64"), (good[0], "(batch, time)"), (torch.cat([good, good], 1), "context"),
                       (good + V, "vocabulary")):
        with pytest.raises(UserError, match=re.escape(words)):
            model(bad)
    off = _trainer(corpus, tmp_path / "off", checks="off").raw_model
    assert not off._forward_pre_hooks and not off._forward_hooks
    assert all(not b._forward_pre_hooks for b in off.transformer.h)


# --- diagnostics --------------------------------------------------------------------------------------------------
def test_health_monitor_known_values(corpus: Path, tmp_path: Path) -> None:
    from nanophi.debug.diagnostics import HealthMonitor

    monitor = HealthMonitor(interval=1)
    # fp32: the entropies below are exact to 1e-5 (auto picks bf16 on CPUs with AMX)
    trainer = _trainer(corpus, tmp_path / "run", [monitor], bias=True, dtype="float32")
    model = trainer.raw_model
    C = model.config.n_embd
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias.fill_(-100.0)  # every pre-activation << 0: every GELU unit dead
        model.transformer.h[1].attn.c_attn.weight[:C].zero_()  # q = 0: every score equal, uniform attention
    model.transformer.h[1].ln_2.weight.requires_grad_(False)
    record = trainer.train_step()
    monitor.on_step_end(trainer, record)

    assert record["mlp/block0/dead_frac"] == 1.0
    assert record["mlp/block1/dead_frac"] < 0.5
    # uniform attention over the causal window: entropy ln(t+1) at position t, so the mean over T is ln(T!)/T
    T = model.config.block_size
    for h in range(model.config.n_head):
        assert record[f"attn/block1/head{h}/entropy"] == pytest.approx(math.lgamma(T + 1) / T, abs=1e-5)
    assert "update/transformer.h.1.ln_2.weight/log10" not in record  # frozen: no update ratio
    assert -8 < record["update/transformer.h.1.mlp.c_proj.weight/log10"] < 0
    assert record["grad/block1/norm"] > 0 and "grad/embed/norm" in record
    # the hooks are gone after the step
    block = model.transformer.h[0]
    assert not block._forward_hooks and not block.mlp._forward_hooks and not block.mlp.act._forward_hooks


# --- views --------------------------------------------------------------------------------------------------------
def test_braille_chart_puts_the_ends_in_the_corners() -> None:
    from nanophi.debug.dashboard import Y_LABEL_WIDTH, braille_chart

    lines = braille_chart([([0, 10], [1.0, 0.0], "")], width=Y_LABEL_WIDTH + 11, height=3).plain.splitlines()
    plot = [line[Y_LABEL_WIDTH + 1:] for line in lines[:3]]
    assert ord(plot[0][0]) & 0x01  # top-left dot: (x 0, y 1)
    assert ord(plot[2][-1]) & 0x80  # bottom-right dot: (x 10, y 0)
    assert all(0x2800 <= ord(ch) <= 0x28FF for row in plot for ch in row)


def test_dashboard_draws_a_run(corpus: Path, tmp_path: Path) -> None:
    from rich.console import Console

    from nanophi.callbacks import MetricsFile
    from nanophi.debug.dashboard import Dashboard

    buf = io.StringIO()
    console = Console(file=buf, width=110, force_terminal=True, color_system=None)
    trainer = _trainer(corpus, tmp_path / "run", None, max_iters=4, eval_interval=2, log_interval=1,
                       sample_interval=4)
    trainer.callbacks = [MetricsFile(trainer.run_dir / "metrics.jsonl"), Dashboard(console=console)]
    trainer.fit()
    out = buf.getvalue()
    assert "step 4/4" in out and "loss (train · val)" in out and "latest sample (step 4)" in out
    assert any(0x2801 <= ord(ch) <= 0x28FF for ch in out)  # the chart drew something


def test_liveplot_is_silent_outside_a_notebook_and_renders_png() -> None:
    from nanophi.debug.notebook import LivePlot, render_png

    plot = LivePlot()
    assert not plot.enabled
    plot.on_log(None, {"step": 0, "loss": 3.0, "lr": 1e-3})
    plot.on_train_end(None, {})  # nothing to draw on, nothing raised
    png = render_png([{"step": s, "loss": 3 - s / 10, "lr": 1e-3} for s in range(5)], [{"step": 4, "val_loss": 2.7}])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_sink_without_wandb_says_how_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    from nanophi.debug.sinks import WandbSink

    with pytest.raises(UserError, match="pip install wandb"):
        WandbSink(tmp_path, {})


# --- commands -----------------------------------------------------------------------------------------------------
def test_overfit_passes_on_a_tiny_model(corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["overfit", "--data", str(corpus), *TINY, "--lr", "1e-2", "--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^PASS: loss 0\.0\d+ after \d+ steps", out, re.M), out


def test_overfit_fails_when_nothing_learns(corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["overfit", "--data", str(corpus), *TINY, "--lr", "1e-9", "--steps", "5"]) == 1
    assert "FAIL: the loss barely moved" in capsys.readouterr().out


def test_lr_find_suggests_a_finite_lr_and_plots(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "lrf"
    assert main(["lr-find", "--data", str(corpus), *TINY, "--start", "1e-5", "--end", "1", "--steps", "30",
                 "--out", str(out_dir)]) == 0
    m = re.search(r"suggested --lr (\S+)", capsys.readouterr().out)
    lr = float(m.group(1))
    assert math.isfinite(lr) and 1e-5 <= lr <= 1
    assert (out_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out_dir / "lr_find.json").read_text())["suggestion"] == pytest.approx(lr, rel=0.05)
