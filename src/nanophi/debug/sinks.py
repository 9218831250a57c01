"""Metric sinks beyond metrics.jsonl: TensorBoard event files and Weights & Biases, as trainer callbacks.

    nanophi train ... --tensorboard      # then: tensorboard --logdir RUN/tensorboard
    nanophi train ... --wandb            # WANDB_MODE=offline keeps it on disk under RUN/wandb

Both write every number of every logged record (diagnostics included) and eval, and the samples as text.
Their libraries are imported when the sink is built, so runs without the flags never load them.
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanophi.callbacks import Callback
from nanophi.errors import UserError

if TYPE_CHECKING:
    from nanophi.train import Trainer

# Record keys that are not metrics.
NOT_SCALARS = {"kind", "step", "is_best"}


def scalars(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The record's finite numbers, named for a dashboard: plain keys get `prefix/`, `act/...` keep their own."""
    out = {}
    for k, v in record.items():
        if k in NOT_SCALARS or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k if "/" in k else f"{prefix}/{k}"] = float(v)
    return out


def skip_tensorflow_in_tensorboard() -> None:
    """Make tensorboard use its own file layer instead of TensorFlow's.

    When TensorFlow is installed, tensorboard writes files through `tf.io.gfile`, and importing TensorFlow costs
    seconds and a wall of log lines. tensorboard falls back to its bundled stub when a module named
    `tensorboard.compat.notf` exists; registering one is enough for local log directories like ours. A process
    that already imported TensorFlow keeps using it."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class TensorBoardSink(Callback):
    """Event files under `log_dir`, readable by `tensorboard --logdir` and by its EventAccumulator."""

    def __init__(self, log_dir: Path) -> None:
        skip_tensorflow_in_tensorboard()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for tag, v in scalars(record, "train").items():
            self.writer.add_scalar(tag, v, record["step"])

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for tag, v in scalars(record, "eval").items():
            self.writer.add_scalar(tag, v, record["step"])
        self.writer.flush()  # evals are rare: make them visible to a running TensorBoard at once

    def on_sample(self, trainer: Trainer, step: int, text: str) -> None:
        # TensorBoard renders text as markdown: a code block keeps newlines and spacing as generated
        self.writer.add_text("sample", "```\n" + text.replace("```", "'''") + "\n```", step)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.writer.close()


class WandbSink(Callback):
    """A Weights & Biases run named after the run directory; its files live under RUN/wandb."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
        self.wandb = wandb
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanophi"), name=run_dir.name,
                              dir=str(run_dir), config=config)
        self.samples: list[list[Any]] = []

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.run.log(scalars(record, "train"), step=record["step"])

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.run.log(scalars(record, "eval"), step=record["step"])

    def on_sample(self, trainer: Trainer, step: int, text: str) -> None:
        # a Table is immutable once logged: log a fresh one holding every sample so far
        self.samples.append([step, text])
        self.run.log({"samples": self.wandb.Table(columns=["step", "text"], data=list(self.samples))}, step=step)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()
