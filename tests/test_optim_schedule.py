"""The lr schedule under --max-time: it follows the clock as well as the step counter, so a run the time budget
cuts short still decays to min_lr, and a resumed run continues its budget. The runs use a fake clock that moves
only when a step runs, so the step count does not depend on how loaded the machine is (tests never assert on
wall time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nanophi import checkpoint
from nanophi import train as train_module
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


STEP_S = 0.0625  # what one step costs on the fake clock (a power of two: sums of it are exact)


class _StepClock:
    """Stands in for the `time` module inside nanophi.train: perf_counter() advances STEP_S per training step."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _StepClock:
    fake = _StepClock()
    monkeypatch.setattr(train_module, "time", fake)
    step = Trainer.train_step

    def timed_step(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, Any]:
        fake.now += STEP_S
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    return fake


def _trainer(corpus: Path, out: Path, **over: Any) -> tuple[Trainer, _LrLog]:
    cfg = resolve({"data": str(corpus), "out": str(out), "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16,
                   "batch_size": 4, "max_iters": 1_000_000, "warmup_iters": 3, "lr": 1e-3, "min_lr": 1e-5,
                   "eval_interval": 1_000_000, "eval_iters": 2, "dashboard": "off", **over})
    lrs = _LrLog()
    return Trainer(cfg, prepare_data(cfg), callbacks=[lrs]), lrs


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_max_time_run_ends_at_the_floor(corpus_file: Path, tmp_path: Path, schedule: str, clock: _StepClock
                                        ) -> None:
    trainer, lrs = _trainer(corpus_file, tmp_path / schedule, max_time=0.5, schedule=schedule)
    summary = trainer.fit()
    assert summary["stop_reason"] == "max_time" and summary["step"] == pytest.approx(0.5 / STEP_S, abs=1e-9)
    assert lrs.lrs[-1] == pytest.approx(1e-5)  # decayed, though max_iters was never in reach
    assert max(lrs.lrs) > 0.5e-3  # and it did reach (about) the peak first
    after_warmup = lrs.lrs[3:]
    assert after_warmup == sorted(after_warmup, reverse=True)  # then only went down
    assert summary["train_time_s"] <= 0.5 + 1e-9  # the last step ended within the budget


def test_resumed_run_continues_its_time_budget(corpus_file: Path, tmp_path: Path, clock: _StepClock) -> None:
    first, _ = _trainer(corpus_file, tmp_path / "r", max_time=0.25)
    first.fit()
    saved = checkpoint.load(tmp_path / "r", with_trainer=False).state["train_time_s"]
    assert saved == pytest.approx(0.25)
    again, lrs = _trainer(corpus_file, tmp_path / "r", max_time=0.5)
    again.resume()
    again.fit()
    # the schedule resumed half-way through the budget, not from its peak
    assert lrs.lrs[0] < 0.7e-3 and lrs.lrs[-1] == pytest.approx(1e-5)
