"""The lr schedule under --max-time: it follows the clock as well as the step counter, so a run the time budget
cuts short still decays to min_lr, and a resumed run continues its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nanophi import checkpoint
from nanophi.callbacks import Callback
from nanophi.config import resolve
from nanophi.optim import lr_multiplier
from nanophi.train import Trainer, prepare_data


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_time_progress_moves_the_schedule(schedule: str) -> None:
    cfg = resolve({"max_iters": 100000, "warmup_iters": 10, "lr": 1e-3, "min_lr": 1e-4, "schedule": schedule,
                   "decay_frac": 0.5, "max_time": 10.0}).train
    assert lr_multiplier(3, cfg, 0.9) == lr_multiplier(3, cfg)  # warmup counts real steps, whatever the clock
    by_time = [lr_multiplier(50, cfg, f) for f in (0.1, 0.6, 0.8, 0.99)]
    assert by_time == sorted(by_time, reverse=True) and by_time[0] == pytest.approx(1.0, abs=0.03)
    assert lr_multiplier(50, cfg, 1.0) == pytest.approx(0.1)  # the budget's last step sits on the floor
    assert lr_multiplier(5, cfg, 1.0) == pytest.approx(0.1)  # even when the clock ends the run inside warmup
    # steps further along than the clock: the step counter wins
    assert lr_multiplier(99999, cfg, 0.1) == pytest.approx(lr_multiplier(99999, cfg))


class _LrLog(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self.lrs.append(record["lr"])


def _trainer(corpus: Path, out: Path, **over: Any) -> tuple[Trainer, _LrLog]:
    cfg = resolve({"data": str(corpus), "out": str(out), "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16,
                   "batch_size": 4, "max_iters": 1_000_000, "warmup_iters": 5, "lr": 1e-3, "min_lr": 1e-5,
                   "eval_interval": 1_000_000, "eval_iters": 2, "dashboard": "off", **over})
    lrs = _LrLog()
    return Trainer(cfg, prepare_data(cfg), callbacks=[lrs]), lrs


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_max_time_run_ends_at_the_floor(corpus_file: Path, tmp_path: Path, schedule: str) -> None:
    trainer, lrs = _trainer(corpus_file, tmp_path / schedule, max_time=1.5, schedule=schedule)
    summary = trainer.fit()
    assert summary["stop_reason"] == "max_time" and 20 < summary["step"] < 1_000_000
    assert lrs.lrs[-1] == pytest.approx(1e-5)  # decayed, though max_iters was never in reach
    assert max(lrs.lrs) > 0.5e-3  # and it did reach (about) the peak first
    assert summary["train_time_s"] < 1.5 + 1.0  # stopped within the budget (plus the final eval)


def test_resumed_run_continues_its_time_budget(corpus_file: Path, tmp_path: Path) -> None:
    first, _ = _trainer(corpus_file, tmp_path / "r", max_time=1.0)
    first.fit()
    saved = checkpoint.load(tmp_path / "r", with_trainer=False).state["train_time_s"]
    assert 0.8 < saved < 2.0
    again, lrs = _trainer(corpus_file, tmp_path / "r", max_time=2.0)
    again.resume()
    again.fit()
    # the schedule resumed half-way through the budget, not from its peak
    assert lrs.lrs[0] < 0.7e-3 and lrs.lrs[-1] == pytest.approx(1e-5)
