"""Model references: turn what a user types (a run directory, a checkpoint, ...) into (model, tokenizer).

Every command that takes a model goes through `load_model`, so they all accept the same references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nanophi import checkpoint
from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig


def load_model(ref: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Any]:
    """Load a model and its tokenizer for inference or fine-tuning, in fp32, in eval mode."""
    path = Path(ref)
    if path.exists() and (path.is_dir() and _is_nanophi(path)):
        return load_run(path, device)
    raise UserError(f"cannot load model {str(ref)!r}: expected a nanophi run directory or checkpoint")


def _is_nanophi(path: Path) -> bool:
    return any((p / checkpoint.STATE).exists() and (p / checkpoint.WEIGHTS).exists()
               for p in (path, path / "best", path / "last"))


def load_run(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, Any]:
    from nanophi.tokenizer import load_tokenizer

    ckpt = checkpoint.load(path, with_trainer=False)
    model = GPT(GPTConfig.from_dict(ckpt.config["model"]))
    checkpoint.load_weights_into(model, ckpt.weights, ckpt.path)
    tokenizer = load_tokenizer(ckpt.path / checkpoint.TOKENIZER)
    return model.to(device).eval(), tokenizer
