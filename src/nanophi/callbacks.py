"""The trainer's extension points and the two sinks every run has: `metrics.jsonl` and log lines.

The trainer calls, in order, for every callback:
    on_train_start(trainer)
    per step: on_step_begin(trainer, step) -> forward/backward -> on_after_backward(trainer, step)
              -> optimizer step -> on_step_end(trainer, record) [may add keys to record]
              -> on_log(trainer, record) when the record is logged
    on_eval(trainer, record), on_sample(trainer, step, text), on_train_end(trainer, summary)
Callbacks that add keys (diagnostics) must come before the sinks that write them; `nanophi.train.build_callbacks` orders them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanophi.train import Trainer

log = logging.getLogger("nanophi.train")


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_begin(self, trainer: Trainer, step: int) -> None: ...
    def on_after_backward(self, trainer: Trainer, step: int) -> None: ...
    def on_step_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_sample(self, trainer: Trainer, step: int, text: str) -> None: ...
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...


class MetricsFile(Callback):
    """RUN/metrics.jsonl: one JSON object per logged step and per eval, appended and flushed at once so a
    crashed run keeps everything it logged. A resumed run appends to the same file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._write(record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._write(record)

    def on_sample(self, trainer: Trainer, step: int, text: str) -> None:
        self._write({"kind": "sample", "step": step, "text": text})

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._write({"kind": "end", **summary})
        self.f.close()


class ConsoleLog(Callback):
    """One plain line per logged step and eval, through `logging`: right for pipes, CI logs and files."""

    def on_log(self, trainer: Trainer, r: dict[str, Any]) -> None:
        parts = [f"step {r['step']:>6d}/{trainer.cfg.train.max_iters}", f"loss {r['loss']:.4f}",
                 f"lr {r['lr']:.2e}", f"grad {r['grad_norm']:.3f}",
                 f"{r['tokens_per_s'] / 1e3:.1f}k tok/s", f"{r['ms_per_iter']:.1f} ms/it"]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        log.info(" | ".join(parts))

    def on_eval(self, trainer: Trainer, r: dict[str, Any]) -> None:
        best = " (best)" if r.get("is_best") else ""
        log.info(f"eval step {r['step']}: val loss {r['val_loss']:.4f} | val bpb {r['val_bpb']:.4f}{best}")

    def on_sample(self, trainer: Trainer, step: int, text: str) -> None:
        log.info(f"sample at step {step}: {text!r}")
